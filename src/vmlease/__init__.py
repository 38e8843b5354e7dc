"""vmlease: disposable virtual machines for test suites.

::

    import vmlease

    with vmlease.Session(backend="qemu") as session:
        vm = session.create(image="tiny", cpus=1, memory_mb=256)
        print(vm.run(["uname", "-r"]).stdout)
    # every VM of the session is deleted here
"""

from __future__ import annotations

from ._errors import (
    BackendError,
    BackendUnavailable,
    BootError,
    ChannelError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestFileError,
    ImageBuildError,
    ImageError,
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
)
from ._ledger import VMState
from ._session import VM, CommandResult, Session, SessionStats, TranscriptEntry
from ._spec import VMSpec
from ._version import __version__

__all__ = [
    "VM",
    "BackendError",
    "BackendUnavailable",
    "BootError",
    "ChannelError",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "GuestFileError",
    "ImageBuildError",
    "ImageError",
    "ImageNotFound",
    "InvalidName",
    "InvalidSpec",
    "LedgerError",
    "LockTimeout",
    "NameInUse",
    "ReaperUnavailable",
    "Session",
    "SessionStats",
    "SnapshotNotFound",
    "Terminated",
    "TranscriptEntry",
    "UnsupportedOperation",
    "VMAlreadyExists",
    "VMLeaseError",
    "VMNotFound",
    "VMSpec",
    "VMState",
    "VMStateError",
    "__version__",
]
