"""Faults of the machinery under a VM: what users see, and that nothing is left.

QEMU killed from outside, a guest kernel panic, a hung owner past its lease.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.killing import leftovers, start_owner, wait_until
from tests.support.ledger import ledger_records


def test_qemu_killed_from_outside_is_reported_as_gone(
    session: vmlease.Session, state: Path
) -> None:
    vm = session.create()
    pid = int((state / "qemu" / vm.name / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(vmlease.ChannelError, match=f"VM {vm.name} is gone: its QEMU process ended"):
        vm.run(["true"])
    vm.delete()
    assert_nothing_left(state)


def test_a_guest_kernel_panic_shows_the_consoles_words(session: vmlease.Session) -> None:
    vm = session.create()
    with pytest.raises(vmlease.ChannelError, match="is gone") as info:
        vm.run(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    assert "Kernel panic - not syncing: sysrq triggered crash" in str(info.value)


def test_a_hung_owners_vm_is_reaped_once_its_lease_runs_out(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMLEASE_REAPER_SWEEP_S", "0.5")  # the reaper this owner starts
    owner = start_owner(state, "--count", "1", "--max-age", "2")
    owner.wait_for("READY")
    os.kill(owner.proc.pid, signal.SIGSTOP)  # hung: alive, registered, silent
    try:
        assert wait_until(lambda: not leftovers(state), 15.0, every_s=0.1), leftovers(state)
        [row] = ledger_records(state)
        assert row.state is vmlease.VMState.GONE
    finally:
        os.kill(owner.proc.pid, signal.SIGKILL)
        owner.finish()
