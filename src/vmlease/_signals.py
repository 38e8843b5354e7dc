"""Orderly exits on signals.

- SIGTERM, whose default is to end the process on the spot, raises
  :class:`Terminated` in the main thread while any session is open, so the
  program unwinds as on Ctrl-C and sessions delete their VMs. A handler the
  program installed itself is left alone.
- While a session deletes its VMs, Ctrl-C and SIGTERM are held back and
  delivered afterwards: a second Ctrl-C does not abandon VMs half-deleted.

Python lets only the main thread set handlers; sessions used from other
threads rely on the reaper alone.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from vmlease._errors import Terminated

__all__ = ["session_closed", "session_opened", "shielded"]

_lock = threading.Lock()
_open_sessions = 0
_shield_depth = 0  # main thread only


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated("terminated by SIGTERM")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def session_opened() -> None:
    """A session will own VMs: make SIGTERM unwind the program."""
    global _open_sessions
    with _lock:
        _open_sessions += 1
        if _main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def session_closed() -> None:
    """A session ended; the last one restores SIGTERM's default."""
    global _open_sessions
    with _lock:
        _open_sessions = max(0, _open_sessions - 1)
        if (
            _open_sessions == 0
            and _main_thread()
            and signal.getsignal(signal.SIGTERM) is _on_sigterm
        ):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def shielded(what: str) -> Iterator[None]:
    """Hold back SIGINT and SIGTERM while the block runs; deliver them after it.

    Nested blocks are part of the outermost one: a signal held during an
    inner block waits until the outermost ends (a session deleting its VMs
    one by one finishes all of them).
    """
    global _shield_depth
    if not _main_thread():
        yield
        return
    if _shield_depth:
        _shield_depth += 1
        try:
            yield
        finally:
            _shield_depth -= 1
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if not pending:
            print(f"vmlease: {what}; it finishes first so nothing is left behind", file=sys.stderr)
        pending.append(signum)

    old_int = signal.signal(signal.SIGINT, hold)
    old_term = signal.signal(signal.SIGTERM, hold)
    _shield_depth = 1
    try:
        yield
    finally:
        _shield_depth = 0
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if pending:
        raise (
            KeyboardInterrupt
            if pending[0] == signal.SIGINT
            else Terminated("terminated by SIGTERM")
        )
