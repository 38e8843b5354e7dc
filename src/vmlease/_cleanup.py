"""Deleting what we own and nothing else: the policy shared by the reaper,
the sweep at session start and ``vmlease cleanup``.

Deletion is authorised by the ledger. A VM that is not in the ledger is
never deleted, whatever its name; a VM in the ledger is deleted only when its
owner is provably dead (pid, start time and boot id), its lease has expired,
or a user asked for everything (``cleanup --all``).

On backends whose VMs live among the user's own (OrbStack, Multipass), a
name in the ledger is not proof enough: between the session that made a VM
and the cleanup, the user may have deleted it and made their own of the
same name. There a second check must agree (:func:`check_ownership`): the
mark recorded when vmlease made the VM, or failing that a name vmlease
generated for the row's session.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import LedgerError, VMLeaseError, VMNotFound
from vmlease._identity import Liveness, liveness
from vmlease._ledger import Ledger, Record, VMState
from vmlease._naming import is_generated
from vmlease.backends import Backend, Backends

log = logging.getLogger("vmlease.cleanup")

__all__ = [
    "Action",
    "Outcome",
    "Ownership",
    "Standing",
    "check_ownership",
    "cleanup",
    "delete_records",
    "find_missing",
    "find_reapable",
    "mark_prefix",
    "status",
    "sweep",
]


class Ownership(enum.Enum):
    """What the second check says of a ledger row's VM."""

    OURS = "ours"
    GONE = "gone"  # the backend has no VM of that name
    NOT_OURS = "not ours"  # a VM of that name exists, but not the one vmlease made
    UNCONFIRMED = "unconfirmed"  # neither its mark nor its name proves it ours


def check_ownership(record: Record, backend: Backend) -> tuple[Ownership, str]:
    """Whether the VM called ``record.name`` on ``backend`` is the one the row recorded.

    On a backend with a namespace of vmlease's own, the ledger suffices. On a
    shared one, the VM's current identity must equal the recorded mark; where
    no mark was recorded or it cannot be read now, the name must be one
    vmlease generated for the row's session. Returns the verdict and, unless
    OURS or GONE, why, saying what to do.
    """
    if not backend.capabilities.shared_namespace:
        return Ownership.OURS, ""
    where = f"{record.name!r} on {record.backend}"
    try:
        now = backend.identity(record.name)
    except VMNotFound:
        return Ownership.GONE, ""
    if record.instance_id and now is not None:
        if now == record.instance_id:
            return Ownership.OURS, ""
        return Ownership.NOT_OURS, (
            f"{where} is not the VM vmlease made ("
            + (f"its mark is {now!r}" if now else "it carries no vmlease mark")
            + f", vmlease recorded {record.instance_id!r}): left alone"
        )
    if now and now.startswith(mark_prefix(record)):
        return Ownership.OURS, ""  # marked, but the owner died before recording it
    if is_generated(record.name, record.owner.session_id):
        return Ownership.OURS, ""
    unread = (
        "its mark cannot be read now (is it stopped?)"
        if record.instance_id
        else "no mark was recorded when it was made"
    )
    return Ownership.UNCONFIRMED, (
        f"cannot confirm that {where} is the VM vmlease made: {unread}, and its name "
        "was chosen, not generated. If it is yours, delete it with the backend's own "
        "tool and `vmlease cleanup` will forget it; if it is stopped, start it and "
        "run `vmlease cleanup` again"
    )


def mark_prefix(record: Record) -> str:
    """How the token a session gives ``Backend.mark`` for ``record`` begins."""
    return f"vmlease:{record.owner.session_id}:{record.id}:"


class Standing(enum.StrEnum):
    """Whose VM this is, as far as deletion is concerned."""

    ALIVE = "alive"  # its owner runs: hands off
    ORPHANED = "orphaned"  # its owner is provably dead
    EXPIRED = "expired"  # older than its lease allows, owner alive or not
    KEPT = "kept"  # left for inspection: only cleanup or its lease removes it
    UNKNOWN = "unknown"  # owned from another host: we cannot tell


def status(record: Record, now: float, *, max_age_s: float | None = None) -> Standing:
    """Classify ``record`` at time ``now`` (seconds since the epoch).

    ``max_age_s`` overrides the lease recorded with the VM.
    """
    expires = record.expires_at if max_age_s is None else record.created_at + max_age_s
    expired = expires is not None and now >= expires
    if record.state is VMState.KEPT:
        return Standing.EXPIRED if expired else Standing.KEPT
    if liveness(record.owner) is Liveness.DEAD:
        return Standing.ORPHANED
    if expired:
        return Standing.EXPIRED
    if liveness(record.owner) is Liveness.UNKNOWN:
        return Standing.UNKNOWN
    return Standing.ALIVE


