"""Snapshots on QEMU: memory and disk come back; the clock does not go back."""

from __future__ import annotations

import time

import pytest

import vmlease


def test_restore_brings_back_disk_and_memory(session: vmlease.Session) -> None:
    vm = session.create()
    vm.run(["sh", "-c", "echo before > /root/kept"], check=True)
    vm.run(["sh", "-c", "sleep 1000 & echo $! > /run/sleeper"], check=True)
    vm.snapshot("clean")
    vm.run(["sh", "-c", "echo after > /root/new; echo changed > /root/kept"], check=True)
    vm.run(["sh", "-c", "kill $(cat /run/sleeper)"], check=True)
    vm.restore("clean")
    assert vm.run(["cat", "/root/kept"]).stdout == "before\n"
    assert vm.run(["ls", "/root/new"]).exit_code != 0
    # Memory too: the process killed after the snapshot runs again.
    pid = vm.run(["cat", "/run/sleeper"]).stdout.strip()
    assert vm.run(["kill", "-0", pid]).exit_code == 0
    # Restoring twice works, and the VM keeps working in between.
    vm.run(["touch", "/root/again"], check=True)
    vm.restore("clean")
    assert vm.run(["ls", "/root/again"]).exit_code != 0


def test_the_guest_clock_is_current_after_a_restore(session: vmlease.Session) -> None:
    vm = session.create()
    vm.snapshot("then")
    time.sleep(2.5)
    vm.restore("then")
    guest = int(vm.run(["date", "+%s"]).stdout)
    assert abs(guest - time.time()) < 2


def test_a_snapshot_can_be_replaced(session: vmlease.Session) -> None:
    vm = session.create()
    vm.snapshot("s")
    vm.run(["touch", "/root/one"], check=True)
    vm.snapshot("s")
    vm.run(["touch", "/root/two"], check=True)
    vm.restore("s")
    assert vm.run(["ls", "/root/one"]).exit_code == 0
    assert vm.run(["ls", "/root/two"]).exit_code != 0


def test_restoring_an_unknown_snapshot_says_so(session: vmlease.Session) -> None:
    vm = session.create()
    with pytest.raises(vmlease.SnapshotNotFound, match="nosuch"):
        vm.restore("nosuch")
    assert vm.run(["true"]).exit_code == 0


@pytest.mark.parametrize("tag", ["", "-x", "a b", "x" * 65, "semi;colon", 3])
def test_bad_snapshot_names_are_refused(shared_vm: vmlease.VM, tag: object) -> None:
    with pytest.raises(vmlease.ConfigError, match="snapshot name"):
        shared_vm.snapshot(tag)  # type: ignore[arg-type]
