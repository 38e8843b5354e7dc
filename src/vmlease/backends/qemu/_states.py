"""Booted states: a VM starts from a saved, just-booted guest instead of booting.

The first VM of an image and shape (cpus, memory, accelerator, QEMU build)
boots normally. Once it answers, it is paused for about 50 ms while its
memory goes to a file (QEMU's migration stream) and its disk overlay is
copied; then it runs on. Every later VM of that shape gets a copy of the
disk and a QEMU started with ``-incoming``, which loads the memory and
runs: about 0.2 s to the first reply instead of a 1.5 to 2.2 s boot under TCG.

Layout under the image directory::

    _warm/<key>/state        the migration stream (memory and devices)
    _warm/<key>/disk.qcow2   the disk overlay at the same instant
    _warm/<key>/console.log  the guest's console up to then (its boot messages)
    _warm/<key>/meta.json    what the key was made from

``<key>`` hashes everything the stream depends on: the image build, the
QEMU binary and version, the accelerator, CPU model and TSC frequency, the
VM's shape and the whole command line. A state is written beside its final
place and renamed into it, so readers see a whole state or none; when two
processes save the same key at once, the second rename loses and its copy
is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import BackendError, BackendTimeout, VMLeaseError
from vmlease._spec import VMSpec
from vmlease.backends.qemu._launch import CONSOLE_LOG, QMP_SOCKET, LaunchConfig, qemu_argv
from vmlease.backends.qemu._qmp import QMP
from vmlease.backends.qemu.images import Image

__all__ = ["WarmCache", "WarmState", "load_state", "warm_key"]

log = logging.getLogger("vmlease.qemu")

#: Bumped when the way a state is saved or loaded changes.
WARM_FORMAT = "1"
STATE = "state"
DISK = "disk.qcow2"
CONSOLE = "console.log"
META = "meta.json"
_STALE_TMP_S = 3600.0
#: The longest saving a booted state may take before it is given up.
SAVE_TIMEOUT_S = 30.0


def warm_key(config: LaunchConfig, spec: VMSpec, image: Image) -> str:
    """The key of the booted state that VMs of ``spec`` on ``image`` can start from."""
    try:
        st = Path(config.qemu).stat()
        binary = [st.st_size, st.st_mtime_ns]
    except OSError:
        binary = []
    parts = {
        "format": WARM_FORMAT,
        "qemu": [config.qemu, config.version, *binary],
        "accel": config.accel,
        "image": [image.name, image.build_id, str(image.path)],
        "shape": [spec.cpus, spec.memory_mb],
        # Every device, flag and the CPU model, with placeholders for the VM's own name and paths.
        "argv": qemu_argv(config, Path("/vm"), "vm", spec, image),
    }
    raw = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class WarmState:
    """A saved booted state."""

    key: str
    path: Path

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def disk(self) -> Path:
        return self.path / DISK

    @property
    def console(self) -> Path:
        return self.path / CONSOLE


class WarmCache:
    """The booted states under ``root`` (``<image dir>/_warm``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, key: str) -> WarmState | None:
        found = WarmState(key, self.root / key)
        if found.state.is_file() and found.disk.is_file() and (found.path / META).is_file():
            return found
        return None

    def begin(self, key: str) -> Path:
        """A private directory to write a state for ``key`` into, before ``commit``."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        return tmp

    def commit(self, tmp: Path, key: str, meta: dict[str, object]) -> bool:
        """Publish ``tmp`` as the state for ``key``; False (and ``tmp`` removed) if one exists."""
        (tmp / META).write_text(json.dumps({"key": key, **meta}, indent=2) + "\n")
        try:
            tmp.rename(self.root / key)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

    def discard(self, key: str) -> None:
        """Remove the state for ``key`` (one that would not load): moved aside, then deleted."""
        doomed = self.root / f".{key}.discard.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            (self.root / key).rename(doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def save(self, vm_dir: Path, name: str, key: str, image: Image) -> None:
        """Save VM ``name`` in ``vm_dir``, just booted, as the state for ``key``.

        The caller holds the VM's lock.

        The guest pauses while its memory is written and its disk copied,
        then runs on. A failure to save costs the next VM a boot, nothing more.
        """
        if self.find(key) is not None:
            return
        started = time.monotonic()
        try:
            tmp = self.begin(key)
        except OSError as exc:
            log.warning("cannot save a booted state in %s: %s", self.root, exc)
            return
        saved = False
        try:
            with QMP(vm_dir / QMP_SOCKET, timeout_s=SAVE_TIMEOUT_S) as qmp:
                qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                fd = os.open(tmp / STATE, flags, 0o644)
                try:
                    qmp.pass_fd("warm", fd)
                finally:
                    os.close(fd)
                qmp.execute("migrate", {"uri": "fd:warm"})
                try:
                    status = ""
                    deadline = time.monotonic() + SAVE_TIMEOUT_S
                    while status not in ("completed", "failed", "cancelled"):
                        if time.monotonic() > deadline:
                            qmp.execute("migrate_cancel")
                            raise BackendTimeout("saving took too long")
                        time.sleep(0.002)
                        status = qmp.execute("query-migrate").get("status", "")
                    if status == "completed":
                        # Paused, with the disk flushed and released: copy it as it is now.
                        shutil.copyfile(vm_dir / DISK, tmp / DISK)
                        shutil.copyfile(vm_dir / CONSOLE_LOG, tmp / CONSOLE)
                        saved = True
                    else:
                        log.warning("saving the booted state of VM %s ended %s", name, status)
                finally:
                    if not qmp.execute("query-status").get("running"):
                        qmp.execute("cont")
        except (VMLeaseError, OSError) as exc:
            log.warning("cannot save the booted state of VM %s: %s", name, exc)
        if not saved:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        meta = {
            "image": image.name,
            "image_path": str(image.path),
            "saved_from": name,
            "saved_at": time.time(),
        }
        if self.commit(tmp, key, meta):
            log.info(
                "saved the booted state of VM %s as %s in %.2f s",
                name,
                key,
                time.monotonic() - started,
            )
            self.prune()

    def prune(self, now: float | None = None) -> list[str]:
        """Remove states whose image build is gone and half-written leftovers; returns what went."""
        if not self.root.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for entry in self.root.iterdir():
            try:
                if entry.name.startswith("."):
                    if now - entry.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed.append(entry.name)
                    continue
                image_path = json.loads((entry / META).read_text()).get("image_path", "")
            except (OSError, ValueError):
                continue
            if image_path and not Path(image_path).is_dir():
                self.discard(entry.name)
                removed.append(entry.name)
        if removed:
            log.info("removed %d stale booted state(s) from %s", len(removed), self.root)
        return removed


def load_state(vm_dir: Path, name: str, found: WarmState, deadline: float) -> None:
    """Feed the saved memory to QEMU (started ``-incoming defer``); wait until it runs."""
    limit = max(1.0, deadline - time.monotonic())
    with QMP(vm_dir / QMP_SOCKET, timeout_s=limit) as qmp:
        fd = os.open(found.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.pass_fd("warm", fd, timeout_s=limit)
        finally:
            os.close(fd)
        qmp.execute("migrate-incoming", {"uri": "fd:warm"}, timeout_s=limit)
        while True:
            status = qmp.execute("query-status", timeout_s=limit).get("status")
            if status == "running":
                return
            if status not in ("inmigrate", "paused", "prelaunch"):
                raise BackendError(f"VM {name} did not load its booted state: {status}")
            if time.monotonic() > deadline:
                raise BackendTimeout(f"VM {name} took too long to load its booted state")
            time.sleep(0.005)