def find_reapable(
    ledger: Ledger,
    *,
    now: float | None = None,
    max_age_s: float | None = None,
    include_kept: bool = False,
) -> list[tuple[Record, Standing]]:
    """Rows whose VMs may be deleted without asking: orphaned or expired, and
    with ``include_kept`` (``vmlease cleanup``) those kept for inspection."""
    at = time.time() if now is None else now
    wanted = {Standing.ORPHANED, Standing.EXPIRED} | ({Standing.KEPT} if include_kept else set())
    found: list[tuple[Record, Standing]] = []
    for record in ledger.records():
        why = status(record, at, max_age_s=max_age_s)
        if why in wanted:
            found.append((record, why))
    return found


class Action(enum.StrEnum):
    """What a cleanup did with one VM."""

    DELETED = "deleted"
    ALREADY_GONE = "already gone"  # the backend had no such VM
    FAILED = "failed"
    BUSY = "busy"  # another process is deleting it
    NOT_OURS = "not ours"  # a VM of that name is someone else's: left, the row closed
    UNCONFIRMED = "unconfirmed"  # ownership cannot be proven: left, the row kept
    WOULD_DELETE = "would delete"  # a dry run

    @property
    def needs_a_person(self) -> bool:
        """A failed delete, or a VM left because it cannot be proven ours."""
        return self in (Action.FAILED, Action.UNCONFIRMED)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one VM.

    Attributes:
        why: why it was a candidate (its standing, or what happened to its owner).
        action: what was done (:class:`Action`).
        error: what went wrong, or why a VM was left.
    """

    name: str
    backend: str
    why: str
    action: Action
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
    take_over: bool = False,
) -> list[Outcome]:
    """Delete the VMs of ``records`` (each with why it is deleted) through their backends.

    Each row is first taken in the ledger (``take_for_deletion``), so a VM
    another process is deleting is left to it; with ``take_over`` (the
    reaper, for an owner that just died, perhaps while deleting) such a
    claim is taken over at once: deleting twice is harmless, waiting leaks. Then the second check
    (:func:`check_ownership`) must agree. A failed delete, or a VM whose
    ownership cannot be proven, leaves the row ``failed`` (or still ``kept``)
    with the reason, for a later cleanup.

    Deleting never waits on the ledger: when it cannot be written (a full
    disk), the VM is deleted all the same and its row stays as it was, so the
    next cleanup finds it, meets no VM, and settles it.
    """
    outcomes = []
    for record, why in records:
        unrecorded = ""
        if not dry_run:
            try:
                taken = ledger.take_for_deletion(
                    record.id, detail=f"{reason} ({why})", stale_after_s=0.0 if take_over else 60.0
                )
            except LedgerError as exc:
                taken, unrecorded = True, str(exc)
            if not taken:
                outcomes.append(Outcome(record.name, record.backend, why, Action.BUSY))
                continue
        try:
            backend = backend_for(record.backend)
            verdict, doubt = check_ownership(record, backend)
            if verdict is Ownership.OURS and not dry_run:
                backend.delete(record.name)
        except VMNotFound:
            verdict, doubt = Ownership.GONE, ""
        except VMLeaseError as exc:
            if not dry_run:
                failed = _write(ledger, record.id, _left(record), error=f"{reason}: {exc}")
                unrecorded = unrecorded or failed
            outcomes.append(Outcome(record.name, record.backend, why, Action.FAILED, str(exc)))
            continue
        action = _ACTIONS[verdict]
        if dry_run:
            action = Action.WOULD_DELETE if verdict is Ownership.OURS else action
        elif verdict is Ownership.UNCONFIRMED:
            failed = _write(ledger, record.id, _left(record), error=f"{reason}: {doubt}")
            unrecorded = unrecorded or failed
        else:
            detail = f"{reason} ({why})" + (f": {doubt}" if doubt else "")
            unrecorded = unrecorded or _write(ledger, record.id, VMState.GONE, detail=detail)
        if unrecorded:
            doubt = (doubt + "; " if doubt else "") + (
                f"not recorded in the ledger ({unrecorded}); "
                "the next `vmlease cleanup` settles the row"
            )
        outcomes.append(Outcome(record.name, record.backend, why, action, doubt or None))
    return outcomes


def _write(
    ledger: Ledger,
    vm_id: int,
    state: VMState,
    *,
    error: str | None = None,
    detail: str | None = None,
) -> str:
    """Record a row's new state; "" if that worked, else why not (logged, not raised)."""
    try:
        ledger.transition(vm_id, state, error=error, detail=detail)
    except LedgerError as exc:
        log.warning("%s; the row stays as it was until a later cleanup settles it", exc)
        return str(exc)
    return ""


