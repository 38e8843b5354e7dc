"""Locks between processes, on ``fcntl.flock``.

The kernel releases a lock when its holder dies, so there is no stale lock
to guess about. Lock files live in ``<state>/locks`` (mode 0700), never at a
predictable path in a shared /tmp. Whoever holds a lock writes who they are
(pid, command, since when) into its file, so that one who waits too long is
told whom they waited for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import ConfigError, LockTimeout
from vmlease._paths import ensure_private_dir
from vmlease._paths import state_dir as default_state_dir
from vmlease._procfs import own_command

__all__ = [
    "Holder",
    "Lock",
    "Places",
    "Semaphore",
    "Slot",
    "run_holding",
]

_POLL_S = 0.05
_LOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock, as they wrote it when they took it."""

    pid: int
    command: str
    since: float  # seconds since the epoch

    def describe(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} ({self.command or 'unknown command'}), since {stamp}"


def _claim_file(fd: int) -> None:
    """Write this process into the lock file it now holds."""
    record = json.dumps({"pid": os.getpid(), "command": own_command(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(
            pid=int(data["pid"]), command=str(data["command"]), since=float(data["since"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never held, or being written this very moment


class Slot:
    """One held place of a Semaphore (or a held Lock); release it, or let the process end."""

    def __init__(self, fd: int, index: int) -> None:
        self._fd: int | None = fd
        self.index = index

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_flock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _claim_file(fd)
    return fd


class Lock:
    """A named exclusive lock across processes: ``with Lock("db", timeout_s=60): ...``.

    Args:
        name: 1 to 64 letters, digits, ``_``, ``.`` or ``-``.
        timeout_s: how long ``acquire`` (and ``with``) waits; None waits for ever.
        state_dir: where the lock file lives (default: vmlease's state directory).
        clock, sleep: injected for tests.

    A holder that dies frees the lock at once (the kernel drops its flock).
    A wait that runs out raises LockTimeout naming the holder.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout_s: float | None = None,
        state_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(name, str) or not _LOCK_NAME.fullmatch(name):
            raise ConfigError(
                f"invalid lock name {name!r}: 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if timeout_s is not None and (
            isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s < 0
        ):
            raise ConfigError(f"timeout_s must be 0 or more seconds, or None, not {timeout_s!r}")
        self.name = name
        self.timeout_s = timeout_s
        self.path = ensure_private_dir((state_dir or default_state_dir()) / "locks") / (
            f"{name}.lock"
        )
        self._clock = clock
        self._sleep = sleep
        self._held: Slot | None = None

    def acquire(self, timeout_s: float | None = None) -> Slot:
        """Take the lock, waiting up to ``timeout_s`` (default: the lock's own)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if limit is None else self._clock() + limit
        while True:
            fd = _try_flock(self.path)
            if fd is not None:
                return Slot(fd, 0)
            if deadline is not None and self._clock() >= deadline:
                holder = _read_holder(self.path)
                who = holder.describe() if holder else "a process that did not say who it is"
                raise LockTimeout(
                    f"lock {self.name!r} stayed taken for {limit:g} s; it is held by {who}. "
                    f"Wait longer (a larger timeout), or end that process: "
                    f"its lock is free the moment it exits"
                )
            self._sleep(_POLL_S)

    def __enter__(self) -> Lock:
        self._held = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None


class Semaphore:
    """At most ``slots`` holders at once, across every process using ``state_dir``.

    Each place is a file ``<state>/locks/<name>.<i>``; holding a place is
    holding an exclusive flock on its file.
    """

    def __init__(
        self,
        state_dir: Path,
        name: str,
        slots: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigError(
                f"the number of places must be a whole number of at least 1, not {slots!r}"
            )
        self._dir = ensure_private_dir(state_dir / "locks")
        self.name = name
        self.slots = slots
        self._clock = clock
        self._sleep = sleep

    def try_acquire(self) -> Slot | None:
        """A free place now, or None."""
        for i in range(self.slots):
            fd = _try_flock(self._dir / f"{self.name}.{i}")
            if fd is not None:
                return Slot(fd, i)
        return None

    def _holders(self) -> list[Holder]:
        """Who last took each place (right after all were found taken: who holds them)."""
        found = (_read_holder(self._dir / f"{self.name}.{i}") for i in range(self.slots))
        return [h for h in found if h is not None]

    def acquire(self, timeout_s: float | None = None) -> Slot:
        """Wait for a free place; LockTimeout after ``timeout_s`` seconds (None: no limit)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while True:
            slot = self.try_acquire()
            if slot is not None:
                return slot
            if deadline is not None and self._clock() >= deadline:
                who = "; ".join(h.describe() for h in self._holders()) or "unknown processes"
                raise LockTimeout(
                    f"all {self.slots} places of {self.name!r} stayed taken for {timeout_s:g} s, "
                    f"held by {who}; wait for those runs (see `vmlease ls`), or raise the limit"
                )
            self._sleep(_POLL_S)


def run_holding(lock: Lock, argv: Sequence[str], *, timeout_s: float | None = None) -> int:
    """Run ``argv`` (no shell) while holding ``lock``; return its exit status.

    The status is the command's own, 128 + N if signal N ended it, 127 if it
    does not exist, 126 if it cannot be run. SIGTERM and SIGHUP sent to this
    process are passed on to the command (Ctrl-C reaches it through the
    terminal). The lock is this process's, not the command's: it is free
    once the command ends, even if the command left something running.
    """
    if not argv:
        raise ConfigError("no command given: vmlease lock NAME -- COMMAND [ARG...]")
    with lock.acquire(timeout_s):
        try:
            child = subprocess.Popen(list(argv))
        except FileNotFoundError:
            print(f"vmlease: {argv[0]}: command not found", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"vmlease: {argv[0]}: permission denied", file=sys.stderr)
            return 126

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:
                    continue  # the command got the Ctrl-C too; its exit decides
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 128 - code if code < 0 else code


class Places:
    """The places under a limit of VMs at once that one session's VMs hold, by
    ledger id; without a limit, none is needed.

    Args:
        state_dir: the state directory whose sessions share the limit.
        limit: at most this many VMs at once (None: no limit).
        timeout_s: how long taking a place may wait.
    """

    def __init__(self, state_dir: Path, limit: int | None, timeout_s: float) -> None:
        self._semaphore = Semaphore(state_dir, "vm", limit) if limit is not None else None
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._held: dict[int, Slot] = {}

    @property
    def limited(self) -> bool:
        return self._semaphore is not None

    def take(self) -> Slot | None:
        """A place, waited for up to ``timeout_s``; None without a limit."""
        if self._semaphore is None:
            return None
        return self._semaphore.acquire(self._timeout_s)

    def hold(self, vm_id: int, place: Slot | None) -> None:
        """VM ``vm_id`` holds ``place`` until it is given back."""
        if place is not None:
            with self._lock:
                self._held[vm_id] = place

    def give_back(self, vm_id: int) -> None:
        with self._lock:
            place = self._held.pop(vm_id, None)
        if place is not None:
            place.release()
