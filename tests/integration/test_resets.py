"""Resets without a snapshot: a VM started from a mapped booted state starts again
from it (a new QEMU, a new disk overlay), with real QEMU.

Each test gets its own image directory (the tiny image linked in), so its
booted states start empty and are its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._qmp import QMP, host_forwards


@pytest.fixture
def session(state: Path, images: Path) -> Iterator[vmlease.Session]:
    backend = QemuBackend(state_dir=state, image_dir=images)
    with vmlease.Session(backend=backend, state_dir=state) as made:
        yield made


def the_state(images: Path) -> Path:
    [saved] = [p for p in (images / "_warm").iterdir() if not p.name.startswith(".")]
    return saved


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_pid(state: Path, vm: vmlease.VM) -> int:
    return int((state / "qemu" / vm.name / "qemu.pid").read_text())


def test_a_reset_brings_back_disk_memory_and_name_and_keeps_forwards(
    session: vmlease.Session, state: Path, images: Path
) -> None:
    vm = session.create(network="user")
    assert vm.can_reset
    port = vm.forward(8080)
    before = qemu_pid(state, vm)
    vm.run(["sh", "-c", "echo dirt > /root/dirt && echo ram > /dev/shm/ram && hostname other"])
    vm.snapshot("mine")
    vm.reset()
    assert qemu_pid(state, vm) != before  # a new QEMU, not a loadvm
    assert vm.run(["test", "-e", "/root/dirt"]).exit_code == 1
    assert vm.run(["test", "-e", "/dev/shm/ram"]).exit_code == 1
    assert vm.run(["hostname"]).stdout.strip() == vm.name
    assert abs(int(vm.run(["date", "+%s"]).stdout) - time.time()) < 5
    # The forward is back on the same host port, and the ledger still says so.
    with QMP(state / "qemu" / vm.name / "qmp.sock") as qmp:
        assert host_forwards(qmp.hmp("info usernet")) == {8080: port}
    assert vm.forward(8080) == port
    # Snapshots taken since it was made are gone with its disk.
    with pytest.raises(vmlease.VMLeaseError, match="mine"):
        vm.restore("mine")
    console = session.backend.console_tail(vm.name, 200)
    assert console.count(f"vmlease: guest {vm.name} up, started from booted state") >= 2


def test_vms_of_one_state_share_its_memory_file_which_never_changes(
    session: vmlease.Session, state: Path, images: Path
) -> None:
    first = session.create()
    ram = the_state(images) / "ram"
    digest = sha256(ram)
    vms = [first, session.create(), session.create()]
    for vm in vms:
        vm.run(["sh", "-c", "head -c 4000000 /dev/urandom > /dev/shm/noise"], check=True)
        vm.reset()
        vm.run(["sh", "-c", "head -c 4000000 /dev/urandom > /dev/shm/noise"], check=True)
    for vm in vms:
        maps = Path(f"/proc/{qemu_pid(state, vm)}/maps").read_text()
        # Mapped private (copy-on-write) from the state's file, by every VM.
        assert any(str(ram) in line and " rw-p " in line for line in maps.splitlines())
    session.close()
    assert sha256(ram) == digest
    assert ram.stat().st_mode & 0o777 == 0o600
    # The state's own folder lost its users with the VMs; no half-made state is left.
    assert not any((the_state(images) / ".users").iterdir())
    assert [p.name for p in (images / "_warm").iterdir() if p.name.startswith(".")] == []


def test_a_vm_that_booted_cannot_reset_and_says_what_to_use(
    state: Path, images: Path, tiny_image: Image
) -> None:
    backend = QemuBackend(state_dir=state, image_dir=images, env={"VMLEASE_QEMU_WARM": "off"})
    with vmlease.Session(backend=backend, state_dir=state) as session:
        vm = session.create()
        assert not vm.can_reset
        with pytest.raises(vmlease.UnsupportedOperation, match=r"vm\.snapshot\(\)"):
            vm.reset()
        assert vm.run(["true"]).exit_code == 0  # nothing was touched
    assert_nothing_left(state)
