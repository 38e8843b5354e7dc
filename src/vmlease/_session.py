"""The session: one owner of VMs, and the policy every backend shares.

A session validates requests, writes the ledger before the backend acts,
records every transition, times every backend operation, and deletes its VMs
when it ends. Backends only carry out primitives (backends/_base.py).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import _signals
from . import backends as _backends
from ._cleanup import Backends, Outcome, delete_records, find_reapable
from ._errors import (
    BackendError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestFileError,
    NameInUse,
    UnsupportedOperation,
    VMLeaseError,
    VMNotFound,
    VMStateError,
)
from ._identity import Owner, current_owner
from ._ledger import Ledger, Record, VMState
from ._locks import Semaphore, Slot
from ._metrics import Metrics, OpStats
from ._naming import new_session_id, validate_name, vm_name
from ._paths import ensure_private_dir
from ._paths import state_dir as default_state_dir
from ._reaper import ReaperLink
from ._spec import VMSpec
from .backends import Backend

__all__ = ["VM", "CommandResult", "Session", "SessionStats"]

T = TypeVar("T")
log = logging.getLogger("vmlease")

DEFAULT_BOOT_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 30.0
DEFAULT_MAX_AGE_S = 6 * 3600.0
TRANSCRIPT_LIMIT = 200
_OUTPUT_KEPT = 2000


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did in a VM.

    Attributes:
        argv: the command.
        exit_code: its exit status; 127 if the command does not exist,
            128 + N if killed by signal N.
        stdout_bytes, stderr_bytes: its raw output.
        duration_s: wall time of the round trip, in seconds.
    """

    argv: tuple[str, ...]
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration_s: float

    @property
    def stdout(self) -> str:
        """Standard output, decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Standard error, decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr_bytes.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class TranscriptEntry:
    """One command as a VM's transcript keeps it (output truncated)."""

    argv: tuple[str, ...]
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Where a session's time went. Times in seconds."""

    session_id: str
    created: int
    deleted: int
    failed: int
    ops: dict[str, OpStats]


_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_tag(tag: object) -> None:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ConfigError(
            f"invalid snapshot name {tag!r}: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _argv(argv: object) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise ConfigError(
            f"argv must be a list of strings, not the string {argv!r}; "
            f"for a shell line use ['sh', '-c', {argv!r}]"
        )
    if not isinstance(argv, Sequence) or not argv:
        raise ConfigError(f"argv must be a non-empty list of strings, not {argv!r}")
    bad = [a for a in argv if not isinstance(a, str)]
    if bad:
        raise ConfigError(f"every argument must be a string; not {bad[0]!r}")
    return tuple(argv)


