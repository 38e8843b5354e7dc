"""Booted states on libvirt hosts: a VM starts from a saved, just-booted guest.

As under the qemu backend (``backends/qemu/_states.py``), but kept on each
host. The first VM of a key on a host boots; once it answers, libvirt takes
an external snapshot of it (no snapshot metadata): its memory goes to a file
in the pool, its disk overlay stays as it was at that instant, and the VM
runs on in a new overlay on top of it. Every later VM of that key on that
host gets a qcow2 overlay on the frozen disk and a QEMU started paused with
``-incoming defer``, whose memory arrives through a libvirt stream, so this
works through remote URIs too. The domain is created like any other, with
autodestroy: ``virDomainRestore`` would start one without it.

The stream reaches QEMU's migration listener by way of the ``unix`` channel
every vmlease domain has, ``org.vmlease.state``: QEMU is told to listen on
that channel's socket path (``migrate-incoming unix:PATH``) and libvirt
connects a channel stream to the path. The channel's own chardev tried that
path once at start, found nothing, and does not try again.

Volumes in vmlease's pool on each host::

    state-<key>.claim         one runner at a time saves a key
    state-<key>-<id>.qcow2    the frozen disk (the saving VM's first overlay)
    state-<key>-<id>.memory   libvirt's save image of the memory
    state-<key>-<id>.ready    made last: the state may be used

Each runner keeps QEMU's part of the memory file in its image cache
(``_libvirt/<key>-<id>.memory``), fetched from the host once, and sends it
from there to every VM it starts from that state.

``<key>`` hashes what the memory depends on: the domain's XML with its
name and paths left out, the image's volumes (named by content), the host's
QEMU and libvirt versions and, under KVM, its CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError, BackendTimeout, VMLeaseError
from vmlease.backends.libvirt._domain import STATE_PORT, volume_xml
from vmlease.backends.libvirt._hosts import (
    UNUSED_S,
    Host,
    Hosts,
    ImageVolumes,
    download,
    libvirt_module,
    volume_mtime,
)

__all__ = ["HostState", "States", "state_key"]

log = logging.getLogger("vmlease.libvirt")

#: Bumped when the way a state is saved or loaded changes.
STATE_FORMAT = "1"
#: libvirt's save-image header (qemu_saveimage.h): magic, version, data_len,
#: was_running, compressed, cookieOffset, then 14 unused words.
_HEADER = struct.Struct("<16s5I56x")
_MAGIC = b"LibvirtQemudSave"
_CHUNK = 1 << 18
_SAVE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class HostState:
    """A ready booted state on one host."""

    key: str
    id: str
    #: The frozen disk's path on the host: the backing file of the VMs' overlays.
    disk: str

    @property
    def base(self) -> str:
        return f"state-{self.key}-{self.id}"


def state_key(xml: str, volumes: ImageVolumes, conn: Any, *, kvm: bool) -> str:
    """The key of a domain's booted state on the host behind ``conn``.

    ``xml`` is the domain's XML as made for a placeholder name and paths.
    """
    xml = re.sub(r"<metadata>.*?</metadata>", "", xml, flags=re.S)
    material = [
        STATE_FORMAT,
        xml,
        volumes.disk,
        volumes.kernel,
        volumes.initrd,
        str(conn.getVersion()),
        str(conn.getLibVersion()),
    ]
    if kvm:
        try:
            root = ET.fromstring(conn.getCapabilities())  # noqa: S314 - from the host's libvirtd
            cpu = root.find("host/cpu")
            material.append(ET.tostring(cpu, encoding="unicode") if cpu is not None else "")
        except Exception:
            material.append("")
    return hashlib.sha256("\0".join(material).encode()).hexdigest()[:24]


class States:
    """Booted states on the hosts of ``hosts``; local copies under ``cache``."""

    def __init__(self, hosts: Hosts, cache: Path) -> None:
        self.hosts = hosts
        self.cache = cache

    # -- finding and claiming ------------------------------------------------------

    def find(self, host: Host, key: str) -> HostState | None:
        """The ready state for ``key`` on ``host``, if there is one."""
        prefix = f"state-{key}-"
        names = self.hosts.pool(host).listVolumes()
        for name in sorted(n for n in names if n.startswith(prefix) and n.endswith(".ready")):
            base = name.removesuffix(".ready")
            disk = self.hosts.volume(host, f"{base}.qcow2")
            if disk is None or self.hosts.volume(host, f"{base}.memory") is None:
                continue
            return HostState(key, base.removeprefix(prefix), disk.path())
        return None

    def pick(
        self, host: Host, key: str, name: str
    ) -> tuple[HostState | None, tuple[str, str] | None]:
        """For VM ``name``: the booted state ``key`` on ``host`` to start from, its
        memory fetched, or else the claim (key, id) to save one, if nobody else
        holds it."""
        state = self.find(host, key)
        if state is None:
            id_ = self.claim(host, key)
            return None, ((key, id_) if id_ is not None else None)
        self.touch(host, state)
        libvirt = libvirt_module()
        try:
            self.local_memory(host, state)  # fetched before QEMU waits
        except (VMLeaseError, OSError, libvirt.libvirtError) as exc:
            log.warning(
                "cannot fetch booted state %s from %s (%s); VM %s boots",
                state.base,
                host.uri,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                name,
            )
            return None, None
        return state, None

    def claim(self, host: Host, key: str) -> str | None:
        """An id to save ``key`` under, or None while another runner saves it."""
        libvirt = libvirt_module()
        try:
            self.hosts.pool(host).createXML(volume_xml(f"state-{key}.claim", 0, "raw"), 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                return None
            raise
        return secrets.token_hex(4)

    def release(self, host: Host, key: str) -> None:
        with contextlib.suppress(Exception):
            self.hosts.delete_volume(host, f"state-{key}.claim")

    def touch(self, host: Host, state: HostState) -> None:
        """Note that a VM just started from ``state``: states unused for UNUSED_S go."""
        ready = self.hosts.volume(host, f"{state.base}.ready")
        if ready is not None:
            self.hosts.touch(host, ready)

    def drop(self, host: Host, state: HostState) -> None:
        """No new VM starts from ``state``; its files go once no VM uses them."""
        with contextlib.suppress(Exception):
            self.hosts.delete_volume(host, f"{state.base}.ready")

    # -- saving ------------------------------------------------------------------------

    def save(self, host: Host, dom: Any, key: str, id_: str, overlay: str) -> None:
        """Save the running domain ``dom`` as the state ``key``/``id_``; it runs on
        in the new overlay ``overlay`` (a path in the pool). The claim on ``key``
        is released either way; BackendError if the state could not be made."""
        libvirt = libvirt_module()
        base = f"state-{key}-{id_}"
        pool_dir = self.hosts.pool_dir(host)
        snapshot = ET.Element("domainsnapshot")
        ET.SubElement(
            snapshot, "memory", {"snapshot": "external", "file": f"{pool_dir}/{base}.memory"}
        )
        disk = ET.SubElement(ET.SubElement(snapshot, "disks"), "disk", {"name": "vda"})
        disk.set("snapshot", "external")
        ET.SubElement(disk, "driver", {"type": "qcow2"})
        ET.SubElement(disk, "source", {"file": overlay})
        try:
            try:
                dom.snapshotCreateXML(
                    ET.tostring(snapshot, encoding="unicode"),
                    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
                )
            except libvirt.libvirtError as exc:
                raise BackendError(f"taking the booted state of {dom.name()}: {exc}") from exc
            with contextlib.suppress(libvirt.libvirtError):
                self.hosts.pool(host).refresh(0)
            memory = self.hosts.volume(host, f"{base}.memory")
            if memory is None:
                raise BackendError(f"the booted state's memory file {base}.memory is missing")
            self._stream_offset(host, memory)  # a compressed or partial file fails here
            self.hosts.pool(host).createXML(volume_xml(f"{base}.ready", 0, "raw"), 0)
        except BaseException:
            with contextlib.suppress(Exception):
                self.hosts.delete_volume(host, f"{base}.memory")
            raise
        finally:
            self.release(host, key)

    def _stream_offset(self, host: Host, memory: Any) -> int:
        """Where QEMU's migration stream starts in libvirt's save image ``memory``."""
        head = download(self.hosts.connect(host), memory, 0, _HEADER.size)
        if len(head) < _HEADER.size:
            raise BackendError(f"{memory.name()} is too short to be a saved state")
        magic, version, data_len, _running, compressed, _cookie = _HEADER.unpack(head)
        if magic != _MAGIC or version != 2:
            raise BackendError(f"{memory.name()} is not a whole libvirt save image ({magic!r})")
        if compressed:
            raise BackendError(
                f"libvirt host {host.uri} compresses saved memory (snapshot_image_format "
                "in qemu.conf): VMs there boot instead of starting from a booted state"
            )
        return _HEADER.size + int(data_len)

    # -- loading -----------------------------------------------------------------------

    def local_memory(self, host: Host, state: HostState) -> Path:
        """This runner's copy of ``state``'s migration stream, fetched once."""
        path = self.cache / f"{state.key}-{state.id}.memory"
        if path.is_file():
            return path
        memory = self.hosts.volume(host, f"{state.base}.memory")
        if memory is None:
            raise BackendError(f"the memory of booted state {state.base} is gone")
        offset = self._stream_offset(host, memory)
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
        try:
            with tmp.open("xb") as out:
                tmp.chmod(0o600)
                download(self.hosts.connect(host), memory, offset, out=out)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        for old in self.cache.glob(f"{state.key}-*.memory"):
            if old != path:
                old.unlink(missing_ok=True)  # an earlier state of the key, dropped there
        return path

    def load(self, host: Host, dom: Any, socket: str, memory: Path, deadline: float) -> None:
        """Feed ``memory`` to ``dom`` (started paused, ``-incoming defer``); return
        once it is loaded, the guest still paused.

        Over a local Unix-socket connection QEMU reads the file itself, from a
        descriptor passed with the command; otherwise the file goes through a
        stream. (Trying to pass a descriptor over any other transport ends the
        connection, and with it the domains it started.)
        """
        if host.passes_files:
            self._load_by_descriptor(dom, memory)
        else:
            self._load_by_stream(host, dom, socket, memory, deadline)
        while True:
            status = _qmp(dom, "query-status").get("status")
            if status == "paused":
                return
            if status != "inmigrate":
                raise BackendError(f"{dom.name()} did not load its booted state: {status}")
            if time.monotonic() > deadline:
                raise BackendTimeout(f"{dom.name()} took too long to load its booted state")
            time.sleep(0.005)

    def _load_by_descriptor(self, dom: Any, memory: Path) -> None:
        """Hand QEMU the open file."""
        libvirt = libvirt_module()
        import libvirt_qemu

        getfd = json.dumps({"execute": "getfd", "arguments": {"fdname": "vmlease-state"}})
        with memory.open("rb") as f:
            try:
                said, _files = libvirt_qemu.qemuMonitorCommandWithFiles(dom, getfd, [f.fileno()], 0)
            except libvirt.libvirtError as exc:
                raise BackendError(f"{dom.name()}: passing the booted state: {exc}") from exc
        reply = json.loads(said)
        if "error" in reply:
            raise BackendError(f"{dom.name()}: getfd: {reply['error'].get('desc', reply)}")
        _qmp(dom, "migrate-incoming", {"uri": "fd:vmlease-state"})

    def _load_by_stream(
        self, host: Host, dom: Any, socket: str, memory: Path, deadline: float
    ) -> None:
        libvirt = libvirt_module()
        _qmp(dom, "migrate-incoming", {"uri": f"unix:{socket}"})
        stream = self.hosts.connect(host).newStream(0)
        try:
            dom.openChannel(STATE_PORT, stream, 0)
            with memory.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        sent = stream.send(view.tobytes())
                        view = view[sent:]
                    if time.monotonic() > deadline:
                        raise BackendTimeout(
                            f"sending the booted state to {dom.name()} took too long"
                        )
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    # -- sweeping ----------------------------------------------------------------------

    def sweep(self, host: Host, in_use: set[str], now: float, older_than_s: float) -> list[str]:
        """Delete claims and unready state parts older than ``older_than_s`` whose
        paths are not ``in_use`` (a domain's disk or its overlay's backing file),
        ``.ready`` markers whose parts are gone, and whole states no VM started
        from for UNUSED_S that nothing uses; the volumes' names."""
        pool = self.hosts.pool(host)
        names = set(pool.listVolumes())
        ready = {n.removesuffix(".ready") for n in names if n.endswith(".ready")}
        gone = []
        for name in sorted(names):
            if not name.startswith("state-"):
                continue
            base, _dot, kind = name.rpartition(".")
            if kind == "ready":
                if f"{base}.qcow2" in names and f"{base}.memory" in names:
                    gone += self._sweep_unused(host, base, in_use, now)
                    continue
            elif kind in ("qcow2", "memory"):
                if base in ready:
                    continue
            elif kind != "claim":
                continue
            vol = self.hosts.volume(host, name)
            if vol is None or vol.path() in in_use:
                continue
            changed = volume_mtime(vol)
            if kind != "ready" and (changed is None or now - changed < older_than_s):
                continue
            with contextlib.suppress(Exception):
                vol.delete(0)
                gone.append(name)
        return gone

    def _sweep_unused(self, host: Host, base: str, in_use: set[str], now: float) -> list[str]:
        """Delete the ready state ``base`` if no VM started from it for UNUSED_S and
        no domain's disk reads it; ``.ready`` first."""
        found = [self.hosts.volume(host, f"{base}.{kind}") for kind in ("ready", "qcow2", "memory")]
        vols = [v for v in found if v is not None]
        if len(vols) < len(found) or any(v.path() in in_use for v in vols):
            return []
        used = volume_mtime(vols[0])
        if used is None or now - used < UNUSED_S:
            return []
        gone = []
        for vol in vols:
            with contextlib.suppress(Exception):
                vol.delete(0)
                gone.append(vol.name())
        return gone


def _qmp(dom: Any, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """A QMP command through libvirt; its ``return``, BackendError for its ``error``."""
    libvirt = libvirt_module()
    import libvirt_qemu

    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(message), 0))
    except libvirt.libvirtError as exc:
        raise BackendError(f"{dom.name()}: {command}: {exc}") from exc
    if "error" in reply:
        raise BackendError(f"{dom.name()}: {command}: {reply['error'].get('desc', reply)}")
    result = reply.get("return")
    return result if isinstance(result, dict) else {}
