"""libvirt hosts: connections, the storage pool, images uploaded by content, placement.

One :class:`Host` per URI. Connections are opened on first use, each with
keepalive (so a client that stops answering is dropped by the daemon, and
a daemon that stops answering is dropped here), and reopened when they break.
A host that does not answer is skipped with a warning; :class:`BackendUnavailable`
only when none answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from vmlease._errors import BackendError, BackendUnavailable, ConfigError, DiskFull, ImageError
from vmlease._paths import megabytes
from vmlease.backends.guest.images import Image
from vmlease.backends.libvirt._domain import QBOOT, pool_xml, volume_xml

__all__ = [
    "DEFAULT_URI",
    "Host",
    "Hosts",
    "ImageVolumes",
    "download",
    "libvirt_module",
    "parse_uris",
    "volume_mtime",
]

log = logging.getLogger("vmlease.libvirt")

#: Memory a host keeps free for itself, beyond the VMs placed on it.
RESERVE_BYTES = 256 * 2**20
#: Room a VM's disk overlay needs to grow into, on the host's pool.
DISK_HEADROOM_BYTES = 64 * 2**20
#: How long to wait for another runner's upload of the same image to finish.
UPLOAD_WAIT_S = 600.0
#: An image build (or booted state) no VM has used for this long is deleted by sweeps.
UNUSED_S = 7 * 86400.0
_CHUNK = 1 << 20

_loop_lock = threading.Lock()
_loop_started = False


def libvirt_module() -> Any:
    """The ``libvirt`` Python binding, with its event loop running in a thread
    (keepalive needs one) and its default error printing silenced."""
    global _loop_started
    try:
        import libvirt
    except ImportError as exc:
        raise BackendUnavailable(
            "the libvirt backend needs the libvirt Python binding: "
            "`pip install 'vmlease[libvirt]'` (it builds against libvirt-dev and pkg-config: "
            "`apt-get install libvirt-dev pkg-config`)"
        ) from exc
    with _loop_lock:
        if not _loop_started:
            libvirt.virEventRegisterDefaultImpl()
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

            def run() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()

            threading.Thread(target=run, name="vmlease-libvirt-events", daemon=True).start()
            _loop_started = True
    return libvirt


@dataclass(frozen=True, slots=True)
class ImageVolumes:
    """Where an image's files are on one host."""

    disk: str
    kernel: str = ""
    initrd: str = ""
    disk_bytes: int = 0


@dataclass
class Host:
    """One libvirt host (a URI) and what this process knows of it."""

    uri: str
    conn: Any = None
    error: str = ""
    #: Memory of the VMs this process placed here and still has, in bytes.
    placed: dict[str, int] = field(default_factory=dict)
    pool: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Whether the connection can pass file descriptors: a local Unix socket.
    passes_files: bool = False
    #: qboot's ROM on this host, for built images on microvm; None once the host
    #: has said it has none (its QEMU's default firmware is used then).
    qboot: str | None = QBOOT

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.uri)
        self.passes_files = parts.scheme in ("qemu", "qemu+unix") and not parts.netloc

    def alive(self) -> bool:
        if self.conn is None:
            return False
        try:
            return bool(self.conn.isAlive())
        except Exception:
            return False


def content_id(image: Image) -> str:
    """A hash of the image's files, kept beside them after the first time."""
    cached = image.path / "content.sha256"
    try:
        return cached.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    for path in (image.kernel, image.initrd, image.disk):
        if path is None or not Path(path).is_file():
            continue
        digest.update(Path(path).name.encode() + b"\0")
        with Path(path).open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()[:20]
    tmp = cached.with_name(f".content.sha256.{threading.get_ident()}")
    tmp.write_text(value + "\n")
    tmp.replace(cached)
    return value


