"""``vmlease doctor``: is this machine ready to give out VMs, and if not, what to do.

Every check: the state directory, free disk, the backend's own
(``Backend.preflight``: program present, daemon answering, accelerator,
image cache), and VMs whose owners are gone.
"""

from __future__ import annotations

from pathlib import Path

from vmlease import backends
from vmlease._checks import Check, Severity, disk_check, state_dir_check
from vmlease._cleanup import find_reapable
from vmlease._errors import VMLeaseError
from vmlease._ledger import Ledger

__all__ = ["doctor", "orphans_check"]


def orphans_check(state_dir: Path) -> Check:
    """VMs in the ledger whose owners are gone or whose leases ran out."""
    name = "orphaned VMs"
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return Check(name, Severity.OK, "none: no VM has been recorded here yet")
    try:
        ledger = Ledger(path, create=False)
    except VMLeaseError as exc:
        return Check(name, Severity.FAIL, str(exc), type(exc))
    try:
        found = find_reapable(ledger)
    finally:
        ledger.close()
    if not found:
        return Check(name, Severity.OK, "none")
    names = ", ".join(f"{r.name} ({why.value})" for r, why in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return Check(
        name,
        Severity.WARN,
        f"{len(found)} VMs whose owners are gone or whose leases ran out: {names}{more}; "
        "`vmlease cleanup` deletes them (the next session would too)",
    )


def doctor(state_dir: Path, backend_name: str = "qemu") -> list[Check]:
    """Every check, for ``vmlease doctor``."""
    checks = [state_dir_check(state_dir), disk_check("state", state_dir)]
    try:
        backend = backends.get(backend_name, state_dir=state_dir)
    except VMLeaseError as exc:
        checks.append(Check(f"backend {backend_name}", Severity.FAIL, str(exc), type(exc)))
    else:
        try:
            checks += backend.preflight()
        finally:
            backend.close()
    checks.append(orphans_check(state_dir))
    return checks
