"""Another Debian release as this machine's root file system, for a test's commands.

``HostRoot`` makes a root file system of a Debian suite with mmdebstrap (the
packages vmlease's scripts install), and runs commands in it as if it were
the host: in a mount namespace of their own, the tree is made a mount point,
given ``/proc``, ``/sys``, ``/dev`` (``/dev/kvm`` included), a fresh ``/tmp``
and ``/run``, and entered with ``pivot_root``. A plain chroot is not enough:
libvirt's own mount namespace refuses a root that is not a mount point.
The network is the host's, so apt and the guests' user-mode networking work.

Leaving kills every process started inside (a QEMU left by a failed
command, say: they carry a mark in their environment) and removes the tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["HostRoot"]

_SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
#: What a host needs to build vmlease's images and run its examples and unit tests.
PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "busybox-static",
    "lz4",
    "zstd",
    "xz-utils",
    "e2fsprogs",
    "gcc",
    "libc6-dev",
    "mmdebstrap",
    "uidmap",
    "openssh-client",
    "genisoimage",
    "ca-certificates",
    "python3",
    "python3-venv",
    "python3-pip",
    "python3-hatchling",
    "python3-tenacity",
    "python3-pytest",
    "python3-pytest-timeout",
    "util-linux",
    "mount",
    "procps",
    "git",
)

_ENTER = r"""
set -e
root=$1; shift
mount --make-rprivate /
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mkdir -m 1777 "$root/run/lock"  # /var/lock, where libvirt locks its channels' devices
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/.host"
cd "$root"
pivot_root . .host
umount -l /.host
exec chroot . /usr/bin/env -i HOME=/root LANG=C.UTF-8 "VMLEASE_TEST_HOST_ROOT=$root" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
"""


class HostRoot:
    """A Debian ``suite`` root file system under a temporary folder."""

    def __init__(self, suite: str, mirror: str, extra: Sequence[str] = ()) -> None:
        self.suite = suite
        self.mirror = mirror
        self.packages = (*PACKAGES, *extra)
        self.top = Path(tempfile.mkdtemp(prefix=f"vmlease-host-{suite}-"))
        self.root = self.top / "root"

    def __enter__(self) -> HostRoot:
        try:
            subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    "--quiet",
                    f"--include={','.join(self.packages)}",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    self.suite,
                    str(self.root),
                    self.mirror,
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "PATH": _SBIN},
                timeout=1800,
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def copy_in(self, files: Sequence[Path], base: Path, dest: str) -> None:
        """Copy ``files`` (relative to ``base``) to ``dest`` inside the root."""
        for rel in files:
            target = self.root / dest.lstrip("/") / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / rel, target)

    def run(self, argv: Sequence[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside, as root of the root, with a clean environment."""
        return subprocess.run(
            ["unshare", "--mount", "--fork", "sh", "-c", _ENTER, "sh", str(self.root), *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PATH": _SBIN},
            check=False,
        )

    def _inside(self) -> list[int]:
        """Processes started inside (they carry the root's path in their environment)."""
        mark = f"VMLEASE_TEST_HOST_ROOT={self.root}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def __exit__(self, *_exc: object) -> None:
        for _ in range(20):
            pids = self._inside()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(self.top, ignore_errors=True)
