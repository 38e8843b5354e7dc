"""The vmlease error tree.

Every error vmlease raises derives from :class:`VMLeaseError`; where a
built-in exception fits, the error inherits it too, so ``except TimeoutError``
or ``except LookupError`` keep working. Messages say what to do next.

::

    VMLeaseError
    ├── ConfigError (ValueError)            bad input: nothing was created
    │   ├── InvalidName                     a VM name breaks the naming rule
    │   ├── InvalidSpec                     cpus, memory or another field is wrong
    │   └── NameInUse                       a live VM already has that name
    ├── ImageError
    │   ├── ImageNotFound (LookupError)     no such image in the cache
    │   ├── ImageBuildError                 an image could not be built
    │   └── ImageImportError                an image could not be imported
    │       ├── ChecksumMismatch            a source's sha256 is not the one given
    │       └── DownloadError (ConnectionError)
    │                                       a source URL did not answer (after retries)
    ├── BackendUnavailable                  a backend's program or daemon is missing
    ├── BackendError                        a backend operation failed
    │   ├── VMNotFound (LookupError)        the backend does not know the VM
    │   ├── VMAlreadyExists                 the backend already has a VM of that name
    │   ├── BackendTimeout (TimeoutError)   an operation hung past its time limit
    │   ├── BootError                       the VM did not become ready
    │   ├── SnapshotNotFound (LookupError)  the VM has no snapshot of that name
    │   └── ChannelError (ConnectionError)  the command channel to the guest broke
    ├── VMStateError                        the VM is not in a state for that operation
    ├── CommandFailed                       a command exited non-zero (``check=True``)
    ├── CommandTimeout (TimeoutError)       a command ran out of time and was killed
    ├── GuestFileError (OSError)            a file in the guest could not be read or written
    ├── DiskFull (OSError)                  a host disk vmlease writes to is full, or too
    │                                       full for what was asked
    ├── LedgerError                         the ownership ledger cannot be used
    ├── LockTimeout (TimeoutError)          a lock or VM place stayed taken too long
    ├── WaitTimeout (TimeoutError)          a wait on a guest (a unit, a port, the
    │                                       console) did not come true in time
    ├── ReaperUnavailable                   no reaper protects the session: nothing is created
    └── UnsupportedOperation (NotImplementedError)
                                            the backend does not offer the operation

    Terminated (KeyboardInterrupt)          not an error: SIGTERM arrived while a
                                            session was open; the program unwinds and
                                            deletes its VMs as on Ctrl-C

Errors from below (``subprocess``, ``socket``, ``sqlite3``) are translated at
the boundary with ``raise ... from exc``; the original stays on
``__cause__``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BootError",
    "ChannelError",
    "ChecksumMismatch",
    "CommandFailed",
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
    "LockTimeout",
    "NameInUse",
    "ReaperUnavailable",
    "SnapshotNotFound",
    "Terminated",
    "UnsupportedOperation",
    "VMAlreadyExists",
    "VMLeaseError",
    "VMNotFound",
    "VMStateError",
    "WaitTimeout",
]


class VMLeaseError(Exception):
    """Root of every error vmlease raises."""


class _Rebuilt:
    """For errors built from keyword arguments: pickled as those arguments.

    Exceptions pickle as ``cls(*args)`` by default, which a keyword-only
    constructor refuses; pytest-xdist sends errors between processes.
    """

    _fields: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {f: getattr(self, f) for f in self._fields}
        state = {k: v for k, v in vars(self).items() if k not in self._fields}
        return (functools.partial(type(self), **kwargs), (), state)


class ConfigError(VMLeaseError, ValueError):
    """Input was rejected before anything was created."""


class InvalidName(ConfigError):
    """A VM name breaks the naming rule (the message states the rule)."""


class InvalidSpec(ConfigError):
    """A VM spec field (cpus, memory_mb, image ...) is invalid."""


class NameInUse(ConfigError):
    """A live VM recorded in the ledger already has the requested name."""


class ImageError(VMLeaseError):
    """Base for image problems."""


class ImageNotFound(ImageError, LookupError):
    """The requested image is not in the image cache."""


class ImageBuildError(ImageError):
    """An image could not be built; the message names what is missing."""


class ImageImportError(ImageError):
    """An image could not be imported: its source is not a disk image, it has no
    cloud-init, or its first boot failed; the message says which and what to do."""


class ChecksumMismatch(ImageImportError):
    """An imported source's sha256 is not the one given; nothing was kept."""


