"""Running host programs: one injectable runner, errors translated at the boundary.

Programs are found on ``PATH`` and then where Debian puts system tools
(``/usr/local/sbin``, ``/usr/sbin``, ``/sbin``): a normal user's ``PATH`` has
none of those, but ``mke2fs`` and its kin run fine without root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["SYSTEM_DIRS", "Completed", "Runner", "SubprocessRunner", "find_program", "search_path"]

#: Where system tools live on Debian, searched after ``PATH``.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def search_path(env: Mapping[str, str] | None = None) -> str:
    """``PATH`` (from ``env``, else this process's) followed by the system tool folders."""
    path = (os.environ if env is None else env).get("PATH", os.defpath)
    have = path.split(os.pathsep)
    return os.pathsep.join([*have, *(d for d in SYSTEM_DIRS if d not in have)])


def find_program(program: str, env: Mapping[str, str] | None = None) -> str | None:
    """The full path of ``program`` (searched as ``search_path`` says), or None."""
    return shutil.which(program, path=search_path(env))


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
        command = list(argv)
        if command and os.sep not in command[0]:
            command[0] = find_program(command[0], full_env) or command[0]
        try:
            proc = subprocess.run(
                command,
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
