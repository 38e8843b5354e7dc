"""Build progress: plain lines in logs, a live line on a terminal."""

from __future__ import annotations

import io

from tests.doubles.clock import FakeClock
from vmlease._progress import Progress


def test_in_a_log_every_step_is_one_plain_line() -> None:
    out = io.StringIO()
    with Progress(out) as progress:  # a StringIO is not a terminal
        progress("unpacking")
        progress("making the root disk")
    assert out.getvalue() == "vmlease: unpacking\nvmlease: making the root disk\n"


def test_on_a_terminal_a_step_is_rewritten_in_place_with_its_time() -> None:
    out = io.StringIO()
    clock = FakeClock()
    with Progress(out, live=True, tick_s=3600, clock=clock) as progress:
        progress("installing Debian")
        clock.now = 30.0
        progress("making the root disk")
        clock.now = 32.0
    text = out.getvalue()
    assert "\r\x1b[Kvmlease: installing Debian (0 s)" in text
    assert "\r\x1b[Kvmlease: installing Debian (30 s)\n" in text
    assert text.endswith("\r\x1b[Kvmlease: making the root disk (2 s)\n")
