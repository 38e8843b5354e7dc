"""The libvirt backend's primitives: VMs as libvirt domains on one or more hosts.

Each VM is a transient domain on the host with the most room, with a qcow2
overlay on its image's disk (uploaded once per host, by content) and a
console log, both volumes in vmlease's storage pool there. Its ownership is
in the domain itself (``_lease.py``); the local ledger records it first, as
for every backend, and ``<state>/libvirt/NAME`` says which host it is on.

The first VM of an image and shape on a host boots and is saved there as a
booted state; later ones start from it (``_states.py``).

Session VMs start with ``VIR_DOMAIN_START_AUTODESTROY``: libvirt destroys them
when this process's connection ends (a SIGKILL, a frozen process its
keepalive gives up on). Their lease is renewed while the process runs; a
VM that outlives its connection anyway (libvirtd was killed and restarted)
is deleted by whichever vmlease process connects after its lease runs out.

Primitives only: no retries, no ledger, no timing. See backends/_base.py.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmlease._checks import Check, Severity
from vmlease._errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BootError,
    ChannelError,
    ConfigError,
    InvalidSpec,
    SnapshotNotFound,
    UnsupportedOperation,
    VMAlreadyExists,
    VMLeaseError,
    VMNotFound,
)
from vmlease._identity import Owner, current_owner
from vmlease._naming import new_session_id
from vmlease._paths import ensure_private_dir, megabytes
from vmlease._paths import image_dir as default_image_dir
from vmlease._paths import state_dir as default_state_dir
from vmlease._spec import Network, VMSpec
from vmlease.backends._base import Backend, BackendVM, Capabilities
from vmlease.backends.libvirt._domain import DomainFiles, domain_xml, volume_xml
from vmlease.backends.libvirt._hosts import Host, Hosts, download, libvirt_module, volume_mtime
from vmlease.backends.libvirt._lease import NAMESPACE, PREFIX, Lease, parse_lease
from vmlease.backends.libvirt._states import HostState, States, state_key
from vmlease.backends.libvirt._stream import StreamSocket
from vmlease.backends.qemu._agent import AgentChannel, AgentOperations
from vmlease.backends.qemu._launch import AGENT_PORT
from vmlease.backends.qemu.images import Image, find_image

__all__ = ["LibvirtBackend", "parse_uris"]

log = logging.getLogger("vmlease.libvirt")

#: The URI used when none is given.
DEFAULT_URI = "qemu:///system"
#: How long a session VM's lease runs before it must be renewed.
SESSION_LEASE_S = 120.0
#: How often a running session renews its VMs' leases.
RENEW_EVERY_S = 20.0
#: A VM volume older than this, with no domain, is a leftover anyone may delete.
ORPHAN_VOLUME_S = 600.0
#: An idle agent channel is closed after this, so other processes can use it.
IDLE_RELEASE_S = 0.25
_SEED_BYTES = 64
_CHANNEL_TIMEOUT_S = 10.0
_VM_VOLUME = re.compile(r"^(?P<name>.+)\.(?P<kind>disk\.qcow2|console|save)$")


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


@dataclass
class _Link:
    """This process's agent channel to one VM: one user at a time (``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    bridge: StreamSocket | None = None
    channel: AgentChannel | None = None
    used: float = 0.0
    timer: threading.Timer | None = None

    def drop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None


