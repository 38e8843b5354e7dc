"""Booted states: a VM starts from a saved, just-booted guest instead of booting.

The first VM of an image and shape (cpus, memory, accelerator, QEMU build)
boots normally; once it answers, its state is saved. Every later VM of that
shape starts from the state, in one of two ways (``memory_mode``):

- *mapped* (the default wherever QEMU can): the booting VM holds its memory in
  a file of the state (``ram``, mapped shared); the save writes only the
  devices' state (QEMU's ``x-ignore-shared`` migration, tens of KB), ends that
  QEMU and keeps its disk as the state's. A VM starts from it with a new QEMU
  that maps ``ram`` copy-on-write (``share=off``), loads the devices' state
  and runs: pages come in as the guest touches them, from the page cache
  that every VM of the state shares, and the file never changes. Its disk is
  a new, empty overlay on the state's disk (``overlay.qcow2`` copied). A
  reset is the same start again (``QemuBackend.reset``).
- *stream*: the state is QEMU's whole migration stream (memory and devices)
  and a copy of the disk; a VM copies the disk and loads the stream, which
  reads the guest's whole memory. Used where mapping cannot apply
  (``$VMLEASE_QEMU_MEMORY=stream``, or a QEMU older than 5.0).

Layout under the image directory::

    _warm/<key>/state          the devices' state (mapped) or the whole stream
    _warm/<key>/ram            the guest's memory (mapped only)
    _warm/<key>/disk.qcow2     the disk overlay at the same instant
    _warm/<key>/overlay.qcow2  an empty overlay on that disk, copied for each VM (mapped)
    _warm/<key>/console.log    the guest's console up to then (its boot messages)
    _warm/<key>/meta.json      what the key was made from
    _warm/<key>/.users/        a link per VM whose disk lies on this state's

``<key>`` hashes everything the state depends on: the image build, the
QEMU binary and version, the accelerator, CPU model and TSC frequency, the
VM's shape, the whole command line and the memory mode. A state is written
beside its final place and renamed into it, so readers see a whole state or
none; when two processes save the same key at once, the second rename loses
and its copy is dropped. A state some VM's disk lies on is never removed.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError, BackendTimeout, ConfigError, VMLeaseError
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image, users
from vmlease.backends.qemu._launch import CONSOLE_LOG, QMP_SOCKET, LaunchConfig, qemu_argv
from vmlease.backends.qemu._qmp import QMP

__all__ = [
    "MemoryMode",
    "Pruned",
    "StateInfo",
    "WarmCache",
    "WarmState",
    "load_state",
    "memory_mode",
    "states_per_image_setting",
    "warm_cache",
    "warm_key",
]

log = logging.getLogger("vmlease.qemu")

#: Bumped when the way a state is saved or loaded changes.
WARM_FORMAT = "2"
STATE = "state"
RAM = "ram"
DISK = "disk.qcow2"
OVERLAY = "overlay.qcow2"
CONSOLE = "console.log"
META = "meta.json"
_STALE_TMP_S = 3600.0
#: Saved booted states kept per image unless VMLEASE_QEMU_STATES says otherwise.
DEFAULT_STATES_PER_IMAGE = 6
#: The longest saving a booted state may take before it is given up.
SAVE_TIMEOUT_S = 30.0


def states_per_image_setting(env: Mapping[str, str]) -> int:
    """How many saved states to keep per image: ``$VMLEASE_QEMU_STATES``, or the default."""
    text = env.get("VMLEASE_QEMU_STATES", "").strip() or str(DEFAULT_STATES_PER_IMAGE)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"VMLEASE_QEMU_STATES must be a whole number of at least 1, not {text!r}"
        ) from None


class MemoryMode(enum.StrEnum):
    """How a saved booted state holds the guest's memory (see the module's docstring)."""

    MAPPED = "mapped"
    STREAM = "stream"


#: The first QEMU whose machines take ``memory-backend`` (5.0); ``x-ignore-shared`` is older.
_MAPPED_SINCE = (5, 0)


def memory_mode(env: Mapping[str, str], version: str) -> tuple[MemoryMode, str]:
    """How booted states hold memory, and why: ``$VMLEASE_QEMU_MEMORY`` (``mapped``
    or ``stream``), else mapped when QEMU (its ``--version`` line) can."""
    setting = env.get("VMLEASE_QEMU_MEMORY", "").strip().lower()
    if setting:
        try:
            return MemoryMode(setting), "VMLEASE_QEMU_MEMORY"
        except ValueError:
            raise ConfigError(
                f"VMLEASE_QEMU_MEMORY must be 'mapped' or 'stream', not {setting!r}"
            ) from None
    found = re.search(r"version (\d+)\.(\d+)", version)
    if found is not None and (int(found[1]), int(found[2])) < _MAPPED_SINCE:
        return MemoryMode.STREAM, f"QEMU {found[1]}.{found[2]} cannot map a state's memory"
    return MemoryMode.MAPPED, "the default from QEMU 5.0 on"


def warm_cache(
    image_dir: Path,
    env: Mapping[str, str],
    *,
    warm_start: bool | None,
    states_per_image: int | None,
) -> WarmCache | None:
    """The saved booted states VMs start from, as the settings ask: None when warm
    starts are off (``warm_start`` False, or ``$VMLEASE_QEMU_WARM=off``)."""
    if warm_start is None:
        setting = env.get("VMLEASE_QEMU_WARM", "on").strip().lower()
        if setting not in ("on", "off"):
            raise ConfigError(f"VMLEASE_QEMU_WARM must be 'on' or 'off', not {setting!r}")
        warm_start = setting == "on"
    keep = states_per_image if states_per_image is not None else states_per_image_setting(env)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"states_per_image must be a whole number of at least 1, not {keep!r}")
    return WarmCache(image_dir / "_warm", keep_per_image=keep) if warm_start else None


def warm_key(config: LaunchConfig, spec: VMSpec, image: Image, mode: MemoryMode) -> str:
    """The key of the booted state that VMs of ``spec`` on ``image`` can start from,
    holding memory as ``mode`` says."""
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
        "memory": str(mode),
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
    def ram(self) -> Path:
        return self.path / RAM

    @property
    def overlay(self) -> Path:
        return self.path / OVERLAY

    @property
    def mode(self) -> MemoryMode:
        return MemoryMode.MAPPED if self.ram.is_file() else MemoryMode.STREAM

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` says (empty if it cannot be read)."""
        try:
            meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    @property
    def console(self) -> Path:
        return self.path / CONSOLE


