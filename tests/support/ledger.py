"""Reading a state directory's ledger from a test."""

from __future__ import annotations

from pathlib import Path

from vmlease._ledger import Ledger, Record


def ledger_records(state: Path) -> list[Record]:
    """Every row of ``state``'s ledger, deleted VMs included, oldest first."""
    ledger = Ledger(state / "ledger.sqlite3")
    try:
        return ledger.records(include_gone=True)
    finally:
        ledger.close()
