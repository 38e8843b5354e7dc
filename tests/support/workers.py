"""Functions that run in child processes for the concurrency tests (spawned,
so they live in an importable module)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.doubles.fakes import FakeBackend
from vmlease import Session
from vmlease._naming import new_session_id, vm_name


def hold_vms(state: str, out: str, rounds: int) -> None:
    """Create and delete VMs under a VM limit of 2; log when each one existed."""
    with (
        Session(
            backend=FakeBackend(), state_dir=state, reaper=False, sweep=False, max_vms=2
        ) as session,
        Path(out).open("a") as log,
    ):
        for _ in range(rounds):
            vm = session.create()
            began = time.time()
            time.sleep(0.03)
            ended = time.time()
            vm.delete()
            log.write(json.dumps([began, ended]) + "\n")


def make_names(out: str, count: int, worker: int) -> None:
    """``count`` names as sessions make them: a new session id each, tagged like a worker."""
    prefixes = ("vmlease", "a" * 70, "ci-run")
    names = [
        vm_name(prefixes[i % 3], new_session_id(), i + 1, f"gw{worker}" if i % 2 else "")
        for i in range(count)
    ]
    Path(out).write_text("\n".join(names))


def claim_vms(state: str, session_id: str, count: int) -> None:
    """``count`` VMs created in one session shared with other processes."""
    with Session(
        backend=FakeBackend(), state_dir=state, session_id=session_id, reaper=False, sweep=False
    ) as session:
        for _ in range(count):
            session.create()


def open_ledger(path: str, start_at: float) -> None:
    """Open (and so create) the ledger at ``path`` at ``start_at``, with the other workers."""
    from vmlease._ledger import Ledger

    time.sleep(max(0.0, start_at - time.time()))
    Ledger(Path(path)).close()
