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
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from vmlease._checks import Check
from vmlease._errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BootError,
    ConfigError,
    InvalidSpec,
    UnsupportedOperation,
    VMAlreadyExists,
    VMNotFound,
)
from vmlease._identity import Owner
from vmlease._paths import image_dir as default_image_dir
from vmlease._paths import state_dir as default_state_dir
from vmlease._spec import Network, VMSpec
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import Backend, BackendVM, Capabilities
from vmlease.backends.guest._agent import AgentChannel, AgentOperations
from vmlease.backends.guest._machine import Lan
from vmlease.backends.guest._segments import Networks
from vmlease.backends.guest._wakeup import name_guest
from vmlease.backends.guest.images import Image, check_fits, find_image
from vmlease.backends.libvirt._agents import CHANNEL_TIMEOUT_S, Agents
from vmlease.backends.libvirt._bounded import within
from vmlease.backends.libvirt._domain import DomainFiles, domain_xml, volume_xml
from vmlease.backends.libvirt._domains import (
    Domains,
    error,
    lease_of,
    state_socket,
    tsc_khz,
    words,
)
from vmlease.backends.libvirt._hosts import DEFAULT_URI, Host, Hosts, libvirt_module, parse_uris
from vmlease.backends.libvirt._lans import LibvirtLans, placeholders
from vmlease.backends.libvirt._leases import Leases
from vmlease.backends.libvirt._preflight import preflight
from vmlease.backends.libvirt._states import HostState, States, state_key

__all__ = ["LibvirtBackend", "parse_uris"]

log = logging.getLogger("vmlease.libvirt")


