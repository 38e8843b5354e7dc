"""Deleting what we own and nothing else: the policy shared by the reaper,
the sweep at session start and ``vmlease cleanup``.

Deletion is authorised by the ledger alone. A VM that is not in the ledger is
never deleted, whatever its name; a VM in the ledger is deleted only when its
owner is provably dead (pid, start time and boot id), its lease has expired,
or a user asked for everything (``cleanup --all``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmlease import backends as _backends
from vmlease._errors import VMLeaseError, VMNotFound
from vmlease._identity import Liveness, liveness
from vmlease._ledger import Ledger, Record, VMState
from vmlease.backends import Backend

__all__ = [
    "Backends",
    "Outcome",
    "Status",
    "cleanup",
    "delete_records",
    "find_reapable",
    "status",
]


class Status(enum.StrEnum):
    """Whose VM this is, as far as deletion is concerned."""

    ALIVE = "alive"  # its owner runs: hands off
    ORPHANED = "orphaned"  # its owner is provably dead
    EXPIRED = "expired"  # older than its lease allows, owner alive or not
    KEPT = "kept"  # left for inspection: only cleanup or its lease removes it
    UNKNOWN = "unknown"  # owned from another host: we cannot tell


def status(record: Record, now: float, *, max_age_s: float | None = None) -> Status:
    """Classify ``record`` at time ``now`` (seconds since the epoch).

    ``max_age_s`` overrides the lease recorded with the VM.
    """
    expires = record.expires_at if max_age_s is None else record.created_at + max_age_s
    expired = expires is not None and now >= expires
    if record.state is VMState.KEPT:
        return Status.EXPIRED if expired else Status.KEPT
    if liveness(record.owner) is Liveness.DEAD:
        return Status.ORPHANED
    if expired:
        return Status.EXPIRED
    if liveness(record.owner) is Liveness.UNKNOWN:
        return Status.UNKNOWN
    return Status.ALIVE


def find_reapable(
    ledger: Ledger,
    *,
    now: float | None = None,
    max_age_s: float | None = None,
    include_kept: bool = False,
) -> list[tuple[Record, Status]]:
    """Rows whose VMs may be deleted without asking: orphaned or expired, and
    with ``include_kept`` (``vmlease cleanup``) those kept for inspection."""
    at = time.time() if now is None else now
    wanted = {Status.ORPHANED, Status.EXPIRED} | ({Status.KEPT} if include_kept else set())
    found: list[tuple[Record, Status]] = []
    for record in ledger.records():
        why = status(record, at, max_age_s=max_age_s)
        if why in wanted:
            found.append((record, why))
    return found


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one VM.

    Attributes:
        action: ``deleted``, ``already gone`` (the backend had no such VM),
            ``failed``, ``busy`` (another process is deleting it) or
            ``would delete`` (a dry run).
    """

    name: str
    backend: str
    why: str
    action: str
    error: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "backend": self.backend,
            "why": self.why,
            "action": self.action,
            "error": self.error,
        }


BackendFactory = Callable[[str], Backend]


def delete_records(
    ledger: Ledger,
    records: Iterable[tuple[Record, str]],
    backend_for: BackendFactory,
    *,
    reason: str,
    dry_run: bool = False,
) -> list[Outcome]:
    """Delete the VMs of ``records`` (each with why it is deleted) through their backends.

    Each row is first taken in the ledger (``take_for_deletion``), so a VM
    another process is deleting is left to it. A failed delete leaves the
    row ``failed`` with the error, for a later cleanup.
    """
    outcomes = []
    for record, why in records:
        if dry_run:
            outcomes.append(Outcome(record.name, record.backend, why, "would delete"))
            continue
        if not ledger.take_for_deletion(record.id, detail=f"{reason} ({why})"):
            outcomes.append(Outcome(record.name, record.backend, why, "busy"))
            continue
        try:
            backend_for(record.backend).delete(record.name)
            action = "deleted"
        except VMNotFound:
            action = "already gone"
        except VMLeaseError as exc:
            ledger.transition(record.id, VMState.FAILED, error=f"{reason}: {exc}")
            outcomes.append(Outcome(record.name, record.backend, why, "failed", str(exc)))
            continue
        ledger.transition(record.id, VMState.GONE, detail=f"{reason} ({why})")
        outcomes.append(Outcome(record.name, record.backend, why, action))
    return outcomes


class Backends:
    """Backend instances by name, made on first use for a state directory.

    ``known`` supplies instances already at hand (a session's own backend),
    so a backend built with special options is used as it is.
    """

    def __init__(self, state_dir: Path, known: Mapping[str, Backend] | None = None) -> None:
        self._state_dir = state_dir
        self._known = dict(known or {})
        self._made: dict[str, Backend] = {}

    def __call__(self, name: str) -> Backend:
        if name in self._known:
            return self._known[name]
        if name not in self._made:
            self._made[name] = _backends.get(name, state_dir=self._state_dir)
        return self._made[name]

    def close(self) -> None:
        for backend in self._made.values():
            backend.close()
        self._made.clear()


Confirm = Callable[[list[Record]], bool]


def cleanup(
    state_dir: Path,
    *,
    everything: bool = False,
    dry_run: bool = False,
    max_age_s: float | None = None,
    confirm: Confirm | None = None,
    known: Mapping[str, Backend] | None = None,
) -> list[Outcome]:
    """What ``vmlease cleanup`` does: delete orphaned, expired and kept VMs, or
    with ``everything`` every VM in the ledger once ``confirm`` agrees.

    Only VMs in the ledger are considered: whatever a backend has beyond
    them is not ours. A missing or unreadable ledger is a LedgerError and
    nothing is deleted.
    """
    ledger = Ledger(state_dir / "ledger.sqlite3", create=False)
    backends = Backends(state_dir, known)
    try:
        if everything:
            now = time.time()
            rows = [(r, status(r, now, max_age_s=max_age_s).value) for r in ledger.records()]
            if rows and not dry_run and confirm is not None and not confirm([r for r, _ in rows]):
                return []
        else:
            rows = [
                (r, s.value)
                for r, s in find_reapable(ledger, max_age_s=max_age_s, include_kept=True)
            ]
        return delete_records(ledger, rows, backends, reason="vmlease cleanup", dry_run=dry_run)
    finally:
        backends.close()
        ledger.close()
