"""One process's share of a test run: its session, the VMs tests are given,
what to keep, what to report. The pytest plugin is a thin face on this.

The kinds of VM a test can get:

- *clean* (the ``vm`` fixture): VMs reset between tests, so isolation costs a
  reset instead of a boot. Where the backend can (``VM.can_reset``: QEMU VMs
  started from a mapped booted state) a reset starts the VM again from that
  state; otherwise the VM is snapshotted right after it is made and restored
  to that snapshot. Two per worker and spec take turns: while a test runs
  on one, the other is reset (and run once, so its first command is not
  slow) in a background thread, which takes the reset off the test's path;
  the resets of the two overlap when tests are shorter than a reset.
  Under a VM limit (``max_vms``) there is one, restored between tests.
  Backends without snapshots give a fresh VM per test instead.
- *fresh* (``@pytest.mark.vm(fresh=True)``, ``vm_factory``, ``vm_pool``): made
  for one test, deleted when it ends.
- *worker* (``worker_vm``): one per worker and spec for the whole run; state
  carries over from test to test.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from vmlease import backends
from vmlease._errors import ConfigError, VMLeaseError
from vmlease._inventory import inventory
from vmlease._ledger import VMState
from vmlease._options import KEEP_CHOICES, Keep, RunOptions
from vmlease._paths import state_dir as default_state_dir
from vmlease._retry import RetryPolicy
from vmlease._session import Session
from vmlease._spec import VMSpec
from vmlease._vm import VM
from vmlease.backends import Backend

__all__ = [
    "CLEAN_TAG",
    "KEEP_CHOICES",
    "Keep",
    "RunOptions",
    "TestRun",
    "Use",
    "UseKind",
    "left_behind",
]

CLEAN_TAG = "vmlease-clean"
_OUTPUT_SHOWN = 600


class UseKind(enum.StrEnum):
    """How a test got its VM (see the module's docstring)."""

    CLEAN = "clean"
    FRESH = "fresh"
    WORKER = "worker"


@dataclass
class Use:
    """One VM as one test used it."""

    vm: VM
    kind: UseKind
    transcript_from: int
    kept: bool = False


@dataclass
class _Counts:
    created: int = 0
    reused: int = 0
    restored: int = 0
    #: Of the resets (``restored``), those that started the VM again from its state.
    reset_by_start: int = 0
    deleted: int = 0
    kept: list[str] = field(default_factory=list)


class TestRun:
    """The VMs of one process of a test run."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self, options: RunOptions, *, make_session: Callable[[RunOptions], Session] | None = None
    ) -> None:
        self.options = options
        self._make_session = make_session or _session_for
        self._session: Session | None = None
        # Clean VMs by spec: each entry becomes a ready VM once its restore (or boot) is done.
        self._clean: dict[VMSpec, list[Future[VM]]] = {}
        self._clean_specs: dict[str, VMSpec] = {}  # VM name -> spec, for clean VMs
        # Two threads: the resets of two clean VMs that take turns overlap, which
        # halves what isolation costs short tests (each VM is reset by one thread).
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmlease-reset")
        self._workers: dict[VMSpec, VM] = {}
        self._by_start: set[str] = set()  # clean VMs reset by a new start, not a snapshot
        self._keep_at_end: set[str] = set()
        self._handed: set[str] = set()
        self.counts = _Counts()
        self._count_lock = threading.Lock()

    def _count(self, what: str, n: int = 1) -> None:
        with self._count_lock:
            setattr(self.counts, what, getattr(self.counts, what) + n)

    # -- the session ------------------------------------------------------

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = self._make_session(self.options)
        return self._session

    @property
    def used(self) -> bool:
        return self._session is not None

    def spec(self, asked: Mapping[str, object] | None = None) -> VMSpec:
        """The run's default spec with what a test ``asked`` for."""
        return self.options.spec.asking(asked or {})

    def _create(self, spec: VMSpec) -> VM:
        vm = self.session.create(spec=spec)
        self._count("created", 1)
        return vm

    def _use(self, vm: VM, kind: UseKind) -> Use:
        """Hand ``vm`` to a test; a VM handed out before counts as reused."""
        if vm.name in self._handed:
            self._count("reused", 1)
        self._handed.add(vm.name)
        return Use(vm=vm, kind=kind, transcript_from=len(vm.transcript))

    # -- handing out VMs --------------------------------------------------------

    @property
    def takes_turns(self) -> bool:
        """Whether clean VMs come in pairs (no VM limit to respect)."""
        return self.options.max_vms is None

    def clean_vm(self, spec: VMSpec) -> Use:
        """A VM of ``spec`` as it was right after boot."""
        if not self.session.backend.capabilities.snapshots:
            return self.fresh_vm(spec)
        turns = self._clean.setdefault(spec, [])
        if not turns:
            vm = self._new_clean(spec)
            if self.takes_turns:
                turns.append(self._background.submit(self._new_clean, spec))
        else:
            ready = next((f for f in turns if f.done()), turns[0])
            turns.remove(ready)
            try:
                vm = ready.result()
            except VMLeaseError:
                vm = self._new_clean(spec)  # a reset failed: that VM is gone or broken
        self._clean_specs[vm.name] = spec
        return self._use(vm, UseKind.CLEAN)

    def settle(self) -> None:
        """Wait until the background resets and boots queued so far are done."""
        pending = [f for turns in self._clean.values() for f in turns]
        wait(pending)

    def _new_clean(self, spec: VMSpec) -> VM:
        vm = self._create(spec)
        if vm.can_reset:
            self._by_start.add(vm.name)
        else:
            vm.snapshot(CLEAN_TAG)
        return vm

    def _reset(self, vm: VM) -> VM:
        """Back to how it was made (a new start from its state, or its clean
        snapshot), warmed up; deleted if that fails."""
        by_start = vm.name in self._by_start
        try:
            if by_start:
                vm.reset()
            else:
                vm.restore(CLEAN_TAG)
            vm.run(["true"])  # the first command after a reset is slow; take it here
        except VMLeaseError:
            vm.delete()
            self._count("deleted", 1)
            raise
        self._count("restored", 1)
        if by_start:
            self._count("reset_by_start", 1)
        return vm

    def fresh_vm(self, spec: VMSpec) -> Use:
        """A new VM for one test."""
        return self._use(self._create(spec), UseKind.FRESH)

    def worker_vm(self, spec: VMSpec) -> Use:
        """The worker's long-lived VM of ``spec``; state carries over between tests."""
        vm = self._workers.get(spec)
        if vm is None:
            vm = self._create(spec)
            self._workers[spec] = vm
        return self._use(vm, UseKind.WORKER)

    def pool(self, count: int, spec: VMSpec) -> list[Use]:
        """``count`` new VMs, created at once; if any fails, the others are deleted."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"a pool needs a whole number of VMs, at least 1, not {count!r}")
        self.session.prepare()  # reaper and signal handlers from this (the main) thread
        with ThreadPoolExecutor(max_workers=count) as threads:
            futures = [threads.submit(self._create, spec) for _ in range(count)]
        made = [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            for vm in made:
                vm.delete()
                self._count("deleted", 1)
            raise errors[0]  # type: ignore[misc]
        return [self._use(vm, UseKind.FRESH) for vm in made]

    # -- the end of a test ---------------------------------------------------------

    def mark_kept_on_failure(self, uses: list[Use]) -> None:
        """A test failed: decide now which of its VMs will be kept, so that its
        report can say how to reach them (a worker's VM is kept at the end)."""
        keep = self.should_keep(failed=True)
        for use in uses:
            use.kept = keep and use.kind is not UseKind.WORKER

    def should_keep(self, failed: bool) -> bool:
        return self.options.keep is Keep.ALWAYS or (self.options.keep is Keep.FAILED and failed)

    def finish(self, uses: list[Use], failed: bool) -> None:
        """A test ended: delete or keep its fresh VMs, reset or keep its clean VM."""
        keep = self.should_keep(failed)
        for use in uses:
            vm = use.vm
            if use.kind is UseKind.WORKER:
                if keep:
                    self._keep_at_end.add(vm.name)
                continue
            if keep:
                self._keep(vm, "kept after test")
                use.kept = True
                self._clean_specs.pop(vm.name, None)
                continue
            if use.kind is UseKind.CLEAN:
                spec = self._clean_specs[vm.name]
                self._clean[spec].append(self._background.submit(self._reset, vm))
            elif use.kind is UseKind.FRESH:
                vm.delete()
                self._count("deleted", 1)

    def _keep(self, vm: VM, why: str) -> None:
        vm.keep(why)
        self.counts.kept.append(vm.name)

    def report(self, uses: list[Use]) -> list[tuple[str, str]]:
        """Sections for a failed test's report: its commands, the console, how to reach kept VMs."""
        sections = []
        for use in uses:
            vm = use.vm
            lines = []
            for entry in vm.transcript[use.transcript_from :]:
                status = "no exit code" if entry.exit_code is None else f"exit {entry.exit_code}"
                lines.append(f"$ {' '.join(entry.argv)}   ({status}, {entry.duration_s:.3f} s)")
                for label, text in (("stdout", entry.stdout), ("stderr", entry.stderr)):
                    if text:
                        shown = text[:_OUTPUT_SHOWN] + (" ..." if len(text) > _OUTPUT_SHOWN else "")
                        lines.append(f"  {label}: " + shown.rstrip().replace("\n", "\n          "))
            sections.append((f"vmlease: commands run in {vm.name}", "\n".join(lines) or "(none)"))
            try:
                console = vm.console_tail(30)
            except VMLeaseError:
                console = ""
            sections.append((f"vmlease: console of {vm.name} (last lines)", console or "(empty)"))
            if use.kept or (use.kind is UseKind.WORKER and vm.name in self._keep_at_end):
                when = "is" if use.kept else "will be, after the run,"
                sections.append(
                    (
                        f"vmlease: {vm.name} kept",
                        f"The VM {when} kept running for inspection. Reach it with:\n"
                        f"  vmlease exec {vm.name} -- sh -c 'your command'\n"
                        "Remove it, and any other kept VM, with:\n  vmlease cleanup",
                    )
                )
        return sections

    # -- the end of the run ------------------------------------------------------

    def close(self) -> dict[str, Any]:
        """Delete the worker's VMs (keeping those asked for) and end the session.

        Returns the figures for the run's summary.
        """
        started = time.monotonic()
        clean: list[VM] = []
        for turns in self._clean.values():
            for turn in turns:
                with contextlib.suppress(VMLeaseError):  # deleted when its reset failed
                    clean.append(turn.result())
        self._background.shutdown(wait=True)
        if self._session is not None:
            keep_all = self.options.keep is Keep.ALWAYS
            for vm in [*clean, *self._workers.values()]:
                if vm.name in self._keep_at_end or (keep_all and vm.state.value == "ready"):
                    self._keep(vm, "kept after the run")
            self._count("deleted", len(self._session.vms()))
            self._session.close()
        stats = self._session.stats() if self._session is not None else None
        ops = stats.ops if stats is not None else {}

        def total(*names: str) -> float:
            return sum(ops[n].total_s for n in names if n in ops)

        return {
            "session_id": self._session.id if self._session is not None else None,
            "created": self.counts.created,
            "reused": self.counts.reused,
            "restored": self.counts.restored,
            "reset_by_start": self.counts.reset_by_start,
            "deleted": self.counts.deleted,
            "kept": list(self.counts.kept),
            "boot_s": total("create", "boot", "mark"),
            "restore_s": total("restore", "snapshot", "reset"),
            "vm_ops_s": total(
                "create", "boot", "mark", "restore", "snapshot", "reset", "delete", "wait"
            ),
            "exec_s": total("exec", "put", "get"),
            "close_s": time.monotonic() - started,
            "retries": dict(stats.retries) if stats is not None else {},
            "longest_op_s": dict(stats.longest_s) if stats is not None else {},
            "adopted": stats.adopted if stats is not None else 0,
            "faults": self._session.backend.injected_faults() if self._session is not None else 0,
        }


def _session_for(options: RunOptions) -> Session:
    kwargs: dict[str, Any] = {}
    if options.max_age_s is not None:
        kwargs["max_age_s"] = options.max_age_s
    backend: str | Backend = options.backend
    if options.backend_options:
        backend = backends.get(
            options.backend,
            state_dir=options.state_dir or default_state_dir(),
            **options.backend_options,
        )
    if options.faults:
        from vmlease.testing import FlakyBackend, check_faults

        inner = (
            backend
            if isinstance(backend, Backend)
            else backends.get(options.backend, state_dir=options.state_dir or default_state_dir())
        )
        backend = FlakyBackend(inner, **check_faults(options.faults))  # type: ignore[arg-type]
    if options.retry:
        kwargs["retry"] = RetryPolicy.parse(options.retry)
    return Session(
        backend=backend,
        state_dir=options.state_dir,
        session_id=options.session_id,
        name_tag=options.worker,
        max_vms=options.max_vms,
        **kwargs,
    )


def left_behind(options: RunOptions, session_ids: set[str]) -> list[str]:
    """VMs of the run's sessions that still exist and were not kept on purpose."""
    rows = inventory(options.state_dir or default_state_dir())
    return [
        r.record.name
        for r in rows
        if r.record.owner.session_id in session_ids and r.record.state is not VMState.KEPT
    ]
