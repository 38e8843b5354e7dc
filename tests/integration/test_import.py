"""``vmlease image import``: a cloud image served over HTTP from 127.0.0.1, set up once
by cloud-init with vmlease's seed, then a normal image whose VMs never run cloud-init."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.support.cloud_image import build_cloud_image
from tests.support.killing import reapers_under, wait_until
from tests.support.procs import processes_under
from tests.support.serve import Served, serve
from tests.support.serve import cloud_source as built_cloud_source
from vmlease._paths import image_dir
from vmlease.backends.guest.images import Image, load_current

pytestmark = pytest.mark.timeout(900)

USER_DATA = """#cloud-config
write_files:
  - path: /etc/vmlease-import-test
    content: "from the user's cloud-config\\n"
runcmd:
  - [sh, -c, "echo user-runcmd > /var/tmp/user-runcmd"]
"""


@pytest.fixture(scope="module")
def cloud_source() -> Path:
    """The cloud-style image (Debian, cloud-init, no agent, no keys), built once."""
    return built_cloud_source()


@pytest.fixture(scope="module")
def server(cloud_source: Path) -> Iterator[Served]:
    """An HTTP server on 127.0.0.1 serving the image as cloud.qcow2; stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vmlease-served-"))
    (root / "cloud.qcow2").symlink_to(cloud_source)
    (root / "notes.txt").write_text("not a disk image\n" * 100)
    try:
        with serve(root) as served:
            yield served
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    """An image cache of this module's own (imports, and their saved states)."""
    path = Path(tempfile.mkdtemp(prefix="vmlease-imports-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vmlease_cli(
    images: Path,
    *args: str,
    retry: str = "",
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMLEASE_IMAGE_DIR": str(images), **(env or {})}
    if retry:
        env["VMLEASE_RETRY"] = retry
    return subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_cloudy(
    images: Path, server: Served, cloud_source: Path
) -> subprocess.CompletedProcess[str]:
    """Import the served image as ``cloudy``, pinned by its sha256, with USER_DATA."""
    url = f"{server.url}/cloud.qcow2"
    user_data = str(images / "user-data.yaml")
    sha = _sha256(cloud_source)
    return vmlease_cli(
        images, "image", "import", "cloudy", url, "--sha256", sha, "--user-data", user_data
    )


@pytest.fixture(scope="module")
def imported(images: Path, server: Served, cloud_source: Path) -> Image:
    (images / "user-data.yaml").write_text(USER_DATA)
    done = _import_cloudy(images, server, cloud_source)
    assert done.returncode == 0, done.stderr
    assert "downloading" in done.stderr
    assert "cloud-init finished" in done.stderr
    return load_current(images, "cloudy")


@pytest.fixture
def cloud_session(state: Path, images: Path) -> Iterator[vmlease.Session]:
    with vmlease.Session(state_dir=state, backend_options={"image_dir": images}) as s:
        yield s


def _sh(vm: vmlease.VM, line: str) -> str:
    return vm.run(["sh", "-c", line], check=True, timeout_s=120).stdout.strip()


def test_an_imported_image_is_set_up_by_the_seed_and_never_runs_cloud_init_again(
    imported: Image, cloud_session: vmlease.Session
) -> None:
    assert imported.ssh_user == "vmlease"
    assert imported.info["os"].startswith("Debian GNU/Linux 12")
    vm = cloud_session.create(image="cloudy", memory_mb=512)
    assert _sh(vm, "hostname") == vm.name
    assert _sh(vm, "systemctl is-active vmlease-agent.service") == "active"
    assert _sh(vm, "systemctl is-system-running") in ("running", "degraded")
    # cloud-init ran once, at the import: disabled since, and not run by this boot.
    assert "disabled" in _sh(vm, "cloud-init status || true")
    assert _sh(vm, "systemctl is-active cloud-init.service || true") == "inactive"
    # The user's cloud-config ran on the first boot, merged with vmlease's.
    assert _sh(vm, "cat /etc/vmlease-import-test") == "from the user's cloud-config"
    assert _sh(vm, "cat /var/tmp/user-runcmd") == "user-runcmd"
    # The SSH user: key only, passwordless sudo, no password anywhere.
    assert _sh(vm, "id -un vmlease") == "vmlease"
    shadow = _sh(vm, "cut -d: -f2 /etc/shadow | sort -u")
    assert set(shadow.split()) <= {"*", "!", "!*"}, shadow
    assert "passwordauthentication no" in _sh(vm, "sshd -T").lower().splitlines()
    ssh = vm.ssh
    assert ssh.user == "vmlease"
    done = subprocess.run(
        ssh.argv(["sudo", "-n", "id", "-u"]), capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, "0"), done.stderr


def test_later_vms_of_an_imported_image_start_from_its_saved_state(
    imported: Image, cloud_session: vmlease.Session
) -> None:
    first = cloud_session.create(image="cloudy", memory_mb=512)
    second = cloud_session.create(image="cloudy", memory_mb=512)
    record = json.loads((cloud_session.state_dir / "qemu" / second.name / "vm.json").read_text())
    assert record.get("warm"), "the second VM booted instead of starting from the saved state"
    assert _sh(second, "hostname") == second.name
    assert _sh(first, "hostname") == first.name
    assert "disabled" in _sh(second, "cloud-init status || true")


def test_a_vm_can_log_in_as_another_user_and_grow_its_disk(
    imported: Image, cloud_session: vmlease.Session
) -> None:
    vm = cloud_session.create(image="cloudy", memory_mb=512, user="root", disk_gb=4)
    ssh = vm.ssh
    assert ssh.user == "root"
    done = subprocess.run(ssh.argv(["id", "-un"]), capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "root"), done.stderr
    # growpart and resize2fs took the root file system to the 4 GiB disk.
    size = int(_sh(vm, "df --output=size -B1 / | tail -1"))
    assert size > 3 * 2**30 > imported.disk_bytes, size


def test_a_user_the_image_lacks_is_refused_and_nothing_is_left(
    imported: Image, cloud_session: vmlease.Session
) -> None:
    with pytest.raises(vmlease.InvalidSpec, match="has no user 'nobody2'"):
        cloud_session.create(image="cloudy", memory_mb=512, user="nobody2")
    assert cloud_session.vms() == []


def test_importing_again_finds_the_image_up_to_date_without_downloading(
    imported: Image, images: Path, server: Served, cloud_source: Path
) -> None:
    before = len(server.requests)
    done = _import_cloudy(images, server, cloud_source)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stderr
    assert done.stdout.strip() == str(imported.path)
    assert len(server.requests) == before


def _nothing_kept(images: Path, name: str) -> None:
    home = images / name
    left = sorted(p.name for p in home.iterdir()) if home.is_dir() else []
    assert left == [], f"an import that failed left {left} in {home}"


def test_a_killed_import_leaves_no_qemu_running_and_nothing_in_the_ledger(
    images: Path, server: Served, cloud_source: Path, tmp_path: Path
) -> None:
    """SIGKILL of `vmlease image import` mid-boot: its first boot is a VM of a session's,
    so the reaper deletes it as it does any dead owner's VM."""
    state = tmp_path / "state"
    env = {**os.environ, "VMLEASE_IMAGE_DIR": str(images), "VMLEASE_STATE_DIR": str(state)}
    url = f"{server.url}/cloud.qcow2"
    argv = [sys.executable, "-m", "vmlease", "image", "import", "killed", url]
    with subprocess.Popen(
        [*argv, "--sha256", _sha256(cloud_source)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    ) as importer:

        def first_boot() -> list[int]:  # wherever it runs
            return processes_under(state, b"qemu-system") + processes_under(
                images / "killed", b"qemu-system"
            )

        try:
            assert wait_until(first_boot, 300), "the import's first boot never started"
        finally:
            importer.kill()
            importer.wait()
    killed = time.monotonic()
    assert wait_until(lambda: not first_boot(), 10), "the killed import's QEMU still runs"
    gone_after = time.monotonic() - killed
    listed = vmlease_cli(images, "ls", "--json", env={"VMLEASE_STATE_DIR": str(state)})
    assert json.loads(listed.stdout) == {"vms": []}, (listed.stdout, gone_after)
    assert wait_until(lambda: not reapers_under(state), 15)


def test_a_checksum_mismatch_keeps_nothing(images: Path, server: Served) -> None:
    done = vmlease_cli(
        images, "image", "import", "bad-sum", f"{server.url}/cloud.qcow2", "--sha256", "ab" * 32
    )
    assert done.returncode == 1
    assert "not the sha256:abab" in done.stderr
    assert "Nothing was kept" in done.stderr
    _nothing_kept(images, "bad-sum")


def test_a_url_that_does_not_answer_is_retried_then_reported(images: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = vmlease_cli(
        images,
        "image",
        "import",
        "no-answer",
        f"http://127.0.0.1:{port}/cloud.qcow2",
        retry="attempts=3,waits=off",
    )
    assert done.returncode == 1
    assert "did not answer" in done.stderr
    assert "after 3 attempt(s)" in done.stderr, done.stderr
    _nothing_kept(images, "no-answer")


def test_a_missing_file_on_the_server_fails_at_once(images: Path, server: Served) -> None:
    before = len(server.requests)
    done = vmlease_cli(images, "image", "import", "missing", f"{server.url}/nothing.qcow2")
    assert done.returncode == 1
    assert "404" in done.stderr
    assert "check the URL" in done.stderr
    assert len(server.requests) == before + 1  # a 404 is not retried
    _nothing_kept(images, "missing")


def test_a_source_that_is_not_a_disk_image_is_refused(
    images: Path, server: Served, tmp_path: Path
) -> None:
    done = vmlease_cli(images, "image", "import", "notes", f"{server.url}/notes.txt")
    assert done.returncode == 1
    assert "not a disk image" in done.stderr
    _nothing_kept(images, "notes")
    packed = tmp_path / "cloud.qcow2.xz"
    packed.write_bytes(b"\xfd7zXZ\x00" + b"\0" * 4096)
    done = vmlease_cli(images, "image", "import", "packed", str(packed))
    assert done.returncode == 1
    assert "compressed with xz" in done.stderr
    assert "unxz" in done.stderr
    _nothing_kept(images, "packed")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["debian-12", "x.qcow2"], "is an image vmlease builds"),
        (["Bad Name", "x.qcow2"], "cannot name an image"),
        (["ok", "/no/such/file.qcow2"], "does not exist"),
        (["ok", "ftp://host/x.qcow2"], "http:// or https://"),
        (["ok", "x.qcow2", "--sha256", "xyz"], "64 hexadecimal digits"),
        (["ok", "x.qcow2", "--user", "Root Admin"], "not a user name"),
    ],
)
def test_bad_import_arguments_are_refused_before_anything_is_made(
    images: Path, tmp_path: Path, args: list[str], said: str
) -> None:
    (tmp_path / "x.qcow2").write_bytes(b"\0" * 1024)
    done = subprocess.run(
        [sys.executable, "-m", "vmlease", "image", "import", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "VMLEASE_IMAGE_DIR": str(images)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert said in done.stderr
    _nothing_kept(images, args[0])


def test_user_data_that_cloud_init_cannot_read_is_refused(images: Path, tmp_path: Path) -> None:
    (tmp_path / "x.qcow2").write_bytes(b"\0" * 1024)
    (tmp_path / "user-data").write_text("packages: [nginx]\n")
    done = vmlease_cli(
        images,
        "image",
        "import",
        "ok",
        str(tmp_path / "x.qcow2"),
        "--user-data",
        str(tmp_path / "user-data"),
    )
    assert done.returncode == 1
    assert "first line must be '#cloud-config'" in done.stderr


@pytest.mark.slow  # builds a second cloud image, then waits out a boot with no seed
def test_an_image_without_cloud_init_needs_no_seed_and_keeps_nothing(images: Path) -> None:
    source = build_cloud_image(image_dir().parent / "test-data", cloud_init=False)
    done = vmlease_cli(images, "image", "import", "no-cloud-init", str(source), timeout=600)
    assert done.returncode == 1
    assert "without running cloud-init" in done.stderr
    assert "--no-seed" in done.stderr
    _nothing_kept(images, "no-cloud-init")
    assert processes_under(images, b"qemu-system") == []


@pytest.mark.slow  # a second boot of the import, on a libvirt host
def test_an_imported_image_boots_through_its_bios_under_libvirt(
    imported: Image, images: Path, state: Path, request: pytest.FixtureRequest
) -> None:
    """The same import on a libvirt host: q35, the BIOS, its NIC where cloud-init configured it."""
    daemon = request.getfixturevalue("libvirt_daemon")
    from vmlease.backends.libvirt import LibvirtBackend

    backend = LibvirtBackend(uris=[daemon.unix_uri], state_dir=state, image_dir=images)
    with vmlease.Session(backend=backend, state_dir=state) as session:
        vm = session.create(image="cloudy", memory_mb=512, boot_timeout_s=180)
        assert _sh(vm, "systemctl is-system-running || true") in ("running", "degraded")
        assert _sh(vm, "hostname") == vm.name
        assert "10.0.2.15/24" in _sh(vm, "ip -br addr show enp0s4")
        assert _sh(vm, "getent hosts deb.debian.org") != ""