class Hosts:
    """The hosts of one backend object.

    Args:
        uris: libvirt URIs, in order of preference for ties.
        pool: the storage pool's name (made when missing, as a directory pool).
        pool_path: the pool's directory on each host.
        keepalive: (interval seconds, unanswered probes) for each connection.
        connect_timeout_s: a host that does not answer within this is skipped.
        on_connect: called with each host when its connection is (re)opened.
    """

    def __init__(
        self,
        uris: Sequence[str],
        *,
        pool: str,
        pool_path: str | None,
        keepalive: tuple[int, int],
        connect_timeout_s: float,
        on_connect: Callable[[Host], None] | None = None,
    ) -> None:
        self.hosts = [Host(uri) for uri in uris]
        self.pool_name = pool
        self.given_pool_path = pool_path
        self.keepalive = keepalive
        self.connect_timeout_s = connect_timeout_s
        self.on_connect = on_connect
        self._warned: set[str] = set()

    def by_uri(self, uri: str) -> Host:
        for host in self.hosts:
            if host.uri == uri:
                return host
        host = Host(uri)  # recorded by another process with other settings
        self.hosts.append(host)
        return host

    def connect(self, host: Host) -> Any:
        """``host``'s open connection; BackendUnavailable if it does not answer."""
        with host.lock:
            if host.alive():
                return host.conn
            if host.conn is not None:
                with contextlib.suppress(Exception):  # it is broken already
                    host.conn.close()
                host.conn = None
                host.pool = None
            libvirt = libvirt_module()
            box: dict[str, Any] = {}

            def open_() -> None:
                try:
                    box["conn"] = libvirt.open(host.uri)
                except Exception as exc:
                    box["error"] = exc

            opener = threading.Thread(target=open_, name="vmlease-libvirt-open", daemon=True)
            opener.start()
            opener.join(self.connect_timeout_s)
            if opener.is_alive():
                host.error = f"no answer within {self.connect_timeout_s:g} s"
                raise BackendUnavailable(f"libvirt host {host.uri}: {host.error}")
            if "error" in box:
                host.error = _words(box["error"])
                raise BackendUnavailable(f"libvirt host {host.uri}: {host.error}")
            conn = box["conn"]
            interval, count = self.keepalive
            try:
                conn.setKeepAlive(interval, count)
            except Exception as exc:
                log.debug("keepalive not set on %s: %s", host.uri, exc)
            host.conn = conn
            host.error = ""
            self._warned.discard(host.uri)
        if self.on_connect is not None:
            self.on_connect(host)
        return conn

    def answering(self) -> list[Host]:
        """The hosts that answer now, each connected; the others are warned about once."""
        found = []
        errors = []
        for host in self.hosts:
            try:
                self.connect(host)
            except BackendUnavailable as exc:
                errors.append(str(exc))
                if host.uri not in self._warned:
                    self._warned.add(host.uri)
                    log.warning("%s; skipping it", exc)
                continue
            found.append(host)
        if not found:
            raise BackendUnavailable(
                "no libvirt host answers: "
                + "; ".join(errors)
                + ". Start libvirtd there, or correct VMLEASE_LIBVIRT_URIS",
            )
        return found

    # -- the pool and images ----------------------------------------------

    def pool_path(self, host: Host) -> str:
        """Where vmlease's pool lives on ``host`` unless told: beside libvirt's own
        files, which for a user's ``qemu:///session`` are in that user's home."""
        if self.given_pool_path:
            return self.given_pool_path
        parts = urllib.parse.urlsplit(host.uri)
        if parts.path.rstrip("/") != "/session":
            return f"/var/lib/libvirt/{self.pool_name}"
        if parts.netloc:
            raise ConfigError(
                f"libvirt host {host.uri}: a remote session's pool directory cannot be told "
                "from here; give one with Session(backend_options={'pool_path': ...})"
            )
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
        return f"{data}/libvirt/{self.pool_name}"

    def qemu_uid(self, host: Host) -> int | None:
        """The user ``host`` runs QEMU as, if its libvirtd says."""
        owner = _qemu_user(self.connect(host))
        return None if owner is None else owner[0]

    def pool(self, host: Host) -> Any:
        """vmlease's storage pool on ``host``, defined, built and started if needed."""
        conn = self.connect(host)
        if host.pool is not None:
            return host.pool
        libvirt = libvirt_module()
        try:
            pool = conn.storagePoolLookupByName(self.pool_name)
        except libvirt.libvirtError:
            try:
                owner = _qemu_user(conn)
                pool = conn.storagePoolDefineXML(
                    pool_xml(self.pool_name, self.pool_path(host), owner=owner), 0
                )
                pool.setAutostart(1)
            except libvirt.libvirtError:  # another runner defined it meanwhile
                pool = conn.storagePoolLookupByName(self.pool_name)
        if not pool.isActive():
            try:
                pool.build(0)  # makes the directory (with its owner and mode) if missing
                pool.create(0)
            except libvirt.libvirtError as exc:
                if not pool.isActive():
                    raise BackendUnavailable(
                        f"libvirt host {host.uri}: storage pool {self.pool_name} cannot start "
                        f"({exc.get_error_message()}); fix its directory, or remove the pool "
                        f"(`virsh -c {host.uri} pool-undefine {self.pool_name}`) and vmlease "
                        "defines it again"
                    ) from exc
        host.pool = pool
        return pool

    def pool_dir(self, host: Host) -> str:
        """The pool's directory on ``host``, as that host names it."""
        root = ET.fromstring(self.pool(host).XMLDesc(0))  # noqa: S314 - from the host's libvirtd
        found = root.find("target/path")
        if found is None or not found.text:
            raise BackendError(f"libvirt host {host.uri}: pool {self.pool_name} has no path")
        return found.text

    def volume(self, host: Host, name: str) -> Any | None:
        libvirt = libvirt_module()
        try:
            return self.pool(host).storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    @contextlib.contextmanager
    def placeholder(self, host: Host, path: str) -> Iterator[None]:
        """An empty file at a VM's state channel socket path while libvirt starts
        QEMU: with ``dynamic_ownership`` (libvirt's default) it labels the path of
        a connect-mode socket then, and fails if there is none. Gone again once
        QEMU runs, so that QEMU may listen there when it loads a booted state."""
        placeholder = path.rsplit("/", 1)[-1]
        self.delete_volume(host, placeholder)  # left by a runner that died here
        self.pool(host).createXML(volume_xml(placeholder, 0, "raw"), 0)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self.delete_volume(host, placeholder)

    def delete_volume(self, host: Host, name: str) -> bool:
        """Delete volume ``name`` if it exists; whether it did."""
        libvirt = libvirt_module()
        vol = self.volume(host, name)
        if vol is None:
            return False
        try:
            vol.delete(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise
        return True

    def upload_image(self, host: Host, image: Image) -> ImageVolumes:
        """``image``'s files on ``host``, uploaded once per host by content.

        Volumes are named by the image's content hash; a small ``.ready``
        volume is made last, so another runner uploading the same image is
        waited for, and an upload that died half-way is made again. Every use
        touches ``.ready``: builds unused for UNUSED_S are swept.
        """
        base = f"{image.name}-{content_id(image)}"
        files = [("qcow2", image.disk, "qcow2")]
        if image.boot != "firmware":
            files += [("vmlinux", image.kernel, "raw"), ("initrd", image.initrd, "raw")]
        ready = self.volume(host, f"{base}.ready")
        if ready is not None:
            self.touch(host, ready)
        else:
            deadline = time.monotonic() + UPLOAD_WAIT_S
            in_progress = self.volume(host, f"{base}.qcow2") is not None
            while not (in_progress and self._wait_for_upload(host, base, deadline)):
                try:
                    self._upload(host, base, files)
                    break
                except _Busy:  # another runner started the same upload
                    in_progress = True
        paths = {}
        for suffix, _local, _fmt in files:
            vol = self.volume(host, f"{base}.{suffix}")
            if vol is None:
                raise ImageError(f"libvirt host {host.uri}: volume {base}.{suffix} vanished")
            paths[suffix] = vol.path()
        return ImageVolumes(
            disk=paths["qcow2"],
            kernel=paths.get("vmlinux", ""),
            initrd=paths.get("initrd", ""),
            disk_bytes=int(disk.info()[1]) if (disk := self.volume(host, f"{base}.qcow2")) else 0,
        )

    def _wait_for_upload(self, host: Host, base: str, deadline: float) -> bool:
        """Wait while another runner uploads ``base``; True when it is ready, False
        (its parts deleted) when that upload stopped growing for 60 s."""
        last: tuple[int, float] = (-1, time.monotonic())
        while time.monotonic() < deadline:
            if self.volume(host, f"{base}.ready") is not None:
                return True
            vol = self.volume(host, f"{base}.qcow2")
            if vol is None:
                return False
            size = int(vol.info()[2])
            if size != last[0]:
                last = (size, time.monotonic())
            elif time.monotonic() - last[1] > 60:
                break
            time.sleep(0.5)
        for suffix in ("qcow2", "vmlinux", "initrd"):
            self.delete_volume(host, f"{base}.{suffix}")
        return False

    def _upload(self, host: Host, base: str, files: Sequence[tuple[str, Path | None, str]]) -> None:
        libvirt = libvirt_module()
        conn = self.connect(host)
        pool = self.pool(host)
        need = sum(Path(local).stat().st_size for _, local, _ in files if local is not None)
        available = int(pool.info()[3])
        if available < need + DISK_HEADROOM_BYTES:
            raise DiskFull(
                f"libvirt host {host.uri}: pool {self.pool_name} has {megabytes(available)} "
                f"free, the image needs {megabytes(need + DISK_HEADROOM_BYTES)}",
                path=f"{host.uri}:{self.pool_name}",
                free_bytes=available,
                needed_bytes=need,
            )
        log.info("uploading image %s to %s", base, host.uri)
        for suffix, local, fmt in files:
            assert local is not None
            size = Path(local).stat().st_size
            name = f"{base}.{suffix}"
            try:
                vol = pool.createXML(volume_xml(name, size, fmt), 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    raise _Busy(name) from exc
                raise
            stream = conn.newStream(0)
            try:
                vol.upload(stream, 0, size, 0)
                with Path(local).open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            sent = stream.send(view.tobytes())
                            view = view[sent:]
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                self.delete_volume(host, name)
                raise
        pool.createXML(volume_xml(f"{base}.ready", 0, "raw"), 0)

    def touch(self, host: Host, vol: Any) -> None:
        """Mark volume ``vol`` (a ``.ready`` marker) as just used: one byte rewritten."""
        libvirt = libvirt_module()
        stream = self.connect(host).newStream(0)
        try:
            vol.upload(stream, 0, 1, 0)
            stream.send(b"1")
            stream.finish()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            log.debug("libvirt host %s: cannot touch %s: %s", host.uri, vol.name(), exc)

    def sweep_images(self, host: Host, in_use: set[str], now: float) -> list[str]:
        """Delete the image builds on ``host`` no VM used for UNUSED_S and no running
        domain reads; their volumes' names. ``.ready`` goes first, so no runner
        starts a VM on a build being deleted."""
        names = set(self.pool(host).listVolumes())
        gone = []
        for ready in sorted(n for n in names if n.endswith(".ready")):
            base = ready.removesuffix(".ready")
            if base.startswith("state-"):
                continue
            parts = [
                f"{base}.{s}" for s in ("qcow2", "vmlinux", "initrd") if f"{base}.{s}" in names
            ]
            vols = [v for v in (self.volume(host, n) for n in [ready, *parts]) if v is not None]
            if any(v.path() in in_use for v in vols):
                continue
            used = volume_mtime(vols[0]) if vols and vols[0].name() == ready else None
            if used is None or now - used < UNUSED_S:
                continue
            for vol in vols:
                with contextlib.suppress(Exception):
                    vol.delete(0)
                    gone.append(vol.name())
        return gone

    # -- placement -----------------------------------------------------------

    def room(self, host: Host) -> tuple[int, int]:
        """(memory bytes free for new VMs, pool bytes free) on ``host``, by the placement rule."""
        conn = self.connect(host)
        free = int(conn.getFreeMemory()) - sum(host.placed.values())
        pool_free = int(self.pool(host).info()[3])
        return free, pool_free

    def choose(self, memory_bytes: int) -> Host:
        """The answering host with the most free memory that fits ``memory_bytes``
        (plus a reserve) and has pool room for a disk; ties go to the first listed."""
        best: tuple[int, Host] | None = None
        full = []
        for host in self.answering():
            try:
                free, pool_free = self.room(host)
            except BackendError as exc:
                log.warning("libvirt host %s: %s; skipping it", host.uri, exc)
                continue
            if free < memory_bytes + RESERVE_BYTES or pool_free < DISK_HEADROOM_BYTES:
                full.append(f"{host.uri} ({megabytes(free)} memory, {megabytes(pool_free)} pool)")
                continue
            if best is None or free > best[0]:
                best = (free, host)
        if best is None:
            raise BackendUnavailable(
                f"no libvirt host has room for a VM of {megabytes(memory_bytes)}: "
                + ", ".join(full)
            )
        return best[1]


def _qemu_user(conn: Any) -> tuple[int, int] | None:
    """The uid and gid the host's QEMU processes run as (its DAC base label)."""
    try:
        root = ET.fromstring(conn.getCapabilities())  # noqa: S314 - from the host's libvirtd
    except Exception:
        return None
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            found = re.fullmatch(r"\+?(\d+):\+?(\d+)", (label.text or "").strip())
            if found and label.get("type") in ("qemu", "kvm"):
                return int(found[1]), int(found[2])
    return None


def download(
    conn: Any, vol: Any, offset: int = 0, length: int = 0, out: BinaryIO | None = None
) -> bytes:
    """Volume ``vol``'s bytes from ``offset`` (``length`` of them; 0: to its end),
    written to ``out`` when given (then b"" is returned)."""
    libvirt = libvirt_module()
    stream = conn.newStream(0)
    chunks = []
    try:
        vol.download(stream, offset, length, 0)
        while True:
            data = stream.recv(_CHUNK)
            if isinstance(data, int) or not data:
                break
            if out is not None:
                out.write(data)
            else:
                chunks.append(data)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return b"".join(chunks)


def volume_mtime(vol: Any) -> float | None:
    """When volume ``vol``'s file last changed (host time), if libvirt says."""
    try:
        root = ET.fromstring(vol.XMLDesc(0))  # noqa: S314 - from the host's libvirtd
    except Exception:
        return None
    found = root.find("target/timestamps/mtime")
    try:
        return float(found.text) if found is not None and found.text else None
    except ValueError:
        return None


class _Busy(Exception):
    """Another runner is uploading this volume."""


def _words(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: The URI used when none is given.
DEFAULT_URI = "qemu:///system"


def parse_uris(text: str) -> list[str]:
    """URIs separated by commas or white space; ConfigError if none."""
    uris = [u for u in re.split(r"[,\s]+", text.strip()) if u]
    if not uris:
        raise ConfigError("VMLEASE_LIBVIRT_URIS names no URI; give one, e.g. qemu:///system")
    for uri in uris:
        if "://" not in uri:
            raise ConfigError(
                f"{uri!r} is not a libvirt URI; write e.g. qemu:///system or "
                "qemu+ssh://user@host/system"
            )
    return uris