class VM:
    """A handle on one VM of a session. Get one from :meth:`Session.create`."""

    def __init__(self, session: Session, vm_id: int, name: str, spec: VMSpec) -> None:
        self._session = session
        self._id = vm_id
        self.name = name
        self.spec = spec
        self.transcript: list[TranscriptEntry] = []
        self.last_state = VMState.INTENDED

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state.value}>"

    @property
    def state(self) -> VMState:
        """The VM's state as the ledger records it (the last one seen once the session ended)."""
        if self._session.ledger.closed:
            return self.last_state
        record = self._session.ledger.get(self._id)
        return record.state if record else VMState.GONE

    def _require(self, *states: VMState) -> None:
        state = self.state
        if state in states:
            return
        if state is VMState.GONE:
            raise VMStateError(f"VM {self.name} has been deleted")
        if state is VMState.STOPPED:
            raise VMStateError(f"VM {self.name} is stopped: call start() first")
        raise VMStateError(f"VM {self.name} is {state.value}, not {' or '.join(states)}")

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        check: bool = False,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Run ``argv`` in the VM (no shell) and return what it did.

        Args:
            argv: program and arguments; for a shell line pass ``["sh", "-c", line]``.
            input: bytes (or text, encoded as UTF-8) for the command's stdin.
            check: raise CommandFailed if it exits non-zero.
            timeout_s: kill it after this many seconds and raise CommandTimeout.
            env: extra environment variables.
            cwd: working directory in the guest.
        """
        args = _argv(argv)
        if timeout_s is not None and (isinstance(timeout_s, bool) or timeout_s <= 0):
            raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        data = input.encode() if isinstance(input, str) else input
        self._require(VMState.READY)
        start = time.monotonic()
        try:
            raw = self._session.timed(
                "exec",
                lambda: self._session.backend.exec(
                    self.name, args, stdin=data, env=env, cwd=cwd, timeout_s=timeout_s
                ),
            )
        except VMLeaseError:
            self._note(TranscriptEntry(args, None, time.monotonic() - start, "", "(channel error)"))
            raise
        result = CommandResult(
            args, raw.exit_code, raw.stdout, raw.stderr, time.monotonic() - start
        )
        self._note(
            TranscriptEntry(
                args,
                result.exit_code,
                result.duration_s,
                result.stdout[:_OUTPUT_KEPT],
                result.stderr[:_OUTPUT_KEPT],
            )
        )
        if raw.timed_out:
            raise CommandTimeout(
                vm=self.name,
                argv=args,
                timeout_s=timeout_s or 0.0,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        if check and result.exit_code != 0:
            raise CommandFailed(
                vm=self.name,
                argv=args,
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result

    def _note(self, entry: TranscriptEntry) -> None:
        self.transcript.append(entry)
        del self.transcript[:-TRANSCRIPT_LIMIT]

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy the local file ``local`` to ``remote`` in the VM (binary-safe, any size).

        The guest file appears whole or not at all; its mode follows the local file.
        """
        path = Path(local)
        if not path.is_file():
            raise GuestFileError(f"cannot copy {path} into VM {self.name}: no such local file")
        if not isinstance(remote, str) or not remote:
            raise ConfigError(f"remote must be a path in the guest, not {remote!r}")
        self._require(VMState.READY)
        self._session.timed("put", lambda: self._session.backend.put(self.name, path, remote))

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy ``remote`` from the VM to the local file ``local`` (binary-safe, any size).

        ``local`` is replaced only once the whole file has arrived.
        """
        path = Path(local)
        if not path.parent.is_dir():
            raise GuestFileError(f"cannot copy into {path}: {path.parent} is not a directory")
        if path.is_dir():
            raise GuestFileError(f"cannot copy into {path}: it is a directory")
        if not isinstance(remote, str) or not remote:
            raise ConfigError(f"remote must be a path in the guest, not {remote!r}")
        self._require(VMState.READY)
        self._session.timed("get", lambda: self._session.backend.get(self.name, remote, path))

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut the VM down; its disk is kept for :meth:`start`."""
        self._require(VMState.READY, VMState.STOPPED)
        if self.state is VMState.STOPPED:
            return
        self._session.transition(self._id, VMState.STOPPING)
        self._session.guard(
            self._id, "stop", lambda: self._session.backend.stop(self.name, timeout_s)
        )
        self._session.transition(self._id, VMState.STOPPED)

    def start(self, boot_timeout_s: float | None = None) -> None:
        """Boot a stopped VM again; returns when it answers commands."""
        self._require(VMState.READY, VMState.STOPPED)
        if self.state is VMState.READY:
            return
        timeout = boot_timeout_s or self._session.boot_timeout_s
        self._session.transition(self._id, VMState.STARTING)
        self._session.guard(self._id, "start", lambda: self._session.backend.start(self.name))
        self._session.guard(
            self._id, "boot", lambda: self._session.backend.wait_ready(self.name, timeout)
        )
        self._session.transition(self._id, VMState.READY)

    def delete(self) -> None:
        """Destroy the VM. Deleting a deleted VM does nothing."""
        self._session.delete_vm(self._id, self.name)

    def keep(self, why: str = "kept for inspection") -> None:
        """Leave the VM running after the session ends, for a person to inspect.

        The session, its sweeps and the reaper leave a kept VM alone;
        ``vmlease cleanup`` (or its lease running out) deletes it.
        """
        self._require(VMState.READY, VMState.STOPPED)
        self._session.release(self._id, why)

    def snapshot(self, tag: str) -> None:
        """Save the VM's memory and disk state as ``tag`` (replacing a snapshot of that name).

        UnsupportedOperation if the backend cannot (see its capabilities).
        """
        _check_tag(tag)
        self._require_snapshots()
        self._require(VMState.READY)
        self._session.timed("snapshot", lambda: self._session.backend.snapshot(self.name, tag))
        self._session.ledger.note(self._id, VMState.READY, f"snapshot {tag}")

    def restore(self, tag: str) -> None:
        """Bring memory and disk back to snapshot ``tag``: what happened since is gone.

        The guest clock is set to the current time afterwards.
        """
        _check_tag(tag)
        self._require_snapshots()
        self._require(VMState.READY)
        self._session.timed("restore", lambda: self._session.backend.restore(self.name, tag))
        self._session.ledger.note(self._id, VMState.READY, f"restored {tag}")

    def _require_snapshots(self) -> None:
        backend = self._session.backend
        if not backend.capabilities.snapshots:
            raise UnsupportedOperation(
                f"the {backend.name} backend cannot take or restore snapshots; "
                "use a fresh VM per test instead"
            )

    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the VM's console, for diagnosis."""
        return self._session.backend.console_tail(self.name, lines)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


