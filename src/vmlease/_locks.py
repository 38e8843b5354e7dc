"""Locks between processes, on ``fcntl.flock``.

The kernel releases a lock when its holder dies, so there is no stale lock
to guess about. Lock files live in ``<state>/locks`` (mode 0700), never at a
predictable path in a shared /tmp.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from vmlease._errors import ConfigError, LockTimeout
from vmlease._paths import ensure_private_dir

__all__ = ["Semaphore", "Slot"]

_POLL_S = 0.05


class Slot:
    """One held place of a Semaphore; release it, or let the process end."""

    def __init__(self, fd: int, index: int) -> None:
        self._fd: int | None = fd
        self.index = index

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


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
            fd = os.open(
                self._dir / f"{self.name}.{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return Slot(fd, i)
        return None

    def acquire(self, timeout_s: float | None = None) -> Slot:
        """Wait for a free place; LockTimeout after ``timeout_s`` seconds (None: no limit)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while True:
            slot = self.try_acquire()
            if slot is not None:
                return slot
            if deadline is not None and self._clock() >= deadline:
                raise LockTimeout(
                    f"all {self.slots} places of {self.name!r} stayed taken for {timeout_s:g} s; "
                    "other test runs hold them (see `vmlease ls`), or raise the limit"
                )
            self._sleep(_POLL_S)
