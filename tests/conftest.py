"""Test-wide set-up: an isolated state directory, and a check that nothing is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _qemu_processes_under(root: Path) -> list[int]:
    """Pids of live qemu processes whose command line mentions ``root``."""
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def state_root() -> Iterator[Path]:
    """Every test's VMs live under one temporary state directory.

    At the end of the run the directory must hold no VM directory and no
    qemu process may refer to it. Leftovers are killed and removed, and the
    run fails: a leak in a test is a leak users would have.
    """
    root = Path(tempfile.mkdtemp(prefix="vmlease-test-"))
    old = os.environ.get("VMLEASE_STATE_DIR")
    os.environ["VMLEASE_STATE_DIR"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            del os.environ["VMLEASE_STATE_DIR"]
        else:
            os.environ["VMLEASE_STATE_DIR"] = old
        pids = _qemu_processes_under(root)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        qemu_dir = root / "qemu"
        vm_dirs = (
            sorted(p.name for p in qemu_dir.iterdir() if p.is_dir()) if qemu_dir.is_dir() else []
        )
        shutil.rmtree(root, ignore_errors=True)
        if pids or vm_dirs:
            pytest.fail(f"tests left behind qemu processes {pids} and VM directories {vm_dirs}")
