"""The retry policy: what is retried, how long it waits, and its bounds."""

from __future__ import annotations

import logging
import random

import pytest

from tests.doubles.clock import FakeClock
from vmlease import BackendError, BackendTimeout, ConfigError, RetryPolicy, Timeouts
from vmlease._retry import Retrier


def transient(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.transient


def failing(times: int, *, cost_s: float = 0.0, clock: FakeClock | None = None) -> object:
    calls: list[float] = []

    def fn(limit_s: float) -> str:
        calls.append(limit_s)
        if clock is not None:
            clock.now += min(cost_s, limit_s)
        if len(calls) <= times:
            raise BackendError(f"flaky {len(calls)}", transient=True)
        return "done"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def retrier(policy: RetryPolicy, t: FakeClock) -> Retrier:
    return Retrier(policy, sleep=t.sleep, clock=t.clock, rng=random.Random(1))


def test_transient_failures_are_retried_until_one_succeeds() -> None:
    t = FakeClock()
    fn = failing(3)
    r = retrier(RetryPolicy(attempts=5), t)
    assert r.call("create", fn, timeout_s=10, transient=transient) == "done"  # type: ignore[arg-type]
    assert len(fn.calls) == 4  # type: ignore[attr-defined]
    assert r.stats.retries == {"create": 3}


def test_waits_grow_exponentially_with_bounded_jitter() -> None:
    t = FakeClock()
    policy = RetryPolicy(attempts=6, wait_initial_s=0.5, wait_max_s=3.0, wait_jitter_s=0.25)
    retrier(policy, t).call("exec", failing(5), timeout_s=10, transient=transient)  # type: ignore[arg-type]
    floors = [0.5, 1.0, 2.0, 3.0, 3.0]
    assert len(t.slept) == 5
    for slept, floor in zip(t.slept, floors, strict=True):
        assert floor <= slept <= floor + 0.25


def test_a_permanent_failure_surfaces_at_once() -> None:
    t = FakeClock()
    calls = []

    def fn(limit_s: float) -> None:
        calls.append(limit_s)
        raise BackendError("no such image", transient=False)

    with pytest.raises(BackendError, match="no such image") as info:
        retrier(RetryPolicy(), t).call("create", fn, timeout_s=10, transient=transient)
    assert len(calls) == 1
    assert t.slept == []
    assert not getattr(info.value, "__notes__", [])


def test_giving_up_after_the_attempts_says_so() -> None:
    t = FakeClock()
    fn = failing(10)
    with pytest.raises(BackendError, match="flaky 3") as info:
        retrier(RetryPolicy(attempts=3), t).call("start", fn, timeout_s=5, transient=transient)  # type: ignore[arg-type]
    assert len(fn.calls) == 3  # type: ignore[attr-defined]
    assert any("gave up on start after 3 attempt(s)" in n for n in info.value.__notes__)


def test_an_operation_and_its_retries_stay_inside_the_total_time() -> None:
    t = FakeClock()
    fn = failing(100, cost_s=4.0, clock=t)  # every attempt uses up its limit and fails
    policy = RetryPolicy(attempts=100, total_s=20.0, wait_initial_s=1.0, wait_max_s=2.0)
    with pytest.raises(BackendError):
        retrier(policy, t).call("create", fn, timeout_s=4.0, transient=transient)  # type: ignore[arg-type]
    assert t.now <= 20.0
    # each attempt got its own limit, cut to what was left of the total
    limits = fn.calls  # type: ignore[attr-defined]
    assert limits[0] == 4.0
    assert all(0 < limit <= 4.0 for limit in limits)


def test_retries_are_logged_with_operation_attempt_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeClock()
    with caplog.at_level(logging.WARNING, logger="vmlease.retry"):
        retrier(RetryPolicy(), t).call(
            "delete",
            failing(1),  # type: ignore[arg-type]
            timeout_s=5,
            transient=transient,
            subject="vmlease-abc-1",
        )
    [message] = [r.getMessage() for r in caplog.records]
    assert "retrying delete vmlease-abc-1" in message
    assert "attempt 1 of 5" in message
    assert "flaky 1" in message


def test_without_waits_retries_at_once() -> None:
    t = FakeClock()
    policy = RetryPolicy(attempts=4).without_waits()
    retrier(policy, t).call("exec", failing(3), timeout_s=1, transient=transient)  # type: ignore[arg-type]
    assert t.slept == [0.0, 0.0, 0.0]


def test_a_timeout_is_transient_by_default_and_other_errors_are_not() -> None:
    assert BackendTimeout("hung").transient
    assert not BackendError("broken").transient
    assert isinstance(BackendTimeout("hung"), TimeoutError)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: RetryPolicy(attempts=0), "attempts must be at least 1"),
        (lambda: RetryPolicy(attempts=2.5), "attempts must be a whole number"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(total_s=0), "total_s must be a number of seconds, more than 0"),
        (lambda: RetryPolicy(wait_max_s=-1), "wait_max_s must be a number of seconds, 0 or more"),
        (lambda: RetryPolicy(timeouts={"create_s": 1}), "timeouts must be a Timeouts"),  # type: ignore[arg-type]
        (lambda: Timeouts(create_s=0), "Timeouts.create_s must be a number of seconds"),
        (lambda: Timeouts(delete_s="10"), "Timeouts.delete_s must be a number of seconds"),  # type: ignore[arg-type]
    ],
)
def test_bad_policies_are_refused(make: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make()  # type: ignore[operator]


def test_a_policy_is_read_from_settings() -> None:
    policy = RetryPolicy.parse("attempts=8, total_s=90,create_s=400,delete_s=20,waits=off")
    assert policy.attempts == 8
    assert policy.total_s == 90.0
    assert policy.timeouts.create_s == 400.0
    assert policy.timeouts.delete_s == 20.0
    assert policy.wait_max_s == 0.0
    assert RetryPolicy.parse("") == RetryPolicy()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("attempts=many", "attempts must be a number"),
        ("tries=3", "KEY one of attempts"),
        ("create_s", "write KEY=VALUE pairs"),
        ("waits=sometimes", "waits must be on or off"),
        ("create_s=-5", "Timeouts.create_s must be a number of seconds"),
    ],
)
def test_bad_retry_settings_are_refused(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        RetryPolicy.parse(text)
