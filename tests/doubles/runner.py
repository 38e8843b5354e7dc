"""A program runner that runs nothing: every call gets the same scripted answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vmlease._runner import Completed

__all__ = ["ScriptedRunner"]


class ScriptedRunner:
    """Answers every call with ``returncode`` and ``stderr``; records the calls."""

    def __init__(self, returncode: int | None, stderr: str = "") -> None:
        self.returncode = returncode
        self.stderr = stderr
        self.calls: list[list[str]] = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        self.calls.append(list(argv))
        return Completed(tuple(argv), self.returncode, "", self.stderr)
