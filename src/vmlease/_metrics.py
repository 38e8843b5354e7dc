"""Timing of every backend operation a session performs.

Kept in memory per session: cheap enough for the 1 ms command path. The
session reports it through ``Session.stats()``.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass

__all__ = ["Metrics", "OpStats", "SessionStats"]


@dataclass(frozen=True, slots=True)
class OpStats:
    """Figures for one kind of operation; times in seconds."""

    op: str
    count: int
    failures: int
    total_s: float
    median_s: float
    max_s: float


class Metrics:
    """Collects (operation, duration, ok) samples. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = {}
        self._failures: dict[str, int] = {}

    def record(self, op: str, duration_s: float, *, ok: bool) -> None:
        with self._lock:
            self._samples.setdefault(op, []).append(duration_s)
            if not ok:
                self._failures[op] = self._failures.get(op, 0) + 1

    def summary(self) -> dict[str, OpStats]:
        with self._lock:
            return {
                op: OpStats(
                    op=op,
                    count=len(s),
                    failures=self._failures.get(op, 0),
                    total_s=sum(s),
                    median_s=statistics.median(s),
                    max_s=max(s),
                )
                for op, s in sorted(self._samples.items())
            }


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Where a session's time went. Times in seconds."""

    session_id: str
    created: int
    deleted: int
    failed: int
    ops: dict[str, OpStats]
    retries: dict[str, int]
    longest_s: dict[str, float]
    adopted: int = 0
