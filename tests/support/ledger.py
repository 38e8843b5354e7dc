"""Ledger helpers for tests: reading a state directory's rows, a dead owner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from vmlease._identity import Owner, current_owner
from vmlease._ledger import Ledger, Record


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