class LibvirtBackend(AgentOperations, LibvirtLans, Backend):
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
    capabilities = Capabilities(
        snapshots=True, stop_start=False, shared_namespace=True, networks=True
    )

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
            on_connect=lambda host: self.leases.on_connect(host),
        )
        self.states = States(self.hosts, self._image_dir / "_libvirt") if warm_start else None
        self.domains = Domains(self.hosts, self._state_dir / "libvirt")
        self.leases = Leases(self.domains, self.states, self._delete_volumes)
        self.agents = Agents(self.domains, self.console_tail)
        self.lans = Networks(self._state_dir / "libvirt")
        self._lock = threading.Lock()
        # VMs whose booted state is saved once they are ready: name -> (host, key, id).
        self._saving: dict[str, tuple[Host, str, str]] = {}
        # VMs running on a state's disk volume (not saved yet, or saving failed).
        self._state_disk: dict[str, str] = {}
        self._booting: dict[str, tuple[str, ...]] = {}
        self._firmware: dict[str, bool] = {}

    # -- set-up ------------------------------------------------------------

    def serve(self, owner: Owner, *, lease_s: float) -> None:
        self.leases.serve(owner, lease_s=lease_s)

    def preflight(self, *, cheap: bool = False) -> list[Check]:
        return preflight(self.hosts, kvm=self.kvm, cheap=cheap)

    def imported_by(self) -> tuple[str, dict[str, object]] | None:
        return ("qemu", {"image_dir": self._image_dir})  # its image cache is the qemu backend's

    # -- the Backend primitives ----------------------------------------------

    def check_spec(self, spec: VMSpec) -> None:
        image = find_image(self._image_dir, spec.image, spec.arch)
        if spec.disk_gb is not None:
            raise InvalidSpec("the libvirt backend does not grow disks yet: leave disk_gb out")
        if spec.user is not None:
            raise InvalidSpec("the libvirt backend offers no SSH yet: leave user out")
        check_fits(image, spec)
        if (spec.network or image.network) is Network.RESTRICTED:
            raise InvalidSpec(
                "the libvirt backend offers network='user' and network='none'; "
                "'restricted' (no traffic out) needs the qemu backend"
            )
        if spec.networks and not any(host.passes_files for host in self.hosts.hosts):
            raise InvalidSpec(
                "private networks on the libvirt backend need a host that is this machine "
                f"(a qemu:/// URI); these are not: {', '.join(self.uris)}"
            )

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        # Given up at the deadline, a create may still make its domain: the name is
        # the session's, which adopts or deletes it (as after any hung create).
        within(timeout_s, f"creating VM {name}", lambda: self._create(name, spec, timeout_s))

    def _create(self, name: str, spec: VMSpec, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        image = find_image(self._image_dir, spec.image, spec.arch)
        for host in self.hosts.answering():
            if self.domains.lookup(host, name) is not None:
                raise VMAlreadyExists(
                    f"the libvirt backend already has a VM named {name!r} (on {host.uri})"
                )
        host = self.hosts.choose(spec.memory_mb * 2**20)
        self.domains.record_host(name, host)
        try:
            lans = self._lans_for(name, spec, host)  # their switches hold its ports
        except BaseException:
            self.lans.leave(name)
            raise
        state = self._make(name, spec, image, host, lans, warm=self.states is not None)
        host.placed[name] = spec.memory_mb * 2**20
        with self._lock:
            self._booting[name] = image.ready if state is None else ()
            self._firmware[name] = image.boot == "firmware" and state is None
        self.leases.hold(name, host)
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
                words(exc),
            )
            assert self.states is not None
            self.states.drop(host, state)
            self.domains.destroy(host, name)
            self._delete_volumes(host, name)
            self._make(name, spec, image, host, lans, warm=False)
            with self._lock:
                self._booting[name] = image.ready
                self._firmware[name] = image.boot == "firmware"

    def _make(
        self, name: str, spec: VMSpec, image: Image, host: Host, lans: tuple[Lan, ...], warm: bool
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
            tsc = tsc_khz(conn, local=host.passes_files)
            lease = self.leases.new()
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
                        tsc_khz=tsc,
                        qboot=host.qboot,
                        lans=placeholders(spec),
                    ),
                    volumes,
                    conn,
                    kvm=self.kvm,
                )
                state, claim = self.states.pick(host, key, name)
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
                state=state_socket(pool_dir, name),
            )
            xml = domain_xml(
                name,
                spec,
                image,
                files,
                lease,
                kvm=self.kvm,
                tsc_khz=tsc,
                incoming=state is not None,
                qboot=host.qboot,
                lans=lans,
            )
            flags = libvirt.VIR_DOMAIN_START_AUTODESTROY
            if state is not None:
                flags |= libvirt.VIR_DOMAIN_START_PAUSED
            try:
                with self.hosts.placeholder(host, files.state):
                    conn.createXML(xml, flags)
            except libvirt.libvirtError as exc:
                if (
                    exc.get_error_code()
                    in (
                        libvirt.VIR_ERR_DOM_EXIST,
                        libvirt.VIR_ERR_OPERATION_FAILED,
                    )
                    and self.domains.lookup(host, name) is not None
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
                raise error(exc, f"creating VM {name} on {host.uri}") from exc
        except BaseException:
            for vol in made:
                with contextlib.suppress(Exception):
                    self.hosts.delete_volume(host, vol)
            if claim is not None and self.states is not None:
                self.states.release(host, claim[0])
            self.domains.forget(name)
            self.lans.leave(name)
            raise
        if claim is not None:
            with self._lock:
                self._saving[name] = (host, *claim)
                self._state_disk[name] = disk_name
        return state

    def _start_warm(self, name: str, host: Host, state: HostState, deadline: float) -> None:
        """Load ``state`` into VM ``name`` (created paused, waiting for it), run it,
        and give the guest today's time, fresh randomness and its own name."""
        assert self.states is not None
        dom = self.hosts.connect(host).lookupByName(name)
        pool_dir = self.hosts.pool_dir(host)
        self.states.load(
            host,
            dom,
            state_socket(pool_dir, name),
            self.states.local_memory(host, state),
            deadline,
        )
        dom.resume()
        with self._agent(name, max(1.0, deadline - time.monotonic())) as channel:
            self.lans.wake(name, state.key, channel, CHANNEL_TIMEOUT_S)

    def _save_state(self, name: str, host: Host, key: str, id_: str) -> None:
        """Save VM ``name``, just booted, as the booted state ``key`` on ``host``; it
        runs on in its own overlay. A failure costs later VMs a boot, nothing more."""
        assert self.states is not None
        started = time.monotonic()
        try:
            dom = self.domains.lookup(host, name)
            if dom is None:
                raise VMNotFound(f"VM {name} is gone")
            overlay = f"{self.hosts.pool_dir(host)}/{name}.disk.qcow2"
            self.states.save(host, dom, key, id_, overlay)
        except Exception as exc:
            log.warning(
                "cannot save the booted state of VM %s on %s: %s", name, host.uri, words(exc)
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
                name_guest(channel, name)
            ready = self._booting.pop(name, ())
            if ready:
                try:
                    channel.come_up(ready, deadline)
                except BootError as exc:
                    tail = self.console_tail(name, 20)
                    raise BootError(f"{exc}\n--- console (last lines) ---\n{tail}") from exc
            with self._lock:
                saving = self._saving.pop(name, None)
            tell = self._lans_ready(name, channel, deadline, saving=saving is not None)
        if saving is not None:
            self._save_state(name, *saving)
            with self._agent(name, max(1.0, deadline - time.monotonic())) as channel:
                tell = self._lans_ready(name, channel, deadline, saving=False)
        tell()

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        raise UnsupportedOperation("the libvirt backend's VMs cannot be stopped and started")

    def stop(self, name: str, timeout_s: float) -> None:
        raise UnsupportedOperation("the libvirt backend's VMs cannot be stopped and started")

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        """Destroy VM ``name``'s domain and delete its volumes.

        A domain without vmlease's lease is never touched (VMNotFound). When the
        domain is gone already (its runner's connection ended), its volumes
        on the recorded host are still deleted.
        """
        within(timeout_s, f"deleting VM {name}", lambda: self._delete(name))

    def _delete(self, name: str) -> None:
        self.agents.channels.forget(name)
        if self.domains.recorded_host(name) is None:
            # Every VM made with this state directory was recorded before it was made.
            self._forget(name)
            try:
                host, dom = self.domains.find(name)
            except (VMNotFound, BackendUnavailable):
                raise VMNotFound(f"the libvirt backend has no VM named {name!r}") from None
            if lease_of(dom) is None:
                raise VMNotFound(
                    f"the domain {name!r} on {host.uri} is not one vmlease made "
                    "(it has no vmlease lease in its metadata): left alone"
                )
            raise VMNotFound(
                f"VM {name!r} on {host.uri} was made from another state directory: it is "
                "deleted from there, or by any runner once its lease runs out"
            )
        try:
            host, dom, _lease = self.domains.ours(name)
        except VMNotFound:
            recorded = self.domains.recorded_host(name)
            removed = False
            if recorded is not None:
                with contextlib.suppress(BackendUnavailable):
                    removed = self._delete_volumes(recorded, name)
            self._forget(name)
            if not removed:
                raise
            return
        self.domains.destroy(host, name, dom)
        self._delete_volumes(host, name)
        self._forget(name)

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
        self.lans.leave(name)
        host = self.leases.release(name)
        with self._lock:
            self._booting.pop(name, None)
            self._firmware.pop(name, None)
            self._saving.pop(name, None)
            self._state_disk.pop(name, None)
        if host is not None:
            host.placed.pop(name, None)
        self.domains.forget(name)

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> builtins.list[BackendVM]:
        return within(timeout_s, "listing VMs", self.domains.listing)

    # -- ownership -------------------------------------------------------------

    def mark(self, name: str, token: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        return within(timeout_s, f"marking VM {name}", lambda: self.leases.mark(name, token))

    def identity(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        return within(timeout_s, f"identifying VM {name}", lambda: self.leases.identity(name))

    def renew(self) -> None:
        """Push the leases of this object's VMs on (see ``_leases.py``)."""
        self.leases.renew()

    def sweep(self, *, dry_run: bool = False) -> builtins.list[str]:
        """Delete every answering host's expired vmlease domains and orphaned volumes."""
        return self.leases.sweep(dry_run=dry_run)

    def sweep_host(self, host: Host, *, dry_run: bool = False) -> builtins.list[str]:
        return self.leases.sweep_host(host, dry_run=dry_run)

    def keep(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> None:
        """Detach VM ``name`` from this process: saved to a file in the pool and
        restored at once, it runs on without autodestroy (libvirt cannot drop
        that flag from a running domain), its lease now the session's whole
        lease. A process that dies in between leaves a domain whose short lease
        runs out, or a state file the sweep deletes."""
        within(timeout_s, f"keeping VM {name}", lambda: self._keep(name))

    def _keep(self, name: str) -> None:
        libvirt = libvirt_module()
        host, dom, lease = self.domains.ours(name)
        if lease.kept:
            return
        conn = self.hosts.connect(host)
        saved = f"{name}.save"
        link = self.agents.link(name)
        with link.lock:
            link.drop()
            self.leases.release(name)  # no more renewals
            path = f"{self.hosts.pool_dir(host)}/{saved}"
            try:
                dom.save(path)
                with self.hosts.placeholder(host, state_socket(self.hosts.pool_dir(host), name)):
                    conn.restore(path)
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                raise error(exc, f"keeping VM {name} on {host.uri}") from exc
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    self.hosts.pool(host).refresh(0)
                with contextlib.suppress(libvirt.libvirtError):
                    self.hosts.delete_volume(host, saved)
            self.leases.write(host, dom, self.leases.kept(lease))

    # -- the agent channel and snapshots -----------------------------------------

    def _agent(self, name: str, timeout_s: float) -> AbstractContextManager[AgentChannel]:
        return self.agents.agent(name, timeout_s)

    def snapshot(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Save memory and disk as ``tag`` (``savevm``; see ``_agents.py``)."""
        self.agents.snapshot(name, tag, timeout_s)

    def restore(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Bring memory and disk back to ``tag`` (``loadvm``); then today's time and
        fresh randomness."""
        self.agents.restore(name, tag, timeout_s, self._lans_restored(name))

    # -- diagnosis ---------------------------------------------------------------

    def console_tail(self, name: str, lines: int = 40) -> str:
        return self.domains.console_tail(name, lines)

    def visit(self) -> None:
        self.agents.visit()

    def close(self) -> None:
        self.lans.close()
        self.leases.close()
        self.agents.channels.close()
        for host in self.hosts.hosts:
            if host.conn is not None:
                with contextlib.suppress(Exception):
                    host.conn.close()
                host.conn = None
                host.pool = None
