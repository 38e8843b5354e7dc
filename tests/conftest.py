"""Test-wide set-up: an isolated state directory, and a check that nothing is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import processes_under

pytest_plugins = ["pytester", "tests.support.agent_peer"]


def _qemu_processes_under(root: Path) -> list[int]:
    return processes_under(root, b"qemu-system")


def _reapers_under(root: Path) -> list[int]:
    return processes_under(root, b"vmlease._reaper")


@pytest.fixture(scope="session", autouse=True)
def state_root() -> Iterator[Path]:
    """Every test's VMs live under one temporary state directory.

    At the end of the run the directory must hold no VM directory and no
    qemu process may refer to it. Leftovers are killed and removed, and the
    run fails: a leak in a test is a leak users would have.
    """
    root = Path(tempfile.mkdtemp(prefix="vmlease-test-"))
    saved = {k: os.environ.get(k) for k in ("VMLEASE_STATE_DIR", "VMLEASE_REAPER_IDLE_S")}
    os.environ["VMLEASE_STATE_DIR"] = str(root)
    os.environ["VMLEASE_REAPER_IDLE_S"] = "1"  # reapers go soon after their last session
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        deadline = time.monotonic() + 10
        while _reapers_under(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        reapers = _reapers_under(root)
        pids = _qemu_processes_under(root)
        for pid in pids + reapers:
            os.kill(pid, signal.SIGKILL)
        qemu_dir = root / "qemu"
        vm_dirs = (
            sorted(p.name for p in qemu_dir.iterdir() if p.is_dir()) if qemu_dir.is_dir() else []
        )
        shutil.rmtree(root, ignore_errors=True)
        if pids or vm_dirs or reapers:
            pytest.fail(
                f"tests left behind qemu processes {pids}, VM directories {vm_dirs} "
                f"and reapers that did not exit {reapers}"
            )
