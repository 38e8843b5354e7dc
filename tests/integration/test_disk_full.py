"""A full disk under the state directory: an error in seconds, deletes that do not
wait on the ledger, and a ledger that tells the truth once space is back.

The state directory is a small tmpfs; the image cache stays where it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.disks import CannotMount, fill, small_filesystem
from tests.support.killing import leftovers, start_owner, wait_until
from tests.support.ledger import ledger_records
from vmlease._cleanup import Action, cleanup
from vmlease._ledger import Ledger, VMState
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_state(tiny_image: Image) -> Iterator[Path]:
    """A state directory on a 48 MiB file system of its own."""
    with contextlib.ExitStack() as stack:
        try:
            mount = stack.enter_context(small_filesystem(48))
        except CannotMount as exc:
            pytest.skip(str(exc))
        state = mount / "state"
        yield state
        assert_nothing_left(state)


def _ledger_is_unwritable(state: Path) -> bool:
    ledger = Ledger(state / "ledger.sqlite3", create=False)
    try:
        ledger.note(1, VMState.READY, "probe")
    except vmlease.LedgerError as exc:
        return "full" in str(exc)
    finally:
        ledger.close()
    return False


def _settle(state: Path) -> list[vmlease.VMState]:
    """Space is back: one cleanup, then every row's state."""
    outcomes = cleanup(state)
    assert not [o for o in outcomes if o.action.needs_a_person]
    return [r.state for r in ledger_records(state)]


def test_a_guest_that_fills_the_disk_gets_disk_full_and_leaving_deletes_it(
    small_state: Path,
) -> None:
    with vmlease.Session(state_dir=small_state) as session:
        vm = session.create()
        with pytest.raises(vmlease.DiskFull) as info:
            vm.run(["dd", "if=/dev/zero", "of=/root/big", "bs=1M", "count=200"], timeout_s=100)
        message = str(info.value)
        assert str(small_state / "qemu" / vm.name / "disk.qcow2") in message
        assert "free" in message
        assert "VMLEASE_STATE_DIR" in message
        assert info.value.free_bytes is not None
        # Whatever room was left goes too: the ledger cannot record the delete.
        filler = fill(small_state.parent)
        assert _ledger_is_unwritable(small_state)
    assert_nothing_left(small_state)
    filler.unlink()
    assert _settle(small_state) == [VMState.GONE]


def test_cleanup_all_deletes_vms_while_the_disk_is_full(small_state: Path) -> None:
    with vmlease.Session(state_dir=small_state) as session:
        kept = session.create()
        kept.keep()
    filler = fill(small_state.parent)
    assert _ledger_is_unwritable(small_state)
    [outcome] = cleanup(small_state, everything=True)
    assert outcome.action is Action.DELETED
    assert "not recorded" in (outcome.error or "")
    assert_nothing_left(small_state)
    filler.unlink()
    assert _settle(small_state) == [VMState.GONE]


def test_the_reaper_deletes_a_killed_owners_vm_while_the_disk_is_full(small_state: Path) -> None:
    small_state.mkdir(mode=0o700)
    owner = start_owner(small_state)
    owner.wait_for("READY")
    filler = fill(small_state.parent)
    assert _ledger_is_unwritable(small_state)
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.finish()
    assert wait_until(lambda: not [x for x in leftovers(small_state) if "ledger" not in x], 10.0)
    filler.unlink()
    assert _settle(small_state) == [VMState.GONE]


def test_a_create_that_cannot_fit_refuses_before_anything_starts(small_state: Path) -> None:
    small_state.mkdir(mode=0o700)
    with vmlease.Session(state_dir=small_state) as session:
        filler = fill(small_state.parent)
        try:
            with pytest.raises(vmlease.DiskFull, match=r"free at .*needed") as info:
                session.create()
        finally:
            filler.unlink()
        assert info.value.needed_bytes is not None
        assert ledger_records(small_state) == []
    assert leftovers(small_state) == []