class Session:
    """Owns VMs for one run and deletes them when it ends.

    Args:
        backend: a backend name (``"qemu"``) or a Backend instance.
        state_dir: where the ledger and backend state live (default
            ``$VMLEASE_STATE_DIR`` or ``$XDG_STATE_HOME/vmlease``).
        name_prefix: first part of generated VM names.
        name_tag: put into generated names after the session id (the
            pytest-xdist worker id, so a run's VMs are named by worker).
        boot_timeout_s: how long a VM may take to answer after create/start.
        max_age_s: recorded as each VM's lease; a VM older than this may be
            deleted by cleanup even if its owner looks alive.
        session_id: share one id between processes of one run (pytest-xdist);
            default a fresh one.
        backend_options: keyword arguments for the backend, when named.
        reaper: register with the reaper before the first create (default),
            so the VMs are deleted even if this process is killed. False
            turns the protection off (for fake backends in tests); a
            ReaperLink instance is used as given.
        sweep: at start, delete VMs whose owners are provably dead or whose
            lease has expired (default True).
        max_vms: at most this many VMs at once among all sessions that use
            the same state directory and limit (pytest-xdist workers of a run);
            a create waits up to ``place_timeout_s`` for a place.
        place_timeout_s: how long a create waits under ``max_vms``.
        clock: monotonic seconds, for durations (injected for tests).
    """

    def __init__(
        self,
        backend: str | Backend = "qemu",
        *,
        state_dir: str | os.PathLike[str] | None = None,
        name_prefix: str = "vmlease",
        name_tag: str = "",
        boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        session_id: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        reaper: bool | ReaperLink = True,
        sweep: bool = True,
        max_vms: int | None = None,
        place_timeout_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name_prefix, str) or not name_prefix:
            raise ConfigError("name_prefix must be a non-empty string")
        validate_name(name_prefix)
        for label, value in (("boot_timeout_s", boot_timeout_s), ("max_age_s", max_age_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{label} must be a positive number of seconds, not {value!r}")
        self.id = validate_name(session_id) if session_id is not None else new_session_id()
        self.state_dir = ensure_private_dir(
            Path(state_dir) if state_dir is not None else default_state_dir()
        )
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = _backends.get(
                backend, state_dir=self.state_dir, **dict(backend_options or {})
            )
        self.ledger = Ledger(self.state_dir / "ledger.sqlite3")
        self.owner: Owner = current_owner(self.id)
        self.name_prefix = name_prefix
        if name_tag:
            validate_name(name_tag)
        self.name_tag = name_tag
        self.boot_timeout_s = float(boot_timeout_s)
        self.max_age_s = float(max_age_s)
        self.metrics = Metrics()
        self._clock = clock
        self._lock = threading.Lock()
        self._protect_lock = threading.Lock()
        self._counter = 0
        self._vms: dict[int, VM] = {}
        self._created = 0
        self._deleted = 0
        self._failed = 0
        self._closed = False
        self._opened = False
        if isinstance(reaper, ReaperLink):
            self._reaper: ReaperLink | None = reaper
        else:
            self._reaper = ReaperLink(self.state_dir) if reaper else None
        self._places = Semaphore(self.state_dir, "vm", max_vms) if max_vms is not None else None
        self._place_timeout_s = place_timeout_s
        self._held: dict[int, Slot] = {}
        self.swept: list[Outcome] = self._sweep() if sweep else []

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.backend.name} vms={len(self._vms)}>"

    # -- policy helpers used by VM handles -----------------------------

    def timed(self, op: str, fn: Callable[[], T]) -> T:
        """Run a backend operation and record how long it took."""
        start = self._clock()
        try:
            value = fn()
        except BaseException:
            self.metrics.record(op, self._clock() - start, ok=False)
            raise
        self.metrics.record(op, self._clock() - start, ok=True)
        return value

    def transition(self, vm_id: int, state: VMState, *, error: str | None = None) -> None:
        self.ledger.transition(vm_id, state, error=error)
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.last_state = state

    def guard(self, vm_id: int, op: str, fn: Callable[[], T]) -> T:
        """A timed backend operation whose failure is recorded as the VM's failure."""
        try:
            return self.timed(op, fn)
        except BaseException as exc:
            self.transition(vm_id, VMState.FAILED, error=f"{op}: {exc}")
            raise

    def _backends(self) -> Backends:
        return Backends(self.state_dir, known={self.backend.name: self.backend})

    def _sweep(self) -> list[Outcome]:
        """Delete VMs of owners that are provably dead, and VMs past their lease."""
        rows = [(r, why.value) for r, why in find_reapable(self.ledger)]
        if not rows:
            return []
        backends = self._backends()
        try:
            outcomes = delete_records(
                self.ledger, rows, backends, reason=f"swept by session {self.id}"
            )
        finally:
            backends.close()
        for o in outcomes:
            level = logging.WARNING if o.action == "failed" else logging.INFO
            log.log(
                level,
                "sweep: %s %s (%s)%s",
                o.action,
                o.name,
                o.why,
                f": {o.error}" if o.error else "",
            )
        return outcomes

    def prepare(self) -> None:
        """Register with the reaper and install the signal handlers now rather than
        at the first create; call it from the main thread before creating VMs
        from other threads (signal handlers can only be set from the main thread)."""
        self._protect()

    def _protect(self) -> None:
        """Before a create: the reaper holds our registration, signals unwind, atexit backs up."""
        with self._protect_lock:
            if self._reaper is not None:
                self._reaper.register(self.owner)
            if not self._opened:
                self._opened = True
                _signals.session_opened()
                atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        # Last resort for a session nobody closed; the reaper covers the rest.
        with contextlib.suppress(BaseException):  # the interpreter is exiting
            self.close()

    # -- the public API ----------------------------------------------------

    def create(
        self,
        image: str = "tiny",
        cpus: int = 1,
        memory_mb: int = 256,
        *,
        name: str | None = None,
        boot_timeout_s: float | None = None,
    ) -> VM:
        """Create a VM and return it once it answers commands.

        The ledger records the VM before the backend is asked for it. If
        anything fails, the VM is deleted again and its row says why.
        """
        if self._closed:
            raise VMStateError(f"session {self.id} is closed")
        spec = VMSpec(image=image, cpus=cpus, memory_mb=memory_mb)
        timeout = self.boot_timeout_s if boot_timeout_s is None else boot_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"boot_timeout_s must be a positive number, not {timeout!r}")
        if name is not None:
            self.backend.validate_name(validate_name(name))
        self.timed("check", lambda: self.backend.check_spec(spec))
        self._protect()
        place = self._take_place()
        try:
            record = self._claim(name, spec)
        except BaseException:
            if place is not None:
                place.release()
            raise
        vm_name_ = record.name
        vm = VM(self, record.id, vm_name_, spec)
        with self._lock:
            self._vms[record.id] = vm
            if place is not None:
                self._held[record.id] = place
        try:
            self.transition(record.id, VMState.CREATING)
            self.timed("create", lambda: self.backend.create(vm_name_, spec))
            self.timed("boot", lambda: self.backend.wait_ready(vm_name_, timeout))
        except BaseException as exc:
            self._failed += 1
            self._abandon(record.id, vm_name_, exc)
            raise
        self.transition(record.id, VMState.READY)
        self._created += 1
        return vm

    def _take_place(self) -> Slot | None:
        """A place under ``max_vms``, waited for (and timed as ``wait``)."""
        if self._places is None:
            return None
        places = self._places
        return self.timed("wait", lambda: places.acquire(self._place_timeout_s))

    def _give_back_place(self, vm_id: int) -> None:
        with self._lock:
            place = self._held.pop(vm_id, None)
        if place is not None:
            place.release()

    def _claim(self, name: str | None, spec: VMSpec) -> Record:
        """Write the ledger row for a new VM. A generated name that is taken
        (processes sharing a session id) moves on to the next counter."""
        for _ in range(1000):
            if name is None:
                with self._lock:
                    self._counter += 1
                    candidate = vm_name(self.name_prefix, self.id, self._counter, self.name_tag)
                self.backend.validate_name(candidate)
            else:
                candidate = name
            try:
                return self.ledger.claim(
                    name=candidate,
                    backend=self.backend.name,
                    owner=self.owner,
                    spec=spec.to_json(),
                    expires_at=time.time() + self.max_age_s,
                )
            except NameInUse:
                if name is not None:
                    raise
        raise NameInUse(f"no free generated name for session {self.id}")

    def _abandon(self, vm_id: int, name: str, exc: BaseException) -> None:
        """A create failed: record why, remove whatever the backend made."""
        self.transition(vm_id, VMState.FAILED, error=f"{type(exc).__name__}: {exc}")
        try:
            self.timed("delete", lambda: self.backend.delete(name))
        except VMNotFound:
            pass
        except VMLeaseError:
            return  # stays failed: a later cleanup retries the delete
        self.transition(vm_id, VMState.GONE, error=f"{type(exc).__name__}: {exc}")
        self._give_back_place(vm_id)
        with self._lock:
            self._vms.pop(vm_id, None)

    def delete_vm(self, vm_id: int, name: str) -> None:
        record = self.ledger.get(vm_id)
        if record is None or record.state is VMState.GONE:
            return
        with _signals.shielded(f"deleting VM {name}"):
            if not self.ledger.take_for_deletion(vm_id, detail=f"deleted by session {self.id}"):
                return  # another process (reaper, cleanup) is deleting it
            vm = self._vms.get(vm_id)
            if vm is not None:
                vm.last_state = VMState.DELETING
            try:
                self.timed("delete", lambda: self.backend.delete(name))
            except VMNotFound:
                pass
            except BaseException as exc:
                self.transition(vm_id, VMState.FAILED, error=f"delete: {exc}")
                raise
            self.transition(vm_id, VMState.GONE)
        self._give_back_place(vm_id)
        self._deleted += 1
        with self._lock:
            self._vms.pop(vm_id, None)

    def release(self, vm_id: int, why: str) -> None:
        """Hand a VM over to the ledger as kept: this session no longer deletes it."""
        self.ledger.transition(vm_id, VMState.KEPT, detail=why)
        self._give_back_place(vm_id)
        with self._lock:
            vm = self._vms.pop(vm_id, None)
        if vm is not None:
            vm.last_state = VMState.KEPT

    def vms(self) -> list[VM]:
        """This session's VMs that still exist, oldest first."""
        with self._lock:
            return [vm for _, vm in sorted(self._vms.items())]

    def stats(self) -> SessionStats:
        """Counts and operation timings so far."""
        return SessionStats(
            session_id=self.id,
            created=self._created,
            deleted=self._deleted,
            failed=self._failed,
            ops=self.metrics.summary(),
        )

    def close(self) -> None:
        """Delete every VM of this session that still exists. Safe to call twice.

        Ctrl-C and SIGTERM wait until the deleting is done. Raises
        BackendError naming the VMs that could not be deleted (they stay in
        the ledger as failed, and the reaper tries again).
        """
        failures = []
        with _signals.shielded("deleting this session's VMs"):
            self._closed = True
            for vm in self.vms():
                try:
                    vm.delete()
                except VMLeaseError as exc:
                    failures.append(f"{vm.name}: {exc}")
            self.backend.close()
            if self._reaper is not None:
                self._reaper.close()
            if self._opened:
                self._opened = False
                _signals.session_closed()
                atexit.unregister(self._at_exit)
        if failures:
            raise BackendError("could not delete: " + "; ".join(failures))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except VMLeaseError:
            if exc_type is None:
                raise
        finally:
            self.ledger.close()
