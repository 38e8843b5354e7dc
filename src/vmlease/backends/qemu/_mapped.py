"""Mapped booted states (see ``_states.py``): making one from a booting VM.

A VM that boots to save a mapped state holds its memory in the state's
``ram`` file from its first instruction (``share=on``). Once it is up, its
devices' state is written with ``x-ignore-shared`` (the memory is already in
the file), its QEMU ends (it would go on writing into the file), and its disk
becomes the state's. The VM then starts from the state like every later one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from vmlease._errors import VMLeaseError
from vmlease.backends.qemu._launch import CONSOLE_LOG, DISK, QMP_SOCKET, RamFile
from vmlease.backends.qemu._qmp import QMP
from vmlease.backends.qemu._states import CONSOLE, RAM, STATE, WarmCache

__all__ = ["boot_ram", "publish", "save_devices", "state_meta"]

log = logging.getLogger("vmlease.qemu")

#: The longest writing a booted state's devices may take before it is given up.
SAVE_TIMEOUT_S = 30.0


def boot_ram(warm: WarmCache, key: str, memory_mb: int) -> RamFile:
    """The memory file a VM booting to save the state ``key`` runs on: in a
    private directory beside the state's place, the guest's size, its user's alone."""
    tmp = warm.begin(key)
    path = tmp / RAM
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_mb * 2**20)  # sparse: only what the guest touches is stored
    finally:
        os.close(fd)
    return RamFile(path, shared=True)


def save_devices(vm_dir: Path, name: str, ram: RamFile) -> bool:
    """Write VM ``name``'s devices' state beside its memory file; True once written.

    The VM is left paused (its QEMU is to end); if the save fails it runs on.
    """
    target = ram.path.parent / STATE
    try:
        with QMP(vm_dir / QMP_SOCKET, timeout_s=SAVE_TIMEOUT_S) as qmp:
            qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(target, flags, 0o600)
            try:
                qmp.pass_fd("warm", fd)
            finally:
                os.close(fd)
            qmp.execute("migrate", {"uri": "fd:warm"})
            status = ""
            deadline = time.monotonic() + SAVE_TIMEOUT_S
            while status not in ("completed", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    qmp.execute("migrate_cancel")
                    status = "too slow"
                    break
                time.sleep(0.002)
                status = qmp.execute("query-migrate").get("status", "")
            if status == "completed":
                return True
            log.warning("saving the booted state of VM %s ended %s", name, status)
            if not qmp.execute("query-status").get("running"):
                qmp.execute("cont")
    except (VMLeaseError, OSError) as exc:
        log.warning("cannot save the booted state of VM %s: %s", name, exc)
    target.unlink(missing_ok=True)
    return False


def publish(warm: WarmCache, ram: RamFile, key: str, vm_dir: Path, meta: dict[str, object]) -> None:
    """Make the directory of ``ram`` the state for ``key``: the VM's disk (its QEMU
    has ended) and console go in. If another process published the key first,
    this copy is dropped."""
    tmp = ram.path.parent
    try:
        (vm_dir / DISK).rename(tmp / DISK)
    except OSError:  # another file system: copy instead
        shutil.copyfile(vm_dir / DISK, tmp / DISK)
        (vm_dir / DISK).unlink()
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(vm_dir / CONSOLE_LOG, tmp / CONSOLE)
    warm.commit(tmp, key, meta)


def state_meta(
    image_name: str, image_path: Path, saved_from: str, authorized: dict[str, str] | None
) -> dict[str, object]:
    """What a state's ``meta.json`` says besides its key. ``authorized`` is the SSH
    login the saved guest accepts (``user``, public ``key``) and its ``host_keys``:
    a VM started from the state that wants the same login need not set it again."""
    return {
        "image": image_name,
        "image_path": str(image_path),
        "saved_from": saved_from,
        "saved_at": time.time(),
        **({"authorized": authorized} if authorized else {}),
    }
