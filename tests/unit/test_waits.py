"""The one polling loop behind every wait: its timeout, its error, its input checks."""

from __future__ import annotations

import pytest

from tests.doubles.clock import FakeClock
from vmlease import ConfigError, WaitTimeout
from vmlease._waits import Check, listening_probe, poll, port_number


def test_poll_returns_the_first_passing_value() -> None:
    clock = FakeClock()
    answers = iter([Check(None, "not yet"), Check(None, "no"), Check(7)])
    value = poll(
        "w",
        lambda: next(answers),
        timeout_s=5,
        interval_s=0.5,
        console=str,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == 7
    assert clock.slept == [0.5, 0.5]


def test_a_timeout_shows_the_last_check_and_the_console() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout) as info:
        poll(
            "VM x: port 80",
            lambda: Check(None, "sockets: none"),
            timeout_s=2,
            interval_s=0.5,
            console=lambda: "login:",
            clock=clock,
            sleep=clock.sleep,
        )
    text = str(info.value)
    assert "VM x: port 80: not within 2 s" in text
    assert "sockets: none" in text
    assert "login:" in text
    assert info.value.detail == "sockets: none"
    assert clock.now == pytest.approx(2.0)
    assert isinstance(info.value, TimeoutError)


def test_a_final_check_stops_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout, match="cannot happen any more"):
        poll(
            "unit",
            lambda: Check(None, "failed", final=True),
            timeout_s=60,
            interval_s=1,
            console=str,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.slept == []


@pytest.mark.parametrize("bad", [0, -1, True, "5"])
def test_bad_timeouts_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        poll("w", lambda: Check(1), timeout_s=bad, interval_s=1, console=str)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, 70000, -22, 22.0, "22", True])
def test_a_port_is_1_to_65535(bad: object) -> None:
    with pytest.raises(ConfigError, match="a port is a whole number from 1 to 65535"):
        port_number(bad)


def test_the_listening_probe_matches_a_listening_socket_line_only(tmp_path: object) -> None:
    import re

    pattern = listening_probe(8080)[2].split("'")[1]
    listening = "   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000"
    connected = "   4: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000"
    assert re.search(pattern, listening, re.I)
    assert not re.search(pattern, connected, re.I)
