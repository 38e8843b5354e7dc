"""A clock for unit tests: time moves only when something sleeps or is moved on."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """Monotonic seconds that advance only through ``sleep`` or ``now``.

    Call it (or ``clock()``) for the time; pass ``sleep`` where the code waits.
    ``slept`` lists every wait asked for.
    """

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
