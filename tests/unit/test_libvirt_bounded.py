"""libvirt calls given up at their deadline."""

from __future__ import annotations

import threading

import pytest

from vmlease._errors import BackendTimeout, VMNotFound
from vmlease.backends.libvirt._bounded import within


def test_a_call_that_answers_in_time_gives_its_result_or_its_error() -> None:
    assert within(5, "x", lambda: 42) == 42

    def fails() -> int:
        raise VMNotFound("gone")

    with pytest.raises(VMNotFound, match="gone"):
        within(5, "x", fails)


def test_a_call_past_its_deadline_is_a_timeout_and_what_it_returns_late_is_handed_on() -> None:
    release = threading.Event()
    handed: list[str] = []
    handed_on = threading.Event()

    def slow() -> str:
        release.wait(5)
        return "stream"

    def late(value: str) -> None:
        handed.append(value)
        handed_on.set()

    said = r"deleting VM v: libvirt did not answer within 0\.1 s"
    with pytest.raises(BackendTimeout, match=said):
        within(0.1, "deleting VM v", slow, late=late)
    release.set()
    assert handed_on.wait(5)
    assert handed == ["stream"]
