"""Pre-flight checks: one finding each, saying what to do when it is not ok.

The type every backend's ``Backend.preflight`` returns, and the checks that
need nothing but the file system (the state directory, free disk). A
session runs the cheap checks when it starts (a few milliseconds: no
process is started, nothing is probed) and raises the first failure;
``vmlease doctor`` (``_doctor.py``) runs them all and prints them.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import ConfigError, VMLeaseError

__all__ = ["Check", "Severity", "disk_check", "first_failure", "state_dir_check"]

#: Free space under which a disk check warns, in bytes.
LOW_DISK_BYTES = 10 * 2**30


class Severity(enum.StrEnum):
    """How a check came out: fine, worth a look, or in the way."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding. ``message`` says what was found and, unless it is ok, what to do.

    ``error`` is the exception a session raises for a failure.
    """

    name: str
    status: Severity
    message: str
    error: type[VMLeaseError] = ConfigError

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status.value, "message": self.message}


def state_dir_check(state_dir: Path) -> Check:
    """The state directory exists, is a directory, is ours and only ours."""
    name = "state directory"
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        return Check(name, Severity.OK, f"{state_dir} will be made (mode 0700) on first use")
    except OSError as exc:
        return Check(name, Severity.FAIL, f"cannot read {state_dir}: {exc.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        return Check(
            name,
            Severity.FAIL,
            f"{state_dir} is not a directory; point VMLEASE_STATE_DIR at a directory",
        )
    if st.st_uid != os.getuid():
        return Check(
            name,
            Severity.FAIL,
            f"{state_dir} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "use a directory of your own (VMLEASE_STATE_DIR)",
        )
    if st.st_mode & 0o077:
        return Check(
            name,
            Severity.WARN,
            f"{state_dir} is open to others (mode {st.st_mode & 0o777:o}); "
            f"vmlease makes it 0700 when it next uses it, or run `chmod 700 {state_dir}`",
        )
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return Check(name, Severity.FAIL, f"cannot write to {state_dir}; check its permissions")
    return Check(name, Severity.OK, f"{state_dir} (mode 0700)")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(label: str, path: Path, *, low_bytes: int = LOW_DISK_BYTES) -> Check:
    """Free space where ``path`` lives (or will)."""
    name = f"free disk ({label})"
    where = _existing(path)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check(name, Severity.WARN, f"cannot tell the free space at {where}: {exc.strerror}")
    gib = free / 2**30
    if free < low_bytes:
        return Check(
            name,
            Severity.WARN,
            f"{gib:.1f} GiB free at {where}, under {low_bytes / 2**30:.0f} GiB: VM disks and "
            "images may not fit; free some space, or run `vmlease cleanup`",
        )
    return Check(name, Severity.OK, f"{gib:.0f} GiB free at {where}")


def first_failure(checks: Iterable[Check]) -> VMLeaseError | None:
    """The error for the first failed check, or None."""
    for check in checks:
        if check.status is Severity.FAIL:
            return check.error(check.message)
    return None
