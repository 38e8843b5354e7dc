"""Faults of the machinery under a VM: what users see, and that nothing is left.

QEMU killed from outside, a guest kernel panic, a hung owner past its lease.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.killing import leftovers, start_owner, wait_until
from tests.support.ledger import ledger_records
from vmlease._attach import exec_in


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


def _qemu_pid(state: Path, vm: vmlease.VM) -> int:
    return int((state / "qemu" / vm.name / "qemu.pid").read_text())


def test_a_stopped_qemu_ends_each_operation_at_its_deadline(state: Path, tmp_path: Path) -> None:
    """A QEMU that stops (SIGSTOP) answers neither its agent nor its monitor: a
    command, a copy and a snapshot each fail at their deadline, saying which
    operation of which VM and why; once QEMU goes on, so does the VM."""
    policy = vmlease.RetryPolicy(attempts=1, timeouts=vmlease.Timeouts(snapshot_s=3))
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 << 20))
    with vmlease.Session(state_dir=state, retry=policy) as session:
        vm = session.create()
        vm.run(["true"], check=True)
        pid = _qemu_pid(state, vm)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            said = rf"VM {vm.name}: command \['true'\].* within .*QEMU process .* is stopped"
            with pytest.raises(vmlease.ChannelError, match=said):
                vm.run(["true"], timeout_s=3)
            took = time.monotonic() - started
            assert took < 5, f"{took:.1f} s"
            with pytest.raises(vmlease.ChannelError, match=f"VM {vm.name}: put of {big}"):
                vm.put(big, "/root/big", timeout_s=3)
            with pytest.raises(vmlease.BackendTimeout, match="savevm"):
                vm.snapshot("s")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert vm.run(["echo", "back"]).stdout == "back\n"
        assert vm.run(["test", "-e", "/root/big"]).exit_code == 1  # no partial file
    assert_nothing_left(state)


def test_a_guest_agent_that_stops_reading_fails_a_put_at_its_deadline(
    session: vmlease.Session, state: Path, tmp_path: Path
) -> None:
    vm = session.create()
    # The agent serving this session's port stops itself a moment after answering.
    agent = vm.run(["sh", "-c", 'echo "$PPID"; (sleep 1; kill -STOP "$PPID") >/dev/null 2>&1 &'])
    pid = agent.stdout.strip()
    time.sleep(1.5)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 << 20))  # more than the channel's buffers hold
    started = time.monotonic()
    with pytest.raises(vmlease.ChannelError, match=f"VM {vm.name}: put of {big} to /root/big"):
        vm.put(big, "/root/big", timeout_s=3)
    took = time.monotonic() - started
    assert took < 5, f"{took:.1f} s"
    # Another process's way in still works: it wakes the agent up again.
    assert exec_in(state, vm.name, ["kill", "-CONT", pid]).exit_code == 0
    assert vm.run(["echo", "back"]).stdout == "back\n"
    listing = vm.run(["ls", "-a", "/root"]).stdout
    assert "big" not in listing, listing  # the partial upload was removed