class WarmCache:
    """The booted states under ``root`` (``<image dir>/_warm``)."""

    def __init__(self, root: Path, *, keep_per_image: int | None = None) -> None:
        self.root = root
        #: At most this many states per image are kept (least recently used go first).
        self.keep_per_image = keep_per_image

    def find(self, key: str) -> WarmState | None:
        found = WarmState(key, self.root / key)
        if found.state.is_file() and found.disk.is_file() and (found.path / META).is_file():
            return found
        return None

    def begin(self, key: str) -> Path:
        """A private directory to write a state for ``key`` into, before ``commit``."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)  # a state holds guest memory: its user's alone
        return tmp

    def commit(self, tmp: Path, key: str, meta: dict[str, object]) -> bool:
        """Publish ``tmp`` as the state for ``key``; False (and ``tmp`` removed) if one exists.

        Every file in it is made its user's alone first (a state holds guest memory).
        """
        for part in tmp.iterdir():
            if part.is_file():
                part.chmod(0o600)
        fd = os.open(tmp / META, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"key": key, **meta}, indent=2) + "\n")
        try:
            tmp.rename(self.root / key)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

    def discard(self, key: str) -> None:
        """Remove the state for ``key`` (one that would not load): moved aside, then
        deleted, unless a VM's disk lies on it (a prune removes it once none does)."""
        doomed = self.root / f".{key}.discard.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            (self.root / key).rename(doomed)
        except OSError:
            return
        if not users(doomed):
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
                fd = os.open(tmp / STATE, flags, 0o600)
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
            "image": image.folder,
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
            self.prune(keep_per_image=self.keep_per_image)

    def touch(self, key: str) -> None:
        """Note that a VM just started from the state for ``key`` (for least-recently-used)."""
        with contextlib.suppress(OSError):
            os.utime(self.root / key)

    def states(self) -> list[StateInfo]:
        """Every complete state, most recently used first."""
        found = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            if entry.name.startswith("."):
                continue
            try:
                meta = json.loads((entry / META).read_text())
                size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
                used = entry.stat().st_mtime
            except (OSError, ValueError):
                continue
            found.append(
                StateInfo(
                    key=entry.name,
                    path=entry,
                    image=str(meta.get("image", "?")),
                    image_path=str(meta.get("image_path", "")),
                    size_bytes=size,
                    last_used=used,
                )
            )
        return sorted(found, key=lambda s: s.last_used, reverse=True)

    def prune(
        self,
        now: float | None = None,
        *,
        keep_per_image: int | None = None,
        builds: set[str] | None = None,
        dry_run: bool = False,
    ) -> list[Pruned]:
        """Remove states that will not be used, and half-written leftovers.

        Goes: a state whose image build is gone (or, given ``builds``, is not
        one of those build directories); beyond ``keep_per_image`` states of
        one image, the least recently used; a leftover of a save older than
        an hour. Returns what went (or, with ``dry_run``, would go).
        """
        if not self.root.is_dir():
            return []
        now = time.time() if now is None else now
        removed: list[Pruned] = []
        for entry in self.root.iterdir():
            try:
                if not entry.name.startswith(".") or now - entry.stat().st_mtime <= _STALE_TMP_S:
                    continue
                if users(entry):
                    continue  # a VM still runs on it
                size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
            except OSError:
                continue
            removed.append(Pruned(entry.name, entry, size, "left by a save that did not finish"))
        kept: dict[str, int] = {}
        for state in self.states():
            if users(state.path):
                continue  # VMs' disks lie on it: kept, beside the cap
            if not state.image_path or not Path(state.image_path).is_dir():
                removed.append(state.pruned("its image build is gone"))
            elif builds is not None and state.image_path not in builds:
                removed.append(state.pruned("its image build is not one new VMs use"))
            else:
                kept[state.image] = kept.get(state.image, 0) + 1
                if keep_per_image is not None and kept[state.image] > keep_per_image:
                    removed.append(
                        state.pruned(
                            f"more than {keep_per_image} states of {state.image}: "
                            "the least recently used go"
                        )
                    )
        if not dry_run:
            for gone in removed:
                if gone.name.startswith("."):
                    shutil.rmtree(gone.path, ignore_errors=True)
                else:
                    self.discard(gone.name)
            if removed:
                log.info("removed %d booted state(s) from %s", len(removed), self.root)
        return removed


