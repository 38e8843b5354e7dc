"""SIGTERM unwinds like Ctrl-C; held signals wait for the outermost shield."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from vmlease import Terminated
from vmlease._signals import session_closed, session_opened, shielded


def signal_self(signum: int) -> None:
    """Send ``signum`` to this process and give its handler a turn to run."""
    os.kill(os.getpid(), signum)
    signal.sigtimedwait([], 0.1)


@pytest.fixture(autouse=True)
def default_sigterm() -> Iterator[None]:
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, old)


def test_sigterm_raises_terminated_while_a_session_is_open() -> None:
    session_opened()
    try:
        with pytest.raises(Terminated):
            signal_self(signal.SIGTERM)
    finally:
        session_closed()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_handler_of_the_program_is_left_alone() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, mine)
    session_opened()
    session_closed()
    assert signal.getsignal(signal.SIGTERM) is mine


def test_a_held_ctrl_c_is_delivered_after_the_outermost_block() -> None:
    reached = []

    def work() -> None:
        with shielded("outer"):
            with shielded("inner"):
                signal_self(signal.SIGINT)
                reached.append("inner end")
            reached.append("outer continues")  # not cut short by the inner block

    with pytest.raises(KeyboardInterrupt):
        work()
    assert reached == ["inner end", "outer continues"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigterm_becomes_terminated() -> None:
    def work() -> None:
        with shielded("work"):
            signal_self(signal.SIGTERM)

    with pytest.raises(Terminated):
        work()


def test_an_exception_in_the_block_is_not_masked() -> None:
    with pytest.raises(ValueError, match="inner"), shielded("work"):
        raise ValueError("inner")
