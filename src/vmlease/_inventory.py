"""What vmlease owns, joined with what the backends report: the data behind ``vmlease ls``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from vmlease import backends as _backends
from vmlease._cleanup import Standing, status
from vmlease._errors import VMLeaseError
from vmlease._identity import Liveness, liveness
from vmlease._ledger import Ledger, Record
from vmlease.backends import BackendVM

__all__ = ["InventoryRow", "inventory"]


@dataclass(frozen=True, slots=True)
class InventoryRow:
    """One VM in the ledger with its backend's view.

    Attributes:
        record: the ledger row.
        actual: the backend's state (``running``, ``stopped``), ``missing`` if
            the backend does not have it, ``?`` if the backend cannot be asked.
        owner: whether the owning process is alive.
        status: ``alive``, ``orphaned`` (owner dead), ``expired`` (past its
            lease) or ``unknown`` (owned from another host).
        age_s: seconds since the row was written.
        memory_bytes: the host memory the VM holds (QEMU's proportional set:
            memory it shares with other VMs, such as a booted state's, counted
            as its share), if the backend tells.
        disk_bytes: the host disk its own disk takes (an overlay on its image:
            what it wrote), if the backend tells.
        start: how it started, if the backend tells (QEMU: ``booted``, ``mapped
            state`` or ``stream state``).
    """

    record: Record
    actual: str
    owner: Liveness
    status: Standing
    age_s: float
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    start: str | None = None

    @property
    def arch(self) -> str | None:
        """The guest's architecture, as its spec says (None for a row that does not)."""
        try:
            found = json.loads(self.record.spec).get("arch")
        except (ValueError, AttributeError):
            return None
        return str(found) if found else None

    def as_dict(self) -> dict[str, object]:
        r = self.record
        return {
            "name": r.name,
            "backend": r.backend,
            "state": r.state.value,
            "actual": self.actual,
            "owner": self.owner.value,
            "status": self.status.value,
            "session_id": r.owner.session_id,
            "pid": r.owner.pid,
            "host": r.owner.host,
            "age_s": round(self.age_s, 1),
            "created_at": r.created_at,
            "expires_at": r.expires_at,
            "error": r.error,
            "mark": r.instance_id,
            "forwards": {str(k): v for k, v in sorted(r.forwards.items())},
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "start": self.start,
            "arch": self.arch,
        }


def _number(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def inventory(state_dir: Path, *, include_gone: bool = False) -> list[InventoryRow]:
    """Every VM in the ledger under ``state_dir``; empty if there is no ledger yet."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    ledger = Ledger(path, create=False)
    try:
        records = ledger.records(include_gone=include_gone)
    finally:
        ledger.close()
    seen: dict[str, dict[str, BackendVM] | None] = {}
    for name in sorted({r.backend for r in records}):
        try:
            backend = _backends.get(name, state_dir=state_dir)
            seen[name] = {vm.name: vm for vm in backend.list()}
            backend.close()
        except VMLeaseError:
            seen[name] = None
    now = time.time()
    rows = []
    for r in records:
        found = seen.get(r.backend)
        vm = None if found is None else found.get(r.name)
        actual = "?" if found is None else vm.state if vm is not None else "missing"
        detail = vm.detail if vm is not None else {}
        rows.append(
            InventoryRow(
                r,
                actual,
                liveness(r.owner),
                status(r, now),
                now - r.created_at,
                memory_bytes=_number(detail.get("memory_bytes")),
                disk_bytes=_number(detail.get("disk_bytes")),
                start=detail.get("start"),
            )
        )
    return rows
