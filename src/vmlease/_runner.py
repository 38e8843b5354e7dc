"""Running host programs: one injectable runner, errors translated at the boundary."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Completed", "Runner", "SubprocessRunner"]


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished program. ``returncode`` is None when it ran out of time (and was killed)."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs a program to completion. Never raises for a non-zero exit."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed: ...


class SubprocessRunner:
    """The real runner: ``subprocess.run`` with an argument list, never a shell.

    A missing program is reported as returncode 127 with the OS message on
    stderr, the way a shell would, so callers handle one shape of failure.
    """

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.run(
                list(argv),
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return Completed(tuple(argv), None, _text(exc.stdout), _text(exc.stderr))
        except OSError as exc:
            return Completed(tuple(argv), 127, "", f"{argv[0]}: {exc.strerror}")
        return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
