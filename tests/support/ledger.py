"""Ledger helpers for tests: reading a state directory's rows, a dead owner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmlease._identity import Owner, current_owner
from vmlease._ledger import Event, Ledger, Record
from vmlease._session import Session

T = TypeVar("T")


def ledger_records(state: Path) -> list[Record]:
    """Every row of ``state``'s ledger, deleted VMs included, oldest first."""
    ledger = Ledger(state / "ledger.sqlite3")
    try:
        return ledger.records(include_gone=True)
    finally:
        ledger.close()


def dead_owner() -> Owner:
    """The identity of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return dataclasses.replace(current_owner("deadsess"), pid=child.pid, start_time=1)


class LedgerView:
    """A test's read of a state directory's ledger: each call opens its own connection."""

    def __init__(self, state: Path) -> None:
        self._path = state / "ledger.sqlite3"

    def _read(self, fn: Callable[[Ledger], T]) -> T:
        ledger = Ledger(self._path, create=False)
        try:
            return fn(ledger)
        finally:
            ledger.close()

    def records(self, *, include_gone: bool = False) -> list[Record]:
        return self._read(lambda ledger: ledger.records(include_gone=include_gone))

    def find(self, backend: str, name: str) -> Record | None:
        return self._read(lambda ledger: ledger.find(backend, name))

    def events(self, vm_id: int) -> list[Event]:
        return self._read(lambda ledger: ledger.events(vm_id))


def ledger_of(session: Session) -> LedgerView:
    """What ``session``'s ledger holds, read as another process would."""
    return LedgerView(session.state_dir)