def _left(record: Record) -> VMState:
    """The state of a row whose VM was not deleted: a kept VM stays kept (so
    cleanup still finds it while its owner lives), any other is failed."""
    return VMState.KEPT if record.state is VMState.KEPT else VMState.FAILED


_ACTIONS = {
    Ownership.OURS: Action.DELETED,
    Ownership.GONE: Action.ALREADY_GONE,
    Ownership.NOT_OURS: Action.NOT_OURS,
    Ownership.UNCONFIRMED: Action.UNCONFIRMED,
}


Confirm = Callable[[list[Record]], bool]

#: States in which a row's VM must exist: none of them is on its way in or out.
_SETTLED = (VMState.READY, VMState.STOPPED, VMState.FAILED, VMState.KEPT)


def find_missing(ledger: Ledger, backend_for: BackendFactory) -> list[Record]:
    """Rows in a settled state whose VM their backend no longer has, whoever owns them.

    Such a row is left when a VM was deleted while the ledger could not be
    written (a full disk), or by hand; cleaning it up only records the truth.
    A backend that cannot list its VMs right now is left out.
    """
    records = ledger.records(states=_SETTLED)
    found: list[Record] = []
    for name in sorted({r.backend for r in records}):
        try:
            have = {vm.name for vm in backend_for(name).list()}
        except VMLeaseError:
            continue
        found += [r for r in records if r.backend == name and r.name not in have]
    return found


def cleanup(
    state_dir: Path,
    *,
    everything: bool = False,
    dry_run: bool = False,
    max_age_s: float | None = None,
    confirm: Confirm | None = None,
    known: Mapping[str, Backend] | None = None,
    sweep: Sequence[str] = (),
) -> list[Outcome]:
    """What ``vmlease cleanup`` does: delete orphaned, expired and kept VMs, or
    with ``everything`` every VM in the ledger once ``confirm`` agrees; and
    settle the rows of VMs that no longer exist (:func:`find_missing`).
    Then each backend named in ``sweep`` deletes what it can prove abandoned
    wherever it was made (``Backend.sweep``: libvirt's expired leases).

    Only VMs in the ledger are considered: whatever a backend has beyond
    them is not ours. A missing or unreadable ledger is a LedgerError and
    nothing is deleted.
    """
    if sweep and not (state_dir / "ledger.sqlite3").exists():
        backends = Backends(state_dir, known)
        try:
            return _sweep(backends, sweep, dry_run=dry_run)
        finally:
            backends.close()
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
            taken = {r.id for r, _ in rows}
            rows += [(r, "missing") for r in find_missing(ledger, backends) if r.id not in taken]
        outcomes = delete_records(ledger, rows, backends, reason="vmlease cleanup", dry_run=dry_run)
        return outcomes + _sweep(backends, sweep, dry_run=dry_run)
    finally:
        backends.close()
        ledger.close()


def _sweep(backends: Backends, names: Sequence[str], *, dry_run: bool) -> list[Outcome]:
    """What each backend in ``names`` deleted (or would) on its own proof (``Backend.sweep``)."""
    outcomes = []
    action = Action.WOULD_DELETE if dry_run else Action.DELETED
    for name in names:
        for gone in backends(name).sweep(dry_run=dry_run):
            outcomes.append(Outcome(gone, name, "its lease ran out (any runner's)", action))
    return outcomes


def sweep(ledger: Ledger, backends: Callable[[], Backends], *, by: str) -> list[Outcome]:
    """Delete the ledger's VMs whose owners are provably dead, and those past their
    lease, logging each; ``by`` says who swept (a session). ``backends`` makes
    the backends the deletes need, closed afterwards."""
    rows = [(r, why.value) for r, why in find_reapable(ledger)]
    if not rows:
        return []
    made = backends()
    try:
        outcomes = delete_records(ledger, rows, made, reason=f"swept by {by}")
    finally:
        made.close()
    for o in outcomes:
        level = logging.WARNING if o.action.needs_a_person else logging.INFO
        log.log(
            level, "sweep: %s %s (%s)%s", o.action, o.name, o.why, f": {o.error}" if o.error else ""
        )
    return outcomes