class DownloadError(ImageImportError, ConnectionError):
    """A source URL did not answer, or not with the image, after retries.

    Attributes:
        transient: whether trying again may help (no answer, a broken-off
            body, a 5xx reply) or not (a 4xx reply).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendUnavailable(VMLeaseError):
    """A backend cannot be used here: its program is missing or its daemon is down."""


class BackendError(VMLeaseError):
    """A backend operation failed.

    Attributes:
        command: the program and arguments that failed, if one was run.
        exit_code: its exit status, if it exited.
        stderr: what it wrote on standard error (may be truncated).
        transient: the backend's judgement that trying again may work and is
            safe (the operation failed before it took effect, or repeating it
            does no harm); the session retries these (see ``Backend.classify``).
    """

    transient_by_default = False

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] | None = None,
        exit_code: int | None = None,
        stderr: str = "",
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.command = list(command) if command is not None else None
        self.exit_code = exit_code
        self.stderr = stderr
        self.transient = self.transient_by_default if transient is None else transient


class VMNotFound(BackendError, LookupError):
    """The backend has no VM of that name."""


class VMAlreadyExists(BackendError):
    """The backend already has a VM of that name."""


class BackendTimeout(BackendError, TimeoutError):
    """A backend operation did not finish within its time limit (transient by default)."""

    transient_by_default = True


class BootError(BackendError):
    """The VM did not become ready; the message carries the console tail."""


class SnapshotNotFound(BackendError, LookupError):
    """The VM has no snapshot of that name."""


class ChannelError(BackendError, ConnectionError):
    """The command channel to the guest failed or broke."""


class VMStateError(VMLeaseError):
    """The VM is not in a state that allows the operation (deleted, stopped ...)."""


class CommandFailed(_Rebuilt, VMLeaseError):
    """A command run with ``check=True`` exited non-zero.

    Attributes:
        argv: the command.
        exit_code: its exit status (128 + N when killed by signal N).
        stdout, stderr: its output, decoded.
        vm: the name of the VM it ran in.
    """

    _fields = ("vm", "argv", "exit_code", "stdout", "stderr")

    def __init__(
        self, *, vm: str, argv: Sequence[str], exit_code: int, stdout: str, stderr: str
    ) -> None:
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\n  " + "\n  ".join(tail)) if tail else ""
        super().__init__(f"command {list(argv)!r} exited {exit_code} in VM {vm}{detail}")
        self.vm = vm
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class CommandTimeout(_Rebuilt, VMLeaseError, TimeoutError):
    """A command did not finish within its timeout and was killed.

    Attributes:
        argv: the command.
        timeout_s: the limit it exceeded, in seconds.
        stdout, stderr: what it had written by then.
        vm: the name of the VM it ran in.
    """

    _fields = ("vm", "argv", "timeout_s", "stdout", "stderr")

    def __init__(
        self, *, vm: str, argv: Sequence[str], timeout_s: float, stdout: str, stderr: str
    ) -> None:
        super().__init__(
            f"command {list(argv)!r} in VM {vm} did not finish within {timeout_s:g} s "
            "and was killed; pass a larger timeout_s if it needs longer"
        )
        self.vm = vm
        self.argv = list(argv)
        self.timeout_s = timeout_s
        self.stdout = stdout
        self.stderr = stderr


class GuestFileError(VMLeaseError, OSError):
    """A file could not be copied into or out of the guest."""


class DiskFull(VMLeaseError, OSError):
    """A host disk vmlease writes to is full, or has too little room for what was asked.

    Attributes:
        path: the file or directory that needs the room.
        free_bytes: free bytes there when it was found, if known.
        needed_bytes: what was needed, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        free_bytes: int | None = None,
        needed_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LedgerError(VMLeaseError):
    """The ownership ledger is missing, corrupt or unwritable."""


class LockTimeout(VMLeaseError, TimeoutError):
    """A lock, or a place under a VM limit, stayed taken for longer than the timeout."""


class WaitTimeout(VMLeaseError, TimeoutError):
    """A wait on a guest did not come true in time; the message shows the last
    check's output and the console's last lines.

    Attributes:
        detail: what the last check said.
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ReaperUnavailable(VMLeaseError):
    """No reaper acknowledged the session, so it refuses to create VMs."""


class UnsupportedOperation(VMLeaseError, NotImplementedError):
    """The backend does not offer this operation (see its capabilities)."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives while a session is open.

    A KeyboardInterrupt, so the program unwinds the way Ctrl-C does (pytest
    stops and tears its fixtures down) and every open session deletes its
    VMs on the way out.
    """
