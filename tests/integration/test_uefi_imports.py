"""Cloud images that boot through UEFI: an x86_64 image shaped like Alpine's (UEFI
only, OpenRC instead of systemd) and an arm64 one, each built here and served
from 127.0.0.1 like a distribution's mirror under a catalog of the test's own.

Slow: each import boots the image once with cloud-init under emulation (about
two minutes on x86_64; the arm64 image is built first, about five minutes, and
its first boot takes three).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.support.cloud_image import build_cloud_image, missing_tools
from tests.support.cloud_image_arm64 import TOOLS, build_arm64_cloud_image
from tests.support.libvirtd import LibvirtDaemon
from tests.support.serve import Served, serve
from vmlease._inventory import inventory
from vmlease._paths import image_dir
from vmlease._retry import RetryPolicy
from vmlease.backends.guest.images._debian import build_debian
from vmlease.backends.guest.images._foreign import cross_tools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MIRROR = "https://mirror.example/"
TEST_DATA = image_dir().parent / "test-data"


def _need(tools: dict[str, str]) -> None:
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        pytest.skip(f"building the test image needs: apt-get install {' '.join(missing)}")


@pytest.fixture(scope="module")
def alpine_shaped() -> Path:
    need = missing_tools()
    if need:
        pytest.skip(f"building the test cloud image needs: apt-get install {' '.join(need)}")
    return build_cloud_image(TEST_DATA, shape="alpine")


@pytest.fixture(scope="module")
def arm64_cloud() -> Path:
    _need({**TOOLS, **cross_tools("aarch64"), "qemu-system-aarch64": "qemu-system-arm"})
    return build_arm64_cloud_image(
        TEST_DATA, build_debian(image_dir(), "debian-12", arch="aarch64")
    )


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    """The image cache of this module's tests: the Alpine-shaped image is imported
    once, by whichever test asks first (the libvirt one, in file order)."""
    path = Path(tempfile.mkdtemp(prefix="vmlease-images-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mirror() -> Iterator[Served]:
    """An empty mirror on 127.0.0.1: each test links in the images it serves."""
    root = Path(tempfile.mkdtemp(prefix="vmlease-mirror-"))
    try:
        with serve(root) as served:
            yield served
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _digest(path: Path) -> str:
    return "sha512:" + hashlib.sha512(path.read_bytes()).hexdigest()


def _catalog(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    entries: dict[str, object],
    files: dict[str, Path],
) -> None:
    """``entries`` as the catalog, their files (by name on the mirror) served."""
    for name, path in files.items():
        (mirror.root / name).symlink_to(path)
    (tmp_path / "catalog.json").write_text(json.dumps(entries))
    monkeypatch.setenv("VMLEASE_CATALOG", str(tmp_path / "catalog.json"))
    monkeypatch.setenv("VMLEASE_IMAGE_MIRRORS", f"{MIRROR}={mirror.url}/")


def _session(state: Path, images: Path) -> vmlease.Session:
    policy = RetryPolicy.parse("attempts=2,total_s=120").without_waits()
    return vmlease.Session(state_dir=state, backend_options={"image_dir": images}, retry=policy)


def _ssh(vm: vmlease.VM, command: str) -> str:
    done = subprocess.run(
        vm.ssh.argv(command.split()), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return str(done.stdout).strip()


def _alpine_entry(image: Path) -> dict[str, object]:
    return {
        "title": "an Alpine-shaped image (UEFI only, OpenRC), the test's mirror",
        "disks": {"x86_64": {"url": MIRROR + "alpine.qcow2", "digest": _digest(image)}},
        "boot": "uefi",
        "init": "openrc",
    }


def test_libvirt_imports_a_catalog_name_it_lacks_and_boots_it_through_uefi(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    alpine_shaped: Path,
    libvirt_daemon: LibvirtDaemon,
    images: Path,
    state: Path,
) -> None:
    entry = _alpine_entry(alpine_shaped)
    _catalog(
        monkeypatch, tmp_path, mirror, {"alpine-shaped": entry}, {"alpine.qcow2": alpine_shaped}
    )
    options = {"uris": [libvirt_daemon.unix_uri], "image_dir": images}
    with vmlease.Session(backend="libvirt", state_dir=state, backend_options=options) as session:
        vm = session.create("alpine-shaped", memory_mb=512)
        assert vm.run(["test", "-d", "/sys/firmware/efi"]).exit_code == 0
        assert vm.run(["rc-service", "vmlease-agent", "status"]).exit_code == 0
        # The import was a QEMU session's, into the cache this backend uploads from.
        assert (images / "alpine-shaped/current/manifest.json").is_file()
    assert inventory(state) == []
    assert libvirt_daemon.qemu_pids() == []


def test_a_uefi_only_openrc_image_is_imported_by_name_and_serves_its_vms(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    alpine_shaped: Path,
    images: Path,
    state: Path,
) -> None:
    entry = _alpine_entry(alpine_shaped)
    _catalog(
        monkeypatch, tmp_path, mirror, {"alpine-shaped": entry}, {"alpine.qcow2": alpine_shaped}
    )
    with _session(state, images) as session:
        vm = session.create("alpine-shaped", memory_mb=512)
        # Booted through UEFI, and run by OpenRC: the agent, SSH and readiness all hold.
        assert vm.run(["test", "-d", "/sys/firmware/efi"]).exit_code == 0
        assert vm.run(["cat", "/proc/1/comm"], check=True).stdout.strip() == "init"
        assert vm.run(["rc-service", "vmlease-agent", "status"]).exit_code == 0
        assert _ssh(vm, "id -un") == "vmlease"
        with pytest.raises(vmlease.UnsupportedOperation, match="not a systemd guest"):
            vm.wait_for_unit("ssh.service", timeout_s=10)
        # The next VM starts from the first one's saved booted state, and resets.
        again = session.create("alpine-shaped", memory_mb=512)
        again.run(["touch", "/root/mark"], check=True)
        again.reset()
        assert again.run(["test", "-e", "/root/mark"]).exit_code == 1
        assert again.run(["test", "-d", "/sys/firmware/efi"]).exit_code == 0
    manifest = json.loads((images / "alpine-shaped/current/manifest.json").read_text())
    assert (manifest["firmware"], manifest["arch"]) == ("uefi", "x86_64")


def test_an_arm64_cloud_image_is_imported_by_name_and_boots_through_uefi(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    arm64_cloud: Path,
    state: Path,
) -> None:
    entry = {
        "title": "an arm64 cloud image, the test's mirror",
        "disks": {"aarch64": {"url": MIRROR + "arm64.qcow2", "digest": _digest(arm64_cloud)}},
    }
    _catalog(monkeypatch, tmp_path, mirror, {"arm64-cloud": entry}, {"arm64.qcow2": arm64_cloud})
    images = tmp_path / "images"
    with _session(state, images) as session:
        vm = session.create("arm64-cloud", arch="arm64", memory_mb=1024)
        assert vm.run(["uname", "-m"], check=True).stdout.strip() == "aarch64"
        assert vm.run(["dpkg", "--print-architecture"], check=True).stdout.strip() == "arm64"
        assert vm.run(["test", "-d", "/sys/firmware/efi"]).exit_code == 0
        assert _ssh(vm, "uname -m") == "aarch64"
        # From the saved booted state, not a second boot through the firmware.
        again = session.create("arm64-cloud", arch="arm64", memory_mb=1024)
        assert again.run(["uname", "-m"], check=True).stdout.strip() == "aarch64"
    manifest = json.loads((images / "arm64-cloud@aarch64/current/manifest.json").read_text())
    assert (manifest["firmware"], manifest["arch"]) == ("uefi", "aarch64")
    assert manifest["info"]["source"] == f"{mirror.url}/arm64.qcow2"