class LibvirtBackend(AgentOperations, Backend):
    """VMs as libvirt domains, on one host or several.

    Args:
        uris: libvirt URIs (default ``$VMLEASE_LIBVIRT_URIS``, else ``qemu:///system``).
        state_dir: vmlease's state directory (which host each VM is on).
        image_dir: the image cache (the same images as the qemu backend).
        pool: the storage pool vmlease keeps its volumes in on each host
            (``$VMLEASE_LIBVIRT_POOL``, default ``vmlease``; made when missing).
        pool_path: that pool's directory, on a host where vmlease makes it.
        accel: ``tcg`` (default) or ``kvm`` (``$VMLEASE_LIBVIRT_ACCEL``).
        keepalive: seconds between keepalive probes and how many may go unanswered.
        connect_timeout_s: a host that does not answer within this is skipped.
        warm_start: start VMs from booted states saved on each host (default on;
            ``VMLEASE_LIBVIRT_WARM=off`` turns it off). Off, every VM boots.
        env: environment to read settings from (default ``os.environ``).
    """

    name = "libvirt"
    capabilities = Capabilities(snapshots=True, stop_start=False, shared_namespace=True)

    def __init__(
        self,
        *,
        uris: Sequence[str] | str | None = None,
        state_dir: Path | None = None,
        image_dir: Path | None = None,
        pool: str | None = None,
        pool_path: str | None = None,
        accel: str | None = None,
        keepalive: tuple[int, int] = (5, 3),
        connect_timeout_s: float = 15.0,
        warm_start: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        if uris is None:
            uris = parse_uris(self._env.get("VMLEASE_LIBVIRT_URIS", DEFAULT_URI))
        elif isinstance(uris, str):
            uris = parse_uris(uris)
        else:
            uris = parse_uris(",".join(uris))
        self.uris = list(uris)
        self._state_dir = state_dir or default_state_dir(self._env)
        self._where_dir = self._state_dir / "libvirt"
        self._image_dir = image_dir or default_image_dir(self._env)
        pool = pool or self._env.get("VMLEASE_LIBVIRT_POOL", "vmlease")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", pool):
            raise ConfigError(f"the libvirt pool name {pool!r} may hold letters, digits, _ . -")
        accel = (accel or self._env.get("VMLEASE_LIBVIRT_ACCEL", "tcg")).strip().lower()
        if accel not in ("tcg", "kvm"):
            raise ConfigError(f"VMLEASE_LIBVIRT_ACCEL must be 'tcg' or 'kvm', not {accel!r}")
        self.kvm = accel == "kvm"
        if warm_start is None:
            setting = self._env.get("VMLEASE_LIBVIRT_WARM", "on").strip().lower()
            if setting not in ("on", "off"):
                raise ConfigError(f"VMLEASE_LIBVIRT_WARM must be 'on' or 'off', not {setting!r}")
            warm_start = setting == "on"
        self.hosts = Hosts(
            self.uris,
            pool=pool,
            pool_path=pool_path,
            keepalive=keepalive,
            connect_timeout_s=connect_timeout_s,
            on_connect=self._on_connect,
        )
        self.states = States(self.hosts, self._image_dir / "_libvirt") if warm_start else None
        # VMs whose booted state is saved once they are ready: name -> (host, key, id).
        self._saving: dict[str, tuple[Host, str, str]] = {}
        # VMs running on a state's disk volume (not saved yet, or saving failed).
        self._state_disk: dict[str, str] = {}
        self._owner: Owner | None = None
        self._lease_s = 6 * 3600.0
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}
        # VMs this object created and renews: name -> its host.
        self._mine: dict[str, Host] = {}
        self._booting: dict[str, tuple[str, ...]] = {}
        self._firmware: dict[str, bool] = {}
        self._renewer: threading.Thread | None = None
        # Domains the sweeps run on connecting deleted, for sweep() to report.
        self._swept: builtins.list[str] = []
        self._auto_sweep = True
        self._closed = threading.Event()

    # -- set-up ------------------------------------------------------------

    def serve(self, owner: Owner, *, lease_s: float) -> None:
        self._owner = owner
        self._lease_s = lease_s

    def _owner_now(self) -> Owner:
        if self._owner is None:
            self._owner = current_owner(new_session_id())
        return self._owner

    def preflight(self, *, cheap: bool = False) -> list[Check]:
        try:
            libvirt = libvirt_module()
        except BackendUnavailable as exc:
            return [Check("libvirt: binding", Severity.FAIL, str(exc), BackendUnavailable)]
        checks = [
            Check(
                "libvirt: binding",
                Severity.OK,
                f"libvirt-python for libvirt {_version(libvirt.getVersion())}",
            )
        ]
        if cheap:
            return checks
        answering = 0
        for host in self.hosts.hosts:
            try:
                conn = self.hosts.connect(host)
            except BackendUnavailable as exc:
                checks.append(
                    Check(f"libvirt: {host.uri}", Severity.FAIL, str(exc), BackendUnavailable)
                )
                continue
            answering += 1
            checks.extend(self._host_checks(host, conn))
        if len(self.hosts.hosts) > 1 and answering:
            checks.append(
                Check(
                    "libvirt: hosts",
                    Severity.OK if answering == len(self.hosts.hosts) else Severity.WARN,
                    f"{answering} of {len(self.hosts.hosts)} hosts answer; VMs go to those",
                )
            )
        return checks

    def _host_checks(self, host: Host, conn: Any) -> list[Check]:
        label = f"libvirt: {host.uri}"
        driver = str(conn.getType())
        checks = [
            Check(
                label,
                Severity.OK if driver == "QEMU" else Severity.FAIL,
                f"reachable; {driver} driver, libvirt {_version(conn.getLibVersion())}, "
                f"hypervisor {_version(conn.getVersion())}"
                + ("" if driver == "QEMU" else ": vmlease needs the QEMU driver"),
                BackendUnavailable,
            )
        ]
        try:
            conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
            kvm = "KVM is offered"
            if not self.kvm:
                kvm += "; set VMLEASE_LIBVIRT_ACCEL=kvm to use it (guests run under TCG now)"
            checks.append(Check(f"{label} kvm", Severity.OK, kvm))
        except Exception:
            checks.append(
                Check(
                    f"{label} kvm",
                    Severity.FAIL if self.kvm else Severity.WARN,
                    "no KVM on this host; guests run under software emulation (TCG)",
                )
            )
        try:
            _free, pool_free = self.hosts.room(host)
            checks.append(
                Check(
                    f"{label} room",
                    Severity.OK if pool_free > 2**30 else Severity.WARN,
                    f"{megabytes(int(conn.getFreeMemory()))} memory free; pool "
                    f"{self.hosts.pool_name} has {megabytes(pool_free)} free",
                )
            )
        except Exception as exc:
            checks.append(
                Check(
                    f"{label} room",
                    Severity.FAIL,
                    f"cannot use storage pool {self.hosts.pool_name}: {_words(exc)}",
                )
            )
        return checks

    # -- where VMs are -----------------------------------------------------

    def _where_file(self, name: str) -> Path:
        return self._where_dir / name

    def _record_host(self, name: str, host: Host, mark: str = "") -> None:
        """Write which host VM ``name`` is on (and its mark, once it has one)."""
        ensure_private_dir(self._where_dir)
        path = self._where_file(name)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        tmp.write_text(f"{host.uri}\n{mark}\n")
        tmp.replace(path)

    def _record(self, name: str) -> tuple[Host, str] | None:
        """The recorded host of VM ``name`` and its mark ("" before it is marked)."""
        try:
            lines = self._where_file(name).read_text().splitlines()
        except OSError:
            return None
        if not lines or not lines[0].strip():
            return None
        return self.hosts.by_uri(lines[0].strip()), (lines[1].strip() if len(lines) > 1 else "")

    def _recorded_host(self, name: str) -> Host | None:
        record = self._record(name)
        return record[0] if record is not None else None

    def _lookup(self, host: Host, name: str) -> Any | None:
        libvirt = libvirt_module()
        conn = self.hosts.connect(host)
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _error(exc, f"looking up {name} on {host.uri}") from exc

    def _find(self, name: str) -> tuple[Host, Any]:
        """The host VM ``name`` is on and its domain; VMNotFound if none has it."""
        recorded = self._recorded_host(name)
        if recorded is not None:
            dom = self._lookup(recorded, name)
            if dom is not None:
                return recorded, dom
        for host in self.hosts.answering():
            if host is recorded:
                continue
            dom = self._lookup(host, name)
            if dom is not None:
                return host, dom
        raise VMNotFound(f"the libvirt backend has no VM named {name!r}")

    def _ours(self, name: str) -> tuple[Host, Any, Lease]:
        """Like _find, for a domain that carries vmlease's lease; VMNotFound for another's."""
        host, dom = self._find(name)
        lease = _lease_of(dom)
        if lease is None:
            raise VMNotFound(
                f"the domain {name!r} on {host.uri} is not one vmlease made "
                "(it has no vmlease lease in its metadata): left alone"
            )
        return host, dom, lease

    # -- the Backend primitives ----------------------------------------------

    def check_spec(self, spec: VMSpec) -> None:
        image = find_image(self._image_dir, spec.image)
        if spec.memory_mb < image.min_memory_mb:
            raise InvalidSpec(
                f"memory_mb={spec.memory_mb} is too little for image {spec.image!r}: "
                f"it needs at least {image.min_memory_mb}"
            )
        if spec.disk_gb is not None:
            raise InvalidSpec("the libvirt backend does not grow disks yet: leave disk_gb out")
        if spec.user is not None:
            raise InvalidSpec("the libvirt backend offers no SSH yet: leave user out")
        if (spec.network or image.network) is Network.RESTRICTED:
            raise InvalidSpec(
                "the libvirt backend offers network='user' and network='none'; "
                "'restricted' (no traffic out) needs the qemu backend"
            )

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        image = find_image(self._image_dir, spec.image)
        for host in self.hosts.answering():
            if self._lookup(host, name) is not None:
                raise VMAlreadyExists(
                    f"the libvirt backend already has a VM named {name!r} (on {host.uri})"
                )
        host = self.hosts.choose(spec.memory_mb * 2**20)
        self._record_host(name, host)
        state = self._make(name, spec, image, host, warm=self.states is not None)
        host.placed[name] = spec.memory_mb * 2**20
        with self._lock:
            self._mine[name] = host
            self._booting[name] = image.ready if state is None else ()
            self._firmware[name] = image.boot == "firmware" and state is None
        self._start_renewer()
        if state is None:
            return
        try:
            self._start_warm(name, host, state, deadline)
        except BackendTimeout:
            raise  # the host's, not the state's: the session deletes the VM and retries
        except Exception as exc:
            log.warning(
                "VM %s could not start from booted state %s on %s (%s); booting it instead",
                name,
                state.base,
                host.uri,
                _words(exc),
            )
            assert self.states is not None
            self.states.drop(host, state)
            self._destroy(host, name)
            self._delete_volumes(host, name)
            self._make(name, spec, image, host, warm=False)
            with self._lock:
                self._booting[name] = image.ready
                self._firmware[name] = image.boot == "firmware"

    def _make(
        self, name: str, spec: VMSpec, image: Image, host: Host, *, warm: bool
    ) -> HostState | None:
        """Make VM ``name``'s volumes and start its domain on ``host``: from a booted
        state when ``warm`` and the host has one (returned, the domain paused), else
        booting (and claiming the state to save, when nobody else does)."""
        libvirt = libvirt_module()
        made: list[str] = []
        claim: tuple[str, str] | None = None
        try:
            volumes = self.hosts.upload_image(host, image)
            conn = self.hosts.connect(host)
            pool = self.hosts.pool(host)
            pool_dir = self.hosts.pool_dir(host)
            tsc_khz = _tsc_khz(conn)
            lease = Lease.new(self._owner_now(), lease_s=min(SESSION_LEASE_S, self._lease_s))
            for vol in (f"{name}.disk.qcow2", f"{name}.console"):
                self.hosts.delete_volume(host, vol)  # a leftover of an earlier attempt of ours
            state: HostState | None = None
            if warm and self.states is not None:
                placeholder = DomainFiles("@", "@", volumes.kernel, volumes.initrd, "@")
                key = state_key(
                    domain_xml(
                        "@",
                        spec,
                        image,
                        placeholder,
                        lease,
                        kvm=self.kvm,
                        tsc_khz=tsc_khz,
                        qboot=host.qboot,
                    ),
                    volumes,
                    conn,
                    kvm=self.kvm,
                )
                state = self.states.find(host, key)
                if state is not None:
                    self.states.touch(host, state)
                    try:
                        self.states.local_memory(host, state)  # fetched before QEMU waits
                    except (VMLeaseError, OSError, libvirt.libvirtError) as exc:
                        log.warning(
                            "cannot fetch booted state %s from %s (%s); VM %s boots",
                            state.base,
                            host.uri,
                            _words(exc),
                            name,
                        )
                        state = None
                else:
                    id_ = self.states.claim(host, key)
                    claim = (key, id_) if id_ is not None else None
            disk_name = f"state-{claim[0]}-{claim[1]}.qcow2" if claim else f"{name}.disk.qcow2"
            disk = pool.createXML(
                volume_xml(
                    disk_name,
                    max(volumes.disk_bytes, 1),
                    "qcow2",
                    state.disk if state is not None else volumes.disk,
                ),
                0,
            )
            made.append(disk_name)
            console = pool.createXML(volume_xml(f"{name}.console", 0, "raw"), 0)
            made.append(f"{name}.console")
            files = DomainFiles(
                disk=disk.path(),
                console=console.path(),
                kernel=volumes.kernel,
                initrd=volumes.initrd,
                state=_state_socket(pool_dir, name),
            )
            xml = domain_xml(
                name,
                spec,
                image,
                files,
                lease,
                kvm=self.kvm,
                tsc_khz=tsc_khz,
                incoming=state is not None,
                qboot=host.qboot,
            )
            flags = libvirt.VIR_DOMAIN_START_AUTODESTROY
            if state is not None:
                flags |= libvirt.VIR_DOMAIN_START_PAUSED
            try:
                with self._socket_placeholder(host, files.state):
                    conn.createXML(xml, flags)
            except libvirt.libvirtError as exc:
                if (
                    exc.get_error_code()
                    in (
                        libvirt.VIR_ERR_DOM_EXIST,
                        libvirt.VIR_ERR_OPERATION_FAILED,
                    )
                    and self._lookup(host, name) is not None
                ):
                    made.clear()  # the volumes are the other domain's now
                    raise VMAlreadyExists(
                        f"the libvirt backend already has a VM named {name!r} (on {host.uri})"
                    ) from exc
                if host.qboot and host.qboot in str(exc):
                    missing, host.qboot = host.qboot, None
                    raise BackendError(
                        f"creating VM {name} on {host.uri}: the host has no {missing}; "
                        "its VMs boot through QEMU's default firmware from now on",
                        transient=True,
                    ) from exc
                raise _error(exc, f"creating VM {name} on {host.uri}") from exc
        except BaseException:
            for vol in made:
                with contextlib.suppress(Exception):
                    self.hosts.delete_volume(host, vol)
            if claim is not None and self.states is not None:
                self.states.release(host, claim[0])
            self._where_file(name).unlink(missing_ok=True)
            raise
        if claim is not None:
            with self._lock:
                self._saving[name] = (host, *claim)
                self._state_disk[name] = disk_name
        return state

    @contextlib.contextmanager
    def _socket_placeholder(self, host: Host, path: str) -> Iterator[None]:
        """An empty file at the state channel's socket path while libvirt starts
        QEMU: with ``dynamic_ownership`` (libvirt's default) it labels the path of
        a connect-mode socket then, and fails if there is none. Gone again once
        QEMU runs, so that QEMU may listen there when it loads a booted state."""
        placeholder = path.rsplit("/", 1)[-1]
        self.hosts.delete_volume(host, placeholder)  # left by a runner that died here
        self.hosts.pool(host).createXML(volume_xml(placeholder, 0, "raw"), 0)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self.hosts.delete_volume(host, placeholder)

    def _start_warm(self, name: str, host: Host, state: HostState, deadline: float) -> None:
        """Load ``state`` into VM ``name`` (created paused, waiting for it), run it,
        and give the guest today's time, fresh randomness and its own name."""
        assert self.states is not None
        dom = self.hosts.connect(host).lookupByName(name)
        pool_dir = self.hosts.pool_dir(host)
        self.states.load(
            host,
            dom,
            _state_socket(pool_dir, name),
            self.states.local_memory(host, state),
            deadline,
        )
        dom.resume()
        with self._agent(name, max(1.0, deadline - time.monotonic())) as channel:
            channel.wake_as(name, state.key, _CHANNEL_TIMEOUT_S)

    def _save_state(self, name: str, host: Host, key: str, id_: str) -> None:
        """Save VM ``name``, just booted, as the booted state ``key`` on ``host``; it
        runs on in its own overlay. A failure costs later VMs a boot, nothing more."""
        assert self.states is not None
        started = time.monotonic()
        try:
            dom = self._lookup(host, name)
            if dom is None:
                raise VMNotFound(f"VM {name} is gone")
            overlay = f"{self.hosts.pool_dir(host)}/{name}.disk.qcow2"
            self.states.save(host, dom, key, id_, overlay)
        except Exception as exc:
            log.warning(
                "cannot save the booted state of VM %s on %s: %s", name, host.uri, _words(exc)
            )
            return
        with self._lock:
            self._state_disk.pop(name, None)  # the state's now, no longer this VM's
        log.info(
            "saved the booted state of VM %s on %s as state-%s-%s in %.2f s",
            name,
            host.uri,
            key,
            id_,
            time.monotonic() - started,
        )

    def wait_ready(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._agent(name, timeout_s) as channel:
            if self._firmware.pop(name, False):
                # A PVH image takes its name from the kernel command line; an
                # imported one boots with the name it was imported as.
                done = channel.exec(
                    ["hostname", name], stdin=None, env=None, cwd=None, timeout_s=10.0
                )
                if done.exit_code != 0:
                    raise BootError(f"VM {name}: naming the guest failed: {done.stderr!r}")
            ready = self._booting.pop(name, ())
            if ready:
                try:
                    channel.come_up(ready, deadline)
                except BootError as exc:
                    tail = self.console_tail(name, 20)
                    raise BootError(f"{exc}\n--- console (last lines) ---\n{tail}") from exc
        with self._lock:
            saving = self._saving.pop(name, None)
        if saving is not None:
            self._save_state(name, *saving)

    def start(self, name: str, *, timeout_s: float = 120.0) -> None:
        raise UnsupportedOperation("the libvirt backend's VMs cannot be stopped and started")

    def stop(self, name: str, timeout_s: float) -> None:
        raise UnsupportedOperation("the libvirt backend's VMs cannot be stopped and started")

    def delete(self, name: str, *, timeout_s: float = 60.0) -> None:
        """Destroy VM ``name``'s domain and delete its volumes.

        A domain without vmlease's lease is never touched (VMNotFound). When the
        domain is gone already (its runner's connection ended), its volumes
        on the recorded host are still deleted.
        """
        self._release(name)
        if self._recorded_host(name) is None:
            # Every VM made with this state directory was recorded before it was made.
            self._forget(name)
            try:
                host, dom = self._find(name)
            except (VMNotFound, BackendUnavailable):
                raise VMNotFound(f"the libvirt backend has no VM named {name!r}") from None
            if _lease_of(dom) is None:
                raise VMNotFound(
                    f"the domain {name!r} on {host.uri} is not one vmlease made "
                    "(it has no vmlease lease in its metadata): left alone"
                )
            raise VMNotFound(
                f"VM {name!r} on {host.uri} was made from another state directory: it is "
                "deleted from there, or by any runner once its lease runs out"
            )
        try:
            host, dom, _lease = self._ours(name)
        except VMNotFound:
            recorded = self._recorded_host(name)
            removed = False
            if recorded is not None:
                with contextlib.suppress(BackendUnavailable):
                    removed = self._delete_volumes(recorded, name)
            self._forget(name)
            if not removed:
                raise
            return
        self._destroy(host, name, dom)
        self._delete_volumes(host, name)
        self._forget(name)

    def _destroy(self, host: Host, name: str, dom: Any = None) -> None:
        """Destroy VM ``name``'s domain (one of ours); gone already is fine."""
        libvirt = libvirt_module()
        try:
            dom = dom if dom is not None else self.hosts.connect(host).lookupByName(name)
            dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (
                libvirt.VIR_ERR_NO_DOMAIN,
                libvirt.VIR_ERR_OPERATION_INVALID,
            ):
                raise _error(exc, f"destroying VM {name} on {host.uri}") from exc
            return
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def _delete_volumes(self, host: Host, name: str) -> bool:
        """Delete VM ``name``'s volumes on ``host`` (its domain is gone); whether any were."""
        with self._lock:
            saving = self._saving.pop(name, None)
            state_disk = self._state_disk.pop(name, None)
        if saving is not None and self.states is not None:
            self.states.release(host, saving[1])  # it never got to save
        removed = False
        for vol in (f"{name}.disk.qcow2", f"{name}.console", state_disk):
            if vol is not None:
                removed = self.hosts.delete_volume(host, vol) or removed
        return removed

    def _forget(self, name: str) -> None:
        with self._lock:
            host = self._mine.pop(name, None)
            self._booting.pop(name, None)
            self._firmware.pop(name, None)
            self._saving.pop(name, None)
            self._state_disk.pop(name, None)
        if host is not None:
            host.placed.pop(name, None)
        self._where_file(name).unlink(missing_ok=True)

    def list(self, *, timeout_s: float = 30.0) -> builtins.list[BackendVM]:
        libvirt = libvirt_module()
        found = []
        for host in self.hosts.answering():
            try:
                domains = self.hosts.connect(host).listAllDomains(0)
            except libvirt.libvirtError as exc:
                raise _error(exc, f"listing domains on {host.uri}") from exc
            for dom in domains:
                with contextlib.suppress(libvirt.libvirtError):
                    state = dom.state()[0]
                    lease = _lease_of(dom)
                    detail = {"host": host.uri, "id": str(dom.ID())}
                    if lease is not None:
                        detail["session"] = lease.session
                        detail["expires"] = f"{lease.expires:.0f}"
                        detail["kept"] = "yes" if lease.kept else "no"
                    found.append(
                        BackendVM(
                            dom.name(),
                            "running" if state == libvirt.VIR_DOMAIN_RUNNING else "stopped",
                            detail,
                        )
                    )
        return found

    # -- ownership -------------------------------------------------------------

    def mark(self, name: str, token: str, *, timeout_s: float = 60.0) -> str | None:
        host, dom, lease = self._ours(name)
        self._set_lease(host, dom, _replace_mark(lease, token))
        self._record_host(name, host, token)
        return token

    def identity(self, name: str, *, timeout_s: float = 30.0) -> str | None:
        """The mark in the domain's lease. A VM whose domain ended with its runner's
        connection still has volumes on its recorded host: then the recorded mark,
        so that cleanup deletes them."""
        try:
            _host, dom = self._find(name)
        except VMNotFound:
            record = self._record(name)
            if record is None:
                raise
            host, mark = record
            if not any(
                self.hosts.volume(host, vol) is not None
                for vol in (f"{name}.disk.qcow2", f"{name}.console")
            ):
                raise
            return mark
        lease = _lease_of(dom)
        return "" if lease is None else lease.mark

    def _set_lease(self, host: Host, dom: Any, lease: Lease) -> None:
        libvirt = libvirt_module()
        try:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                lease.to_xml(),
                PREFIX,
                NAMESPACE,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as exc:
            raise _error(exc, f"writing the lease of {dom.name()} on {host.uri}") from exc

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(
                target=self._renew_loop, name="vmlease-libvirt-leases", daemon=True
            )
            self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._closed.wait(RENEW_EVERY_S):
            self.renew()

    def renew(self) -> None:
        """Push the leases of this object's VMs on by SESSION_LEASE_S (never past the
        session's lease)."""
        with self._lock:
            mine = dict(self._mine)
        for name, host in mine.items():
            try:
                dom = self._lookup(host, name)
                lease = _lease_of(dom) if dom is not None else None
                if lease is None or lease.kept:
                    continue
                limit = lease.created + self._lease_s
                self._set_lease(host, dom, lease.renewed(min(time.time() + SESSION_LEASE_S, limit)))
            except Exception as exc:  # the next round tries again; the lease has room
                with self._lock:
                    deleted = name not in self._mine
                with contextlib.suppress(Exception):
                    deleted = deleted or self._lookup(host, name) is None
                if deleted:
                    continue  # deleted meanwhile: nothing to renew
                log.warning(
                    "libvirt host %s: renewing the lease of %s failed: %s", host.uri, name, exc
                )

    def keep(self, name: str, *, timeout_s: float = 120.0) -> None:
        """Detach VM ``name`` from this process: saved to a file in the pool and
        restored at once, it runs on without autodestroy (libvirt cannot drop
        that flag from a running domain), its lease now the session's whole
        lease. A process that dies in between leaves a domain whose short lease
        runs out, or a state file the sweep deletes."""
        libvirt = libvirt_module()
        host, dom, lease = self._ours(name)
        if lease.kept:
            return
        conn = self.hosts.connect(host)
        saved = f"{name}.save"
        link = self._link(name)
        with link.lock:
            link.drop()
            with self._lock:
                self._mine.pop(name, None)  # no more renewals
            path = f"{self.hosts.pool_dir(host)}/{saved}"
            try:
                dom.save(path)
                with self._socket_placeholder(host, _state_socket(self.hosts.pool_dir(host), name)):
                    conn.restore(path)
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                raise _error(exc, f"keeping VM {name} on {host.uri}") from exc
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    self.hosts.pool(host).refresh(0)
                with contextlib.suppress(libvirt.libvirtError):
                    self.hosts.delete_volume(host, saved)
            kept = replace(lease, kept=True, expires=lease.created + self._lease_s)
            self._set_lease(host, dom, kept)

    def sweep(self, *, dry_run: bool = False) -> builtins.list[str]:
        """Sweep every answering host (see :meth:`sweep_host`). A dry run deletes
        nothing, not even on connecting."""
        if dry_run:
            self._auto_sweep = False
        hosts = self.hosts.answering()
        with self._lock:
            gone, self._swept = self._swept, []  # what connecting swept already
        for host in hosts:
            gone += self.sweep_host(host, dry_run=dry_run)
        return gone

    def _on_connect(self, host: Host) -> None:
        """Every vmlease process that connects to a host deletes the vmlease
        domains there whose lease ran out, and volumes left without a domain."""
        try:
            if not self._auto_sweep:
                return
            swept = self.sweep_host(host)
            with self._lock:
                self._swept += swept
        except Exception as exc:
            log.warning("libvirt host %s: sweeping expired VMs failed: %s", host.uri, exc)

    def sweep_host(self, host: Host, *, dry_run: bool = False) -> builtins.list[str]:
        """Delete ``host``'s expired vmlease domains and orphaned VM volumes; the
        domains' names. Two processes sweeping at once is safe: a domain the
        other destroyed first is skipped."""
        libvirt = libvirt_module()
        conn = host.conn
        now = time.time()
        gone = []
        names = set()
        in_use: set[str] = set()  # files the running domains' disks read
        for dom in conn.listAllDomains(0):
            try:
                names.add(dom.name())
                lease = _lease_of(dom)
                if lease is None or not lease.expired(now):
                    in_use |= _disk_files(dom)
                    continue
                if dry_run:
                    gone.append(dom.name())
                    continue
                log.info(
                    "libvirt host %s: deleting %s, its lease ran out %.0f s ago (session %s)",
                    host.uri,
                    dom.name(),
                    now - lease.expires,
                    lease.session,
                )
                dom.destroy()
                gone.append(dom.name())
            except libvirt.libvirtError as exc:
                # Another runner reaped it first: fine.
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    log.warning("libvirt host %s: %s", host.uri, _words(exc))
        if dry_run:
            return gone
        for name in gone:
            names.discard(name)
            self._delete_volumes(host, name)
        pool = self.hosts.pool(host)
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            try:
                match = _VM_VOLUME.match(vol.name())
                if match is None or match["name"] in names:
                    continue
                changed = volume_mtime(vol)
                if changed is not None and now - changed > ORPHAN_VOLUME_S:
                    log.info("libvirt host %s: deleting orphaned volume %s", host.uri, vol.name())
                    vol.delete(0)
            except libvirt.libvirtError:
                continue
        if self.states is not None:
            for vol in self.states.sweep(host, in_use, now, ORPHAN_VOLUME_S):
                log.info("libvirt host %s: deleted unused booted-state volume %s", host.uri, vol)
        for vol in self.hosts.sweep_images(host, in_use, now):
            log.info("libvirt host %s: deleted unused image volume %s", host.uri, vol)
        return gone

    # -- the agent channel -----------------------------------------------------

    def _link(self, name: str) -> _Link:
        with self._lock:
            return self._links.setdefault(name, _Link())

    def _release(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            with link.lock:
                if link.timer is not None:
                    link.timer.cancel()
                link.drop()

    @contextlib.contextmanager
    def _agent(self, name: str, timeout_s: float = _CHANNEL_TIMEOUT_S) -> Iterator[AgentChannel]:
        link = self._link(name)
        with link.lock:
            try:
                channel = self._channel(name, link, timeout_s)
            except VMNotFound as exc:
                if self._record(name) is None:
                    raise
                raise ChannelError(
                    f"VM {name} is gone: its domain ended (destroyed outside vmlease, or "
                    f"libvirtd stopped and ended its clients' VMs); its console said:\n"
                    f"{self.console_tail(name, 25)}"
                ) from exc
            try:
                yield channel
            except ChannelError as exc:
                link.drop()
                if self._ends_soon(name):
                    raise ChannelError(
                        f"VM {name} is gone: its domain ended ({exc}); its console said:\n"
                        f"{self.console_tail(name, 25)}"
                    ) from exc
                raise
            finally:
                link.used = time.monotonic()
                self._release_when_idle(link)

    def _ends_soon(self, name: str, within_s: float = 3.0) -> bool:
        """Whether VM ``name``'s domain is gone, or goes within ``within_s``.

        A channel closes a moment before libvirt drops the domain it belonged
        to (libvirtd stopping ends its clients' VMs), so a failed channel
        waits that moment before calling the VM alive.
        """
        deadline = time.monotonic() + within_s
        while True:
            try:
                self._find(name)
            except VMNotFound:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _channel(self, name: str, link: _Link, timeout_s: float) -> AgentChannel:
        """The agent channel of VM ``name``, opened and greeted; caller holds ``link.lock``."""
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        if link.channel is not None and not link.channel.broken:
            return link.channel
        link.drop()
        libvirt = libvirt_module()
        deadline = time.monotonic() + timeout_s
        host, dom = self._find(name)
        conn = self.hosts.connect(host)
        while True:
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                dom.openChannel(AGENT_PORT, stream, 0)
                break
            except libvirt.libvirtError as exc:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                if time.monotonic() > deadline:
                    raise ChannelError(
                        f"cannot open the command channel of VM {name}: {_words(exc)}"
                    ) from exc
                if self._lookup(host, name) is None:
                    raise VMNotFound(f"VM {name} is gone from {host.uri}") from exc
                time.sleep(0.1)
        bridge = StreamSocket(stream, libvirt, name)
        channel = AgentChannel(bridge.sock, name=name)
        try:
            channel.handshake(max(1.0, deadline - time.monotonic()))
        except BaseException:
            channel.close()
            bridge.close()
            raise
        link.bridge, link.channel = bridge, channel
        return channel

    def _release_when_idle(self, link: _Link) -> None:
        """Close ``link``'s channel once nobody has used it for IDLE_RELEASE_S, so
        another process (``vmlease exec``) can open it."""

        def release() -> None:
            if not link.lock.acquire(blocking=False):
                return  # in use again: its user arms a new timer when done
            try:
                if time.monotonic() - link.used >= IDLE_RELEASE_S * 0.9:
                    link.drop()
            finally:
                link.lock.release()

        timer = threading.Timer(IDLE_RELEASE_S, release)
        timer.daemon = True
        link.timer = timer
        timer.start()

    # -- snapshots ---------------------------------------------------------------

    def snapshot(self, name: str, tag: str, *, timeout_s: float = 120.0) -> None:
        """Save memory and disk as ``tag`` inside the VM's qcow2 overlay (``savevm``).

        Through the domain's monitor rather than ``virDomainSnapshotCreateXML``:
        libvirt reverts a running domain's internal snapshot by starting a new
        QEMU, which drops the domain's autodestroy, so a restored VM would
        outlive a runner that dies. ``savevm`` and ``loadvm`` keep the process.
        """
        link = self._link(name)
        with link.lock:
            self._monitor(name, f"savevm {tag}")

    def restore(self, name: str, tag: str, *, timeout_s: float = 120.0) -> None:
        """Bring memory and disk back to ``tag`` (``loadvm``); then today's time and
        fresh randomness."""
        link = self._link(name)
        with link.lock:
            link.drop()
            self._monitor(name, f"loadvm {tag}")
            channel = self._channel(name, link, _CHANNEL_TIMEOUT_S)
            channel.set_time(time.time(), _CHANNEL_TIMEOUT_S, seed=os.urandom(_SEED_BYTES))
            link.used = time.monotonic()
            self._release_when_idle(link)

    def _monitor(self, name: str, command: str) -> None:
        """Run a human-monitor command in VM ``name``'s QEMU; its output is empty on
        success. ``loadvm`` leaves the guest stopped when it fails: resume it."""
        libvirt = libvirt_module()
        import libvirt_qemu

        host, dom, _lease = self._ours(name)
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        try:
            said = str(libvirt_qemu.qemuMonitorCommand(dom, command, hmp) or "").strip()
            if said and dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                dom.resume()
        except libvirt.libvirtError as exc:
            raise _error(exc, f"VM {name}: {command} on {host.uri}") from exc
        if said:
            if "does not exist" in said or "not found" in said.lower():
                raise SnapshotNotFound(f"VM {name}: {said}")
            raise BackendError(f"VM {name}: {command} failed: {said}")

    # -- diagnosis ---------------------------------------------------------------

    def console_tail(self, name: str, lines: int = 40) -> str:
        try:
            host = self._recorded_host(name) or self._find(name)[0]
            vol = self.hosts.volume(host, f"{name}.console")
            if vol is None:
                return ""
            size = int(vol.info()[2])
            tail = download(self.hosts.connect(host), vol, max(0, size - (1 << 20)))
            text = tail.decode(errors="replace")
        except (VMLeaseError, Exception):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            names = list(self._links)
        for name in names:
            self._release(name)
        for host in self.hosts.hosts:
            if host.conn is not None:
                with contextlib.suppress(Exception):
                    host.conn.close()
                host.conn = None
                host.pool = None


def _lease_of(dom: Any) -> Lease | None:
    libvirt = libvirt_module()
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    except libvirt.libvirtError:
        return None
    return parse_lease(text)


def _disk_files(dom: Any) -> set[str]:
    """The files domain ``dom`` reads: its disks with their backing files, its kernel
    and initramfs."""
    try:
        root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from the host's libvirtd
    except Exception:
        return set()
    files = {
        str(source.get("file"))
        for source in root.iterfind("devices/disk//source")
        if source.get("file")
    }
    return files | {
        str(e.text)
        for e in (root.find("os/kernel"), root.find("os/initrd"))
        if e is not None and e.text
    }


def _replace_mark(lease: Lease, token: str) -> Lease:
    return replace(lease, mark=token)


def _state_socket(pool_dir: str, name: str) -> str:
    """Where VM ``name``'s state channel points: QEMU's migration listener when it
    loads a booted state. A Unix socket path holds at most 107 bytes."""
    path = f"{pool_dir}/{name}.sock"
    if len(path.encode()) > 100:
        path = f"{pool_dir}/{hashlib.sha256(name.encode()).hexdigest()[:16]}.sock"
    return path


def _tsc_khz(conn: Any) -> int | None:
    """The host's TSC frequency from its capabilities, for ``tsc_early_khz``."""
    try:
        root = ET.fromstring(conn.getCapabilities())  # noqa: S314 - from the host's libvirtd
    except Exception:
        return None
    counter = root.find("host/cpu/counter[@name='tsc']")
    if counter is None:
        return None
    try:
        return int(counter.get("frequency", "0")) // 1000 or None
    except ValueError:
        return None


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _words(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _error(exc: Any, doing: str) -> BackendError:
    """A libvirt error as vmlease's: a broken or refused connection is transient."""
    libvirt = libvirt_module()
    code = exc.get_error_code()
    transient = (
        code
        in (
            libvirt.VIR_ERR_SYSTEM_ERROR,
            libvirt.VIR_ERR_RPC,
            libvirt.VIR_ERR_NO_CONNECT,
            libvirt.VIR_ERR_OPERATION_TIMEOUT,
            libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        )
        or "connection" in str(exc).lower()
    )
    return BackendError(f"{doing}: {_words(exc)}", transient=transient)