@dataclass(frozen=True, slots=True)
class StateInfo:
    """A saved booted state in the cache.

    Attributes:
        key: its key.
        path: its directory.
        image: the image it was saved from, by name.
        image_path: that image's build directory.
        size_bytes: what it takes on disk.
        last_used: when a VM last started from it (or it was saved), seconds since the epoch.
    """

    key: str
    path: Path
    image: str
    image_path: str
    size_bytes: int
    last_used: float

    def pruned(self, why: str) -> Pruned:
        return Pruned(self.key, self.path, self.size_bytes, why)


@dataclass(frozen=True, slots=True)
class Pruned:
    """A state (or a leftover of one) that a prune removed, or would."""

    name: str
    path: Path
    size_bytes: int
    why: str


def load_state(vm_dir: Path, name: str, found: WarmState, deadline: float) -> None:
    """Feed the saved state to QEMU (started ``-incoming defer``); wait until it runs.

    A mapped state holds only the devices' state: QEMU must be told to expect
    no memory in it (``x-ignore-shared``), since the memory is in the file it
    mapped. A load that ends paused is continued.
    """
    limit = max(1.0, deadline - time.monotonic())
    with QMP(vm_dir / QMP_SOCKET, timeout_s=limit) as qmp:
        if found.mode is MemoryMode.MAPPED:
            qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
                timeout_s=limit,
            )
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
            if status == "paused":
                done = qmp.execute("query-migrate", timeout_s=limit).get("status")
                if done == "completed":
                    qmp.execute("cont", timeout_s=limit)
                    continue
                if done == "failed":
                    raise BackendError(f"VM {name} did not load its booted state")
            elif status not in ("inmigrate", "prelaunch"):
                raise BackendError(f"VM {name} did not load its booted state: {status}")
            if time.monotonic() > deadline:
                raise BackendTimeout(f"VM {name} took too long to load its booted state")
            time.sleep(0.002)
