"""Small file systems for tests of a full disk: a tmpfs of a few tens of MB."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.killing import wait_until
from tests.support.procs import processes_under


class CannotMount(RuntimeError):
    """This process may not mount a file system here (it is not root, say)."""


@contextlib.contextmanager
def small_filesystem(size_mb: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mb`` MiB (mode 0700), unmounted and removed afterwards.

    Raises CannotMount, saying why, where this process may not mount one.
    """
    mount = Path(tempfile.mkdtemp(prefix="vmlease-small-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        mount.rmdir()
        raise CannotMount(f"cannot mount a tmpfs here ({done.stderr.strip()}); run as root")
    try:
        yield mount
    finally:
        # A reaper serving a state directory in here leaves once idle (1 s in tests).
        reapers = wait_until(lambda: not processes_under(mount, b"vmlease._reaper"), 10.0)
        subprocess.run(
            ["umount", "--lazy", str(mount)], capture_output=True, timeout=30, check=False
        )
        shutil.rmtree(mount, ignore_errors=True)
    if not reapers:
        raise AssertionError(f"a reaper under {mount} did not exit")


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system has no room left; returns it."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    with contextlib.suppress(OSError):
        os.sync()
    return filler
