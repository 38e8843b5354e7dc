"""Real QEMU VMs. Every test gets its own state directory and must leave it empty."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.conftest import _qemu_processes_under
from tests.doubles.tools import double, doubles_bin  # noqa: F401 - fixtures
from tests.support.libvirtd import LibvirtDaemon, SSHGate, missing_tools
from vmlease._paths import image_dir
from vmlease.backends.guest.images import Image, build_debian, build_tiny


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_image() -> Image:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return build_tiny(image_dir())


@pytest.fixture(scope="session")
def tiny_arm64_image(tiny_image: Image) -> Image:
    """tiny for arm64, built from the archive's arm64 packages on first use (about 5 s)."""
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    return build_tiny(image_dir(), arch="aarch64")


@pytest.fixture(scope="session")
def debian_image(tiny_image: Image) -> Image:
    """debian-12, built from the Debian archive on first use (about 40 s)."""
    return build_debian(image_dir(), "debian-12")


def assert_nothing_left(state: Path) -> None:
    pids = _qemu_processes_under(state)
    qemu_dir = state / "qemu"
    dirs = sorted(p.name for p in qemu_dir.iterdir() if p.is_dir()) if qemu_dir.is_dir() else []
    assert (pids, dirs) == ([], []), f"left behind: qemu pids {pids}, VM directories {dirs}"


@pytest.fixture
def state(state_root: Path, request: pytest.FixtureRequest, tiny_image: Image) -> Iterator[Path]:
    """A state directory for this test only; checked empty afterwards."""
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:30] + "-", dir=state_root))
    yield path
    assert_nothing_left(path)


@pytest.fixture
def images(tmp_path: Path, tiny_image: Image) -> Path:
    """An image directory of this test's own, the tiny image linked in: its saved
    booted states start empty and are its own."""
    path = tmp_path / "images"
    path.mkdir()
    (path / "tiny").symlink_to(tiny_image.path.parent)
    return path


@pytest.fixture
def session(state: Path) -> Iterator[vmlease.Session]:
    with vmlease.Session(state_dir=state) as s:
        yield s


@pytest.fixture(scope="module")
def shared_vm(state_root: Path, tiny_image: Image) -> Iterator[vmlease.VM]:
    """One VM for tests that only run commands, to spare boots."""
    path = state_root / "shared"
    path.mkdir(exist_ok=True)
    with vmlease.Session(state_dir=path) as s:
        yield s.create()
    assert_nothing_left(path)


def libvirt_cache() -> Path:
    """libvirtd's cache of QEMU's capabilities, kept between runs beside the image cache."""
    return image_dir().parent / "test-data" / "libvirt-cache"


@pytest.fixture(scope="session")
def libvirt_daemon(tiny_image: Image) -> Iterator[LibvirtDaemon]:
    """A private libvirtd (and virtlogd) for the run: the libvirt backend's host."""
    why = missing_tools()
    if why:
        pytest.skip(f"libvirt: {why}")
    daemon = LibvirtDaemon(cache=libvirt_cache()).start()
    try:
        yield daemon
    finally:
        left = daemon.qemu_pids()
        daemon.stop()
    assert not left, f"left behind on the libvirt host: qemu pids {left}"


@pytest.fixture(scope="session")
def ssh_gate(libvirt_daemon: LibvirtDaemon) -> Iterator[SSHGate]:
    """A throwaway sshd on 127.0.0.1, for qemu+ssh:// URIs to ``libvirt_daemon``."""
    gate = SSHGate(libvirt_daemon).start()
    yield gate
    gate.stop()


@pytest.fixture
def libvirt_uri(libvirt_daemon: LibvirtDaemon, monkeypatch: pytest.MonkeyPatch) -> str:
    """The private libvirtd's URI, set as VMLEASE_LIBVIRT_URIS for this test."""
    monkeypatch.setenv("VMLEASE_LIBVIRT_URIS", libvirt_daemon.unix_uri)
    return libvirt_daemon.unix_uri
