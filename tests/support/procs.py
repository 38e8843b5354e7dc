"""Finding the processes a test started, by what their command line names."""

from __future__ import annotations

from pathlib import Path


def processes_under(root: Path, program: bytes) -> list[int]:
    """Pids of live processes running ``program`` whose command line mentions ``root``."""
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if program in cmdline and needle in cmdline:
            found.append(int(entry.name))
    return found
