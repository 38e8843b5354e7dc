"""Finding the processes a test started, by what their command line names."""

from __future__ import annotations

from pathlib import Path

from vmlease._procfs import pids


def processes_under(root: Path, program: bytes) -> list[int]:
    """Pids of live processes running ``program`` whose command line mentions ``root``."""
    needle = str(root).encode()
    return pids(lambda args: any(program in a for a in args) and any(needle in a for a in args))
