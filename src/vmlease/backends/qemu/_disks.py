"""A QEMU VM's disk: room for it (and memory) before anything starts, its overlay, growing it
to the size its spec asks, and what a paused guest's disk error means."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmlease._errors import BackendError, BackendTimeout, DiskFull, VMLeaseError
from vmlease._paths import free_bytes, free_space, megabytes
from vmlease._procfs import mem_available_bytes
from vmlease._runner import Runner
from vmlease._spec import VMSpec
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._machine import TB_CACHE_MIB
from vmlease.backends.guest._wakeup import grow_root
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu._launch import DISK, QMP_SOCKET, LaunchConfig
from vmlease.backends.qemu._qmp import QMP
from vmlease.backends.qemu._reach import read_record, write_record
from vmlease.backends.qemu._states import MemoryMode, WarmCache, WarmState, warm_key

__all__ = [
    "DISK_HEADROOM_BYTES",
    "OWN_BYTES",
    "check_memory",
    "check_room",
    "explain_silence",
    "grow_disk",
    "make_disk",
    "overlay_for",
]

#: Room a new VM's disk overlay must have to grow into, in bytes.
DISK_HEADROOM_BYTES = 32 * 2**20
#: What a QEMU holds of its own besides guest memory: the translation buffer and
#: the process (a Debian VM started from a mapped state: 40 to 55 MB by PSS).
OWN_BYTES = (TB_CACHE_MIB + 32) * 2**20
#: Free room under which a paused guest's disk is taken to have filled its file system.
_LOW_ROOM = 1 << 20


def check_room(
    root: Path,
    warm: WarmCache | None,
    config: LaunchConfig,
    spec: VMSpec,
    image: Image,
    mode: MemoryMode,
) -> None:
    """DiskFull, before anything starts, if the VM cannot have the room it needs:
    headroom for its disk overlay to grow (plus the copy of a booted state's
    disk, for a stream state), and room for the booted state its boot will
    save, if any; BackendError if the host lacks the memory (``check_memory``)."""
    found = None
    needs: list[tuple[Path, int, str]] = []
    if warm is not None:
        found = warm.find(warm_key(config, spec, image, mode))
        if found is None:
            state = spec.memory_mb * 2**20 + DISK_HEADROOM_BYTES
            needs.append((warm.root, state, "for the booted state it saves"))
    mapped = found is not None and found.mode is MemoryMode.MAPPED
    check_memory(spec, mapped, mem_available_bytes())
    copied = found.disk.stat().st_size if found is not None and not mapped else 0
    needs.append((root, DISK_HEADROOM_BYTES + copied, "for its disk"))
    by_fs: dict[int, tuple[Path, int, list[str]]] = {}
    for path, need, why in needs:
        where = path
        while not where.exists() and where != where.parent:
            where = where.parent
        dev = where.stat().st_dev
        _, total, whys = by_fs.get(dev, (path, 0, []))
        by_fs[dev] = (path, total + need, [*whys, f"{megabytes(need)} {why}"])
    for path, need, whys in by_fs.values():
        free = free_bytes(path)
        if free is not None and free < need:
            raise DiskFull(
                f"not enough room for a VM of image {spec.image!r}: {megabytes(free)} free "
                f"at {path}, {megabytes(need)} needed ({', '.join(whys)}). Free space "
                "(`vmlease image prune` removes unused images and saved states), or "
                "point VMLEASE_STATE_DIR (VMs) or VMLEASE_IMAGE_DIR (images) at a "
                "larger disk",
                path=str(path),
                free_bytes=free,
                needed_bytes=need,
            )


def check_memory(spec: VMSpec, mapped: bool, available: int | None) -> None:
    """BackendError, before anything starts, if the host's available memory
    (``available`` bytes, None if unknown) cannot hold the VM. A VM started from
    a mapped state is charged what it holds of its own (its guest's memory is
    the state's file, in the page cache once for all its VMs); any other VM its
    whole memory as well."""
    need = OWN_BYTES + (0 if mapped else spec.memory_mb * 2**20)
    if available is not None and available < need:
        raise BackendError(
            f"not enough memory for a VM of image {spec.image!r} with {spec.memory_mb} MB: "
            f"{megabytes(available)} available, {megabytes(need)} needed"
            + ("" if mapped else " (it boots or loads its whole memory)")
            + ". Delete VMs you no longer need (`vmlease ls`, `vmlease cleanup`), "
            "or limit how many run at once (--vm-max)"
        )


def make_disk(
    run: Runner, qemu_img: str, name: str, vm_dir: Path, image: Image, timeout_s: float
) -> None:
    """VM ``name``'s disk: a qcow2 overlay on its image's base disk."""
    _overlay(run, qemu_img, image.disk, vm_dir / DISK, f"the disk of VM {name}", timeout_s)


def overlay_for(found: WarmState, run: Runner, qemu_img: str, timeout_s: float) -> Path:
    """An empty qcow2 overlay on a mapped state's disk, for VMs to copy as their own
    disk (made once per state: a copy takes microseconds, ``qemu-img create`` tens
    of milliseconds)."""
    if found.overlay.is_file():
        return found.overlay
    tmp = found.path / f".{found.overlay.name}.{os.getpid()}"
    _overlay(run, qemu_img, found.disk, tmp, f"an overlay on {found.disk}", timeout_s)
    tmp.chmod(0o600)
    tmp.replace(found.overlay)
    return found.overlay


def _overlay(
    run: Runner, qemu_img: str, backing: Path, target: Path, what: str, timeout_s: float
) -> None:
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(target)]
    limit = min(timeout_s, 60.0)
    done = run(argv, timeout_s=limit)
    if done.returncode is None:
        raise BackendTimeout(f"creating {what} took longer than {limit:g} s", command=argv)
    if done.returncode != 0:
        raise BackendError(
            f"cannot create {what}: {done.stderr.strip()}",
            command=argv,
            exit_code=done.returncode,
            stderr=done.stderr,
        )


def grow_disk(
    vm_dir: Path, name: str, image: Image | None, channel: AgentChannel, deadline: float
) -> None:
    """Give VM ``name`` (on ``image``) the disk its spec asked for, once: QMP grows
    the disk (the guest sees the new size at once), the image's command grows
    the file system."""
    record = read_record(vm_dir)
    want = (record.get("spec") or {}).get("disk_gb")
    if not want or record.get("grown") == want or image is None or not image.grow_root:
        return
    limit = max(1.0, deadline - time.monotonic())
    with QMP(vm_dir / QMP_SOCKET, timeout_s=limit) as qmp:
        qmp.execute("block_resize", {"device": "disk0", "size": want * 2**30}, timeout_s=limit)
    grow_root(channel, name, image.grow_root, want, deadline)
    record["grown"] = want
    write_record(vm_dir, record)


def explain_silence(vm_dir: Path) -> None:
    """A command in VM ``name`` has said nothing for a while. If QEMU paused the
    guest on a host I/O error (its disk image could not grow), it will never
    answer: raise DiskFull (or BackendError for another I/O error) now."""
    name = vm_dir.name
    try:
        # Briefly: this runs while an operation waits, which has its own deadline.
        with QMP(vm_dir / QMP_SOCKET, timeout_s=0.5) as qmp:
            if qmp.execute("query-status", timeout_s=0.5).get("status") != "io-error":
                return
            devices = qmp.execute("query-block", timeout_s=1.0) or []
    except VMLeaseError:
        return  # cannot tell from here: keep waiting
    errors = {str(d.get("io-status")) for d in devices if d.get("io-status") not in (None, "ok")}
    disk = vm_dir / DISK
    free = free_bytes(vm_dir)
    if "nospace" in errors or (free is not None and free < _LOW_ROOM):
        raise DiskFull(
            f"VM {name} is paused: its disk {disk} could not grow, the file system "
            f"holding it is full ({free_space(vm_dir)} free). Free space there "
            "(`vmlease image prune`, or delete files), or point VMLEASE_STATE_DIR at "
            "a larger disk; this VM cannot go on and is deleted with its session",
            path=str(disk),
            free_bytes=free,
        )
    raise BackendError(
        f"VM {name} is paused: QEMU met a host I/O error on its disk {disk} "
        f"({', '.join(sorted(errors)) or 'io-error'}); check that file system"
    )
