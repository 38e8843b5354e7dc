"""vmlease: disposable virtual machines for test suites.

::

    import vmlease

    with vmlease.Session(backend="qemu") as session:
        vm = session.create(image="tiny", cpus=1, memory_mb=256)
        print(vm.run(["uname", "-r"]).stdout)
    # every VM of the session is deleted here
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vmlease._errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BootError,
    ChannelError,
    ChecksumMismatch,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    DiskFull,
    DownloadError,
    GuestFileError,
    ImageBuildError,
    ImageError,
    ImageImportError,
    ImageNotFound,
    InvalidName,
    InvalidSpec,
    LedgerError,
    LockTimeout,
    NameInUse,
    ReaperUnavailable,
    SnapshotNotFound,
    Terminated,
    UnsupportedOperation,
    VMAlreadyExists,
    VMLeaseError,
    VMNotFound,
    VMStateError,
    WaitTimeout,
)

#: The version (read by the build from this line).
__version__ = "0.1.0"

if TYPE_CHECKING:
    from vmlease._lan import PrivateNetwork
    from vmlease._ledger import VMState
    from vmlease._locks import Lock
    from vmlease._metrics import SessionStats
    from vmlease._pyinfra import run_pyinfra
    from vmlease._results import CommandResult, TranscriptEntry
    from vmlease._retry import RetryPolicy, Timeouts
    from vmlease._session import Session
    from vmlease._spec import VMSpec
    from vmlease._testinfra import as_testinfra_host
    from vmlease._vm import VM

# The session and its machinery load on first use, so importing vmlease (as
# pytest does for the plugin in every run, VMs or not) stays cheap.
_LAZY = {
    "VM": "vmlease._vm",
    "CommandResult": "vmlease._results",
    "TranscriptEntry": "vmlease._results",
    "PrivateNetwork": "vmlease._lan",
    "Session": "vmlease._session",
    "SessionStats": "vmlease._metrics",
    "RetryPolicy": "vmlease._retry",
    "Lock": "vmlease._locks",
    "Timeouts": "vmlease._retry",
    "VMSpec": "vmlease._spec",
    "VMState": "vmlease._ledger",
    "as_testinfra_host": "vmlease._testinfra",
    "run_pyinfra": "vmlease._pyinfra",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmlease' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "VM",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BootError",
    "ChannelError",
    "ChecksumMismatch",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "DiskFull",
    "DownloadError",
    "GuestFileError",
    "ImageBuildError",
    "ImageError",
    "ImageImportError",
    "ImageNotFound",
    "InvalidName",
    "InvalidSpec",
    "LedgerError",
    "Lock",
    "LockTimeout",
    "NameInUse",
    "PrivateNetwork",
    "ReaperUnavailable",
    "RetryPolicy",
    "Session",
    "SessionStats",
    "SnapshotNotFound",
    "Terminated",
    "Timeouts",
    "TranscriptEntry",
    "UnsupportedOperation",
    "VMAlreadyExists",
    "VMLeaseError",
    "VMNotFound",
    "VMSpec",
    "VMState",
    "VMStateError",
    "WaitTimeout",
    "__version__",
    "as_testinfra_host",
    "run_pyinfra",
]
