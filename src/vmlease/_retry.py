"""The retry policy the session applies to every backend operation.

Backends classify their own errors (``Backend.classify``); the session
retries the transient ones under one bounded policy and lets permanent ones
through at once. The loop itself is tenacity's, with exponential backoff
plus jitter, stopped by a number of attempts *and* a total time. Every attempt
gets the operation's own timeout, cut to what is left of the total, so an
operation with its retries never takes longer than ``total_s``.

All times are in seconds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import tenacity

from vmlease._errors import BackendTimeout, ConfigError
from vmlease._timeouts import Timeouts

__all__ = ["Retrier", "RetryPolicy", "RetryStats", "Timeouts"]

T = TypeVar("T")
log = logging.getLogger("vmlease.retry")


def _positive(owner: str, name: str, value: object, *, zero: bool = False) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and float(value) >= 0 and (zero or float(value) > 0):  # type: ignore[arg-type]
        return
    least = "0 or more" if zero else "more than 0"
    raise ConfigError(f"{owner}.{name} must be a number of seconds, {least}, not {value!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds for retrying transient backend failures.

    Attributes:
        attempts: tries per operation, the first included (1: no retries).
        total_s: the most one operation may take, its retries and waits included.
        wait_initial_s: the wait before the first retry; it doubles each time...
        wait_max_s: ...up to this.
        wait_jitter_s: plus a random 0 to this much, so that processes that
            failed together do not retry together.
        timeouts: each operation's limit per attempt.
    """

    attempts: int = 5
    total_s: float = 600.0
    wait_initial_s: float = 0.5
    wait_max_s: float = 10.0
    wait_jitter_s: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"RetryPolicy.attempts must be a whole number, not {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        _positive("RetryPolicy", "total_s", self.total_s)
        for name in ("wait_initial_s", "wait_max_s", "wait_jitter_s"):
            _positive("RetryPolicy", name, getattr(self, name), zero=True)
        if not isinstance(self.timeouts, Timeouts):
            raise ConfigError(f"RetryPolicy.timeouts must be a Timeouts, not {self.timeouts!r}")

    @classmethod
    def parse(cls, text: str) -> RetryPolicy:
        """A policy from ``attempts=8,total_s=300,create_s=600,waits=off``: any
        field of RetryPolicy or Timeouts; ``waits=off`` is ``without_waits()``."""
        policy: dict[str, object] = {}
        timeouts: dict[str, object] = {}
        no_waits = False
        timeout_names = {f.name for f in fields(Timeouts)}
        policy_names = {f.name for f in fields(cls)} - {"timeouts"}
        known = ", ".join([*sorted(policy_names), *sorted(timeout_names), "waits"])
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = (x.strip() for x in part.partition("="))
            if not sep or key not in {*policy_names, *timeout_names, "waits"}:
                raise ConfigError(
                    f"cannot read the retry setting {part!r}: write KEY=VALUE pairs "
                    f"separated by commas, KEY one of {known} (waits=on|off)"
                )
            if key == "waits":
                if value not in ("on", "off"):
                    raise ConfigError(f"waits must be on or off, not {value!r}")
                no_waits = value == "off"
                continue
            try:
                number = int(value) if key == "attempts" else float(value)
            except ValueError:
                raise ConfigError(
                    f"the retry setting {key} must be a number, not {value!r}"
                ) from None
            (policy if key in policy_names else timeouts)[key] = number
        made = cls(timeouts=Timeouts(**timeouts), **policy)  # type: ignore[arg-type]
        return made.without_waits() if no_waits else made

    def without_waits(self) -> RetryPolicy:
        """The same policy with no waiting between attempts: for test suites
        that inject failures and want them retried at once."""
        return replace(self, wait_initial_s=0.0, wait_max_s=0.0, wait_jitter_s=0.0)


@dataclass
class RetryStats:
    """What retrying cost so far, by operation: retries, seconds waited between
    attempts, and the longest an operation took with its retries."""

    retries: dict[str, int] = field(default_factory=dict)
    waited_s: dict[str, float] = field(default_factory=dict)
    longest_s: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_retry(self, op: str, waited_s: float) -> None:
        with self._lock:
            self.retries[op] = self.retries.get(op, 0) + 1
            self.waited_s[op] = self.waited_s.get(op, 0.0) + waited_s

    def add_call(self, op: str, took_s: float) -> None:
        with self._lock:
            self.longest_s[op] = max(self.longest_s.get(op, 0.0), took_s)


class Retrier:
    """Runs backend operations under a RetryPolicy.

    Args:
        policy: the bounds.
        sleep: waits between attempts (injected for tests).
        clock: monotonic seconds (injected for tests).
        rng: the source of jitter (injected for tests).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self._random = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._sleep = sleep
        self._clock = clock
        self.stats = RetryStats()

    def call(
        self,
        op: str,
        fn: Callable[[float], T],
        *,
        timeout_s: float,
        transient: Callable[[BaseException], bool],
        subject: str = "",
        before_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``fn(limit_s)`` until it succeeds, fails permanently, or the policy's
        bounds run out; then its last error is raised with a note saying so.

        ``limit_s`` is ``timeout_s`` or, near the end of ``total_s``, what is
        left of it. ``before_retry`` runs before each new attempt (it may
        raise, which ends the retrying with that error).
        """
        policy = self.policy
        start = self._clock()
        deadline = start + policy.total_s
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            left = deadline - self._clock()
            if left <= 0:
                raise BackendTimeout(
                    f"{op} {subject}: no time left of the {policy.total_s:g} s "
                    "allowed for it and its retries"
                )
            return fn(min(timeout_s, left))

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, Exception) and transient(exc)

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.stats.add_retry(op, wait)
            log.warning(
                "retrying %s %s (attempt %d of %d failed: %s); next attempt in %.2f s",
                op,
                subject,
                state.attempt_number,
                policy.attempts,
                exc,
                wait,
            )
            if before_retry is not None and exc is not None:
                before_retry(exc)

        def wait(state: tenacity.RetryCallState) -> float:
            # Exponential backoff with jitter: 1x, 2x, 4x ... the initial wait,
            # capped, plus up to wait_jitter_s at random.
            backoff: float = policy.wait_initial_s * 2.0 ** (state.attempt_number - 1)
            return min(policy.wait_max_s, backoff) + self._random.uniform(0, policy.wait_jitter_s)

        def stop(state: tenacity.RetryCallState) -> bool:
            # The total bound counts the wait before the next attempt too.
            return (
                state.attempt_number >= policy.attempts
                or self._clock() + (state.upcoming_sleep or 0.0) >= deadline
            )

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(retryable),
            before_sleep=log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except Exception as exc:
            if attempts > 1:
                exc.add_note(
                    f"vmlease gave up on {op} after {attempts} attempt(s) in "
                    f"{self._clock() - start:.1f} s (limits: {policy.attempts} attempts, "
                    f"{policy.total_s:g} s)"
                )
            raise
        finally:
            self.stats.add_call(op, self._clock() - start)
