"""The session: one owner of VMs, and the policy every backend shares.

A session validates requests, writes the ledger before the backend acts,
records every transition, times every backend operation, retries the ones
that fail transiently (``_retry.py``), adopts a VM that a failed create made
after all, and deletes its VMs when it ends. Backends only carry out
primitives (backends/_base.py).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from vmlease import _signals
from vmlease import backends as _backends
from vmlease._checks import first_failure
from vmlease._cleanup import Outcome
from vmlease._cleanup import sweep as sweep_dead
from vmlease._creating import CreateAttempts, check_session, claim, mark, positive, requested
from vmlease._errors import (
    BackendError,
    LedgerError,
    UnsupportedOperation,
    VMLeaseError,
    VMNotFound,
    VMStateError,
)
from vmlease._identity import Owner, current_owner
from vmlease._lan import PrivateNetwork
from vmlease._ledger import Ledger, Record, VMState
from vmlease._locks import Places, Slot
from vmlease._metrics import Metrics, SessionStats
from vmlease._named import catalog_source, check_or_import, progress
from vmlease._naming import new_session_id, session_id_of, validate_name, vm_name
from vmlease._paths import ensure_private_dir
from vmlease._paths import state_dir as default_state_dir
from vmlease._reaper import ReaperLink
from vmlease._retry import Retrier, RetryPolicy
from vmlease._spec import Network, VMSpec, parse_arch
from vmlease._vm import UNSUPPORTED, VM, Capability
from vmlease.backends import Backend, Backends, Fault

__all__ = ["Session"]

T = TypeVar("T")
log = logging.getLogger("vmlease")

DEFAULT_BOOT_TIMEOUT_S = 120.0
DEFAULT_MAX_AGE_S = 6 * 3600.0


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
        retry: how backend operations that fail transiently are retried, and
            each one's time limit (default ``RetryPolicy()``; use
            ``RetryPolicy(...).without_waits()`` in tests that inject failures).
        clock: monotonic seconds, for durations (injected for tests).
        sleep: waits between retries (injected for tests).
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
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        check_session(name_prefix, boot_timeout_s, max_age_s, retry)
        self.retry_policy = retry or RetryPolicy()
        self._timeouts = self.retry_policy.timeouts
        self._retrier = Retrier(self.retry_policy, sleep=sleep, clock=clock)
        self.id = session_id_of(session_id) if session_id is not None else new_session_id()
        self.state_dir = ensure_private_dir(
            Path(state_dir) if state_dir is not None else default_state_dir()
        )
        if isinstance(backend, Backend):
            self._backend = backend
        else:
            self._backend = _backends.get(
                backend, state_dir=self.state_dir, **dict(backend_options or {})
            )
        # Fail fast, before anything is recorded: a missing program, a daemon down.
        failure = first_failure(self._backend.preflight(cheap=True))
        if failure is not None:
            self._backend.close()
            raise failure
        self._ledger = Ledger(self.state_dir / "ledger.sqlite3")
        try:
            self.owner: Owner = current_owner(self.id)
            self._backend.serve(self.owner, lease_s=float(max_age_s))
            self.name_prefix = name_prefix
            if name_tag:
                validate_name(name_tag)
            self.name_tag = name_tag
            self.boot_timeout_s = float(boot_timeout_s)
            self.max_age_s = float(max_age_s)
            self._metrics = Metrics()
            self._clock = clock
            self._lock = threading.Lock()
            self._protect_lock = threading.Lock()
            self._counter = 0
            self._vms: dict[int, VM] = {}
            self._created = self._deleted = self._failed = self._adopted = 0
            self._closed = False
            self._opened = False
            if isinstance(reaper, ReaperLink):
                self._reaper: ReaperLink | None = reaper
            else:
                self._reaper = ReaperLink(self.state_dir) if reaper else None
            self._places = Places(self.state_dir, max_vms, place_timeout_s)
            # Ledger writes that failed on a path that had to go on: vm id -> (state, error).
            self._unrecorded: dict[int, tuple[VMState, str | None]] = {}
            # VMs of owners that are provably dead, and VMs past their lease, go now.
            self.swept: list[Outcome] = (
                sweep_dead(self._ledger, self._backends, by=f"session {self.id}") if sweep else []
            )
        except BaseException:
            # A session refused on the way up leaves no open ledger or backend behind.
            self._ledger.close()
            self._backend.close()
            raise

    def __repr__(self) -> str:
        return f"<Session {self.id} {self._backend.name} vms={len(self._vms)}>"

    @property
    def backend(self) -> Backend:
        """The backend this session's VMs live on."""
        return self._backend

    # -- policy: timing, retries, the ledger -----------------------------

    def _timed(self, op: str, fn: Callable[[], T]) -> T:
        """Run a backend operation and record how long it took."""
        start = self._clock()
        try:
            value = fn()
        except BaseException:
            self._metrics.record(op, self._clock() - start, ok=False)
            raise
        self._metrics.record(op, self._clock() - start, ok=True)
        return value

    def _transition(self, vm_id: int, state: VMState, *, error: str | None = None) -> None:
        self._ledger.transition(vm_id, state, error=error)
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.last_state = state

    def _record(self, vm_id: int, state: VMState, *, error: str | None = None) -> None:
        """``_transition`` on a path that must go on when the ledger cannot be
        written (deleting, recording a failure): the write is kept and tried
        again when the session closes; a row still unsettled then is settled by
        the next cleanup, which finds it and meets no VM."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.last_state = state
        try:
            self._ledger.transition(vm_id, state, error=error)
        except LedgerError as exc:
            log.warning("VM %s is %s, but %s", vm.name if vm else vm_id, state.value, exc)
            self._unrecorded[vm_id] = (state, error)

    def _record_later_writes(self) -> None:
        for vm_id, (state, error) in list(self._unrecorded.items()):
            try:
                self._ledger.transition(vm_id, state, error=error)
            except LedgerError:
                return  # still full: the next cleanup settles these rows
            del self._unrecorded[vm_id]

    def _transient(self, exc: BaseException) -> bool:
        """Whether the backend judges ``exc`` worth retrying."""
        return self._backend.classify(exc) is Fault.TRANSIENT

    def _call(
        self,
        op: str,
        fn: Callable[[float], T],
        *,
        timeout_s: float,
        subject: str = "",
        before_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """A backend operation, timed and retried under the session's policy.

        ``fn`` gets the time limit for its attempt: ``timeout_s``, or less
        near the end of the policy's total time.
        """
        return self._timed(
            op,
            lambda: self._retrier.call(
                op,
                fn,
                timeout_s=timeout_s,
                transient=self._transient,
                subject=subject,
                before_retry=before_retry,
            ),
        )

    # -- what VM handles ask of their session (VMHost) ----------------------

    def _vm_state(self, vm: VM) -> VMState | None:
        if self._ledger.closed:
            return None
        record = self._ledger.get(vm.ledger_id)
        return record.state if record else VMState.GONE

    def _vm_op(
        self,
        vm: VM,
        op: str,
        fn: Callable[[Backend, float], T],
        *,
        timeout_s: float,
        fails_vm: bool = False,
    ) -> T:
        backend = self._backend
        try:
            return self._call(
                op, lambda limit: fn(backend, limit), timeout_s=timeout_s, subject=vm.name
            )
        except BaseException as exc:
            if fails_vm:
                self._record(vm.ledger_id, VMState.FAILED, error=f"{op}: {exc}")
            raise

    def _vm_supports(self, capability: Capability) -> None:
        if not getattr(self._backend.capabilities, capability):
            raise UnsupportedOperation(
                f"the {self._backend.name} backend {UNSUPPORTED[capability]}"
            )

    def _vm_transition(self, vm: VM, state: VMState) -> None:
        self._transition(vm.ledger_id, state)

    def _vm_forwarded(self, vm: VM, guest_port: int, host_port: int) -> None:
        record = self._ledger.get(vm.ledger_id)
        forwards = dict(record.forwards) if record is not None else {}
        forwards[guest_port] = host_port
        self._ledger.set_forwards(vm.ledger_id, forwards)

    def _vm_note(self, vm: VM, detail: str) -> None:
        self._ledger.note(vm.ledger_id, VMState.READY, detail)

    def _vm_can_reset(self, vm: VM) -> bool:
        return self._backend.capabilities.resets and self._backend.can_reset(vm.name)

    def _vm_console(self, vm: VM, lines: int) -> str:
        return self._backend.console_tail(vm.name, lines)

    # -- sweeping and protection ------------------------------------------------

    def _backends(self) -> Backends:
        return Backends(self.state_dir, known={self._backend.name: self._backend})

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
        network: Network | str | None = None,
        disk_gb: int | None = None,
        user: str | None = None,
        arch: str | None = None,
        networks: Sequence[str] | None = None,
        alias: str | None = None,
        spec: VMSpec | None = None,
    ) -> VM:
        """Create a VM and return it once it answers commands (a full system: once it is up,
        its SSH server included). The keywords are :class:`VMSpec`'s (``network``: ``user``,
        ``none`` or ``restricted``; ``networks``: the private ones it joins, see
        :meth:`network`; ``alias``: its other name there), or ``spec`` gives them all. The
        ledger records the VM first; if anything fails, it is deleted and its row says why."""
        if self._closed:
            raise VMStateError(f"session {self.id} is closed")
        asked = {"image": image, "cpus": cpus, "memory_mb": memory_mb, "alias": alias}
        asked.update(network=network, disk_gb=disk_gb, user=user, arch=arch, networks=networks)
        spec = requested(spec, asked)
        timeout = positive(self.boot_timeout_s if boot_timeout_s is None else boot_timeout_s)
        if name is not None:
            self._backend.validate_name(validate_name(name))
        named = partial(self.import_image, progress=progress.info)
        self._timed("check", lambda: check_or_import(self._backend, spec, named, os.environ))
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
        self._places.hold(record.id, place)
        attempt = CreateAttempts(
            self._backend,
            vm_name_,
            spec,
            boot_timeout_s=self.boot_timeout_s,
            delete_timeout_s=self.retry_policy.timeouts.delete_s,
        )
        try:
            self._transition(record.id, VMState.CREATING)
            self._call(
                "create",
                attempt,
                timeout_s=self.retry_policy.timeouts.create_s,
                subject=vm_name_,
            )
            self._call(
                "boot",
                lambda limit: self._backend.wait_ready(vm_name_, limit),
                timeout_s=timeout,
                subject=vm_name_,
            )
        except BaseException as exc:
            self._failed += 1
            self._abandon(record.id, vm_name_, exc, ours=attempt.may_exist)
            raise
        if attempt.adopted:
            self._adopted += 1
            self._ledger.note(record.id, VMState.CREATING, "adopted after a failed create")
        # Where VMs live among the user's own, marked as ours (``_creating.mark``).
        mark(self._backend, self._ledger, record, self._call, timeout_s=self._timeouts.mark_s)
        self._transition(record.id, VMState.READY)
        self._created += 1
        return vm

    def _take_place(self) -> Slot | None:
        """A place under ``max_vms``, waited for (and timed as ``wait``)."""
        return self._timed("wait", self._places.take) if self._places.limited else None

    def _claim(self, name: str | None, spec: VMSpec) -> Record:
        """Write the ledger row for a new VM (see ``_creating.claim``)."""
        with self._lock:
            first = self._counter + 1
        record, counter = claim(
            self._ledger,
            self._backend,
            self.owner,
            spec,
            name=name,
            names=lambda n: vm_name(self.name_prefix, self.id, n, self.name_tag),
            first=first,
            expires_at=time.time() + self.max_age_s,
        )
        with self._lock:
            self._counter = max(self._counter, counter)
        return record

    def _abandon(self, vm_id: int, name: str, exc: BaseException, *, ours: bool) -> None:
        """A create failed: record why, remove whatever the backend made.

        ``ours`` is False when no attempt can have made a VM (the backend
        said at once that the name was taken): that VM is someone else's.
        """
        self._record(vm_id, VMState.FAILED, error=f"{type(exc).__name__}: {exc}")
        if ours:
            try:
                self._backend_delete(name)
            except VMNotFound:
                pass
            except VMLeaseError:
                return  # stays failed: the reaper or a later cleanup retries the delete
        self._record(vm_id, VMState.GONE, error=f"{type(exc).__name__}: {exc}")
        self._places.give_back(vm_id)
        with self._lock:
            self._vms.pop(vm_id, None)

    def _vm_delete(self, vm: VM) -> None:
        vm_id, name = vm.ledger_id, vm.name
        record = self._ledger.get(vm_id)
        if record is None or record.state is VMState.GONE:
            return
        with _signals.shielded(f"deleting VM {name}"):
            try:
                taken = self._ledger.take_for_deletion(
                    vm_id, detail=f"deleted by session {self.id}"
                )
            except LedgerError as exc:
                # Deleting never waits on the ledger (a full disk): delete, record later.
                log.warning("deleting VM %s although %s", name, exc)
                taken = True
            if not taken:
                return  # another process (reaper, cleanup) is deleting it
            vm.last_state = VMState.DELETING
            try:
                self._backend_delete(name)
            except VMNotFound:
                pass
            except BaseException as exc:
                self._record(vm_id, VMState.FAILED, error=f"delete: {exc}")
                vm.last_state = VMState.FAILED
                raise
            self._record(vm_id, VMState.GONE)
            vm.last_state = VMState.GONE
        self._places.give_back(vm_id)
        self._deleted += 1
        with self._lock:
            self._vms.pop(vm_id, None)

    def _backend_delete(self, name: str) -> None:
        self._call(
            "delete",
            lambda limit: self._backend.delete(name, timeout_s=limit),
            timeout_s=self.retry_policy.timeouts.delete_s,
            subject=name,
        )

    @contextlib.contextmanager
    def vm_for(self, purpose: str) -> Iterator[str]:
        """A VM name this session owns, for a VM its backend makes outside :meth:`create` (an
        import's first boot): recorded first, so the reaper deletes it if this process dies."""
        self._protect()
        record = self._claim(None, VMSpec(image=purpose))
        self._transition(record.id, VMState.CREATING)
        try:
            yield record.name
        finally:
            with contextlib.suppress(VMNotFound):
                self._backend_delete(record.name)
            self._record(record.id, VMState.GONE)

    def import_image(
        self, name: str, source: str | None = None, *, arch: str | None = None, **options: Any
    ) -> Path:
        """Import ``source`` as ``name`` (the backend's ``import_image``; its first boot is this
        session's VM, each download retried under the session's policy); without ``source``,
        the catalog's image ``name`` for ``arch`` (default this machine's), pinned. A backend
        whose images another one imports (libvirt's: qemu's) has a session of that one do it."""
        options["arch"] = parse_arch(arch)
        source = source or catalog_source(name, options, env=os.environ)
        if (by := self._backend.imported_by()) is not None:
            policy = self.retry_policy
            with Session(by[0], state_dir=self.state_dir, backend_options=by[1], retry=policy) as s:
                return s.import_image(name, source, **options)

        def retry(attempt: Callable[[], T]) -> T:
            total = self.retry_policy.total_s
            return self._call("download", lambda _: attempt(), timeout_s=total, subject=source)

        with self.vm_for(f"import {name}") as boot_vm:
            return self._backend.import_image(name, source, boot_vm=boot_vm, retry=retry, **options)

    def network(self, name: str) -> PrivateNetwork:
        """Private network ``name``, which this session's VMs join with ``networks=[name]``."""
        on = lambda: [vm.name for vm in self.vms() if name in vm.spec.networks]  # noqa: E731
        return PrivateNetwork(name, self._network_op, on)

    def _network_op(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            "network",
            lambda limit: self._backend.network_control(name, request, timeout_s=limit),
            timeout_s=self._timeouts.forward_s,
            subject=name,
        )

    def _vm_keep(self, vm: VM, why: str) -> None:
        name = vm.name
        self._call(
            "keep",
            lambda limit: self._backend.keep(name, timeout_s=limit),
            timeout_s=self.retry_policy.timeouts.mark_s,
            subject=name,
        )
        self._ledger.transition(vm.ledger_id, VMState.KEPT, detail=why)
        self._places.give_back(vm.ledger_id)
        with self._lock:
            self._vms.pop(vm.ledger_id, None)
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
            ops=self._metrics.summary(),
            retries=dict(self._retrier.stats.retries),
            longest_s=dict(self._retrier.stats.longest_s),
            adopted=self._adopted,
        )

    def close(self) -> None:
        """Delete every VM of this session that still exists, then close the ledger; safe to
        call twice. Ctrl-C and SIGTERM wait until the deleting is done. Raises BackendError
        naming the VMs that could not be deleted (failed in the ledger; the reaper tries again)."""
        failures = []
        with _signals.shielded("deleting this session's VMs"):
            self._closed = True
            for vm in self.vms():
                try:
                    vm.delete()
                except VMLeaseError as exc:
                    failures.append(f"{vm.name}: {exc}")
            self._record_later_writes()
            self._backend.close()
            if self._reaper is not None:
                self._reaper.close()
            if self._opened:
                self._opened = False
                _signals.session_closed()
                atexit.unregister(self._at_exit)
        if failures:  # the ledger stays open for another try
            raise BackendError("could not delete: " + "; ".join(failures))
        self._ledger.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except VMLeaseError:
            if exc_type is None:
                raise
        finally:
            self._ledger.close()
