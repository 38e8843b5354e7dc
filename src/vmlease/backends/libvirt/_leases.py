"""The leases of the libvirt backend's VMs: written, renewed, kept, and swept when
they run out.

A session VM's lease runs ``SESSION_LEASE_S`` and this process renews it
every ``RENEW_EVERY_S`` (never past the session's own lease), so a VM whose
runner is gone and whose domain outlived its connection (libvirtd was killed
and restarted) expires within minutes. Every vmlease process that connects
to a host deletes the vmlease domains there whose lease ran out, and volumes
left without a domain: two doing so at once is safe.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vmlease._errors import VMNotFound
from vmlease._identity import Owner, current_owner
from vmlease._naming import new_session_id
from vmlease.backends.libvirt._domains import Domains, disk_files, error, lease_of, words
from vmlease.backends.libvirt._hosts import Host, libvirt_module, volume_mtime
from vmlease.backends.libvirt._lease import NAMESPACE, PREFIX, Lease
from vmlease.backends.libvirt._states import States

__all__ = ["ORPHAN_VOLUME_S", "RENEW_EVERY_S", "SESSION_LEASE_S", "Leases"]

log = logging.getLogger("vmlease.libvirt")

#: How long a session VM's lease runs before it must be renewed.
SESSION_LEASE_S = 120.0
#: How often a running session renews its VMs' leases.
RENEW_EVERY_S = 20.0
#: A VM volume older than this, with no domain, is a leftover anyone may delete.
ORPHAN_VOLUME_S = 600.0
_VM_VOLUME = re.compile(r"^(?P<name>.+)\.(?P<kind>disk\.qcow2|console|save)$")


class Leases:
    """The leases of the VMs this process made, and the sweeps of others' that ran out.

    Args:
        domains: where the VMs are.
        states: the hosts' booted states (their unused volumes are swept too), or None.
        delete_volumes: ``delete_volumes(host, name)`` deletes a swept VM's volumes.
    """

    def __init__(
        self,
        domains: Domains,
        states: States | None,
        delete_volumes: Callable[[Host, str], bool],
    ) -> None:
        self._domains = domains
        self._hosts = domains.hosts
        self._states = states
        self._delete_volumes = delete_volumes
        self._owner: Owner | None = None
        self.lease_s = 6 * 3600.0
        self._lock = threading.Lock()
        # VMs this process created and renews: name -> its host.
        self._mine: dict[str, Host] = {}
        self._renewer: threading.Thread | None = None
        # Domains the sweeps run on connecting deleted, for sweep() to report.
        self._swept: builtins.list[str] = []
        self._auto_sweep = True
        self._closed = threading.Event()

    def serve(self, owner: Owner, *, lease_s: float) -> None:
        self._owner = owner
        self.lease_s = lease_s

    def new(self) -> Lease:
        """A new session VM's lease."""
        if self._owner is None:
            self._owner = current_owner(new_session_id())
        return Lease.new(self._owner, lease_s=min(SESSION_LEASE_S, self.lease_s))

    # -- this process's VMs ------------------------------------------------------

    def hold(self, name: str, host: Host) -> None:
        """Renew VM ``name``'s lease from now on."""
        with self._lock:
            self._mine[name] = host
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(
                target=self._renew_loop, name="vmlease-libvirt-leases", daemon=True
            )
            self._renewer.start()

    def release(self, name: str) -> Host | None:
        """Stop renewing VM ``name``'s lease; the host it was on, if it was held."""
        with self._lock:
            return self._mine.pop(name, None)

    def held(self) -> builtins.list[str]:
        """The VMs whose leases this process renews."""
        with self._lock:
            return list(self._mine)

    def write(self, host: Host, dom: Any, lease: Lease) -> None:
        """Write ``lease`` into domain ``dom``'s metadata."""
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
            raise error(exc, f"writing the lease of {dom.name()} on {host.uri}") from exc

    def mark(self, name: str, token: str) -> str:
        host, dom, lease = self._domains.ours(name)
        self.write(host, dom, replace(lease, mark=token))
        self._domains.record_host(name, host, token)
        return token

    def identity(self, name: str) -> str:
        """The mark in the domain's lease. A VM whose domain ended with its runner's
        connection still has volumes on its recorded host: then the recorded mark,
        so that cleanup deletes them."""
        try:
            _host, dom = self._domains.find(name)
        except VMNotFound:
            record = self._domains.record(name)
            if record is None:
                raise
            host, mark = record
            if not any(
                self._hosts.volume(host, vol) is not None
                for vol in (f"{name}.disk.qcow2", f"{name}.console")
            ):
                raise
            return mark
        lease = lease_of(dom)
        return "" if lease is None else lease.mark

    def kept(self, lease: Lease) -> Lease:
        """``lease`` for a kept VM: no renewals, the session's whole lease."""
        return replace(lease, kept=True, expires=lease.created + self.lease_s)

    def _renew_loop(self) -> None:
        while not self._closed.wait(RENEW_EVERY_S):
            self.renew()

    def renew(self) -> None:
        """Push the leases of this process's VMs on by SESSION_LEASE_S (never past the
        session's lease)."""
        with self._lock:
            mine = dict(self._mine)
        for name, host in mine.items():
            try:
                dom = self._domains.lookup(host, name)
                lease = lease_of(dom) if dom is not None else None
                if lease is None or lease.kept:
                    continue
                limit = lease.created + self.lease_s
                self.write(host, dom, lease.renewed(min(time.time() + SESSION_LEASE_S, limit)))
            except Exception as exc:  # the next round tries again; the lease has room
                with self._lock:
                    deleted = name not in self._mine
                with contextlib.suppress(Exception):
                    deleted = deleted or self._domains.lookup(host, name) is None
                if deleted:
                    continue  # deleted meanwhile: nothing to renew
                log.warning(
                    "libvirt host %s: renewing the lease of %s failed: %s", host.uri, name, exc
                )

    # -- sweeps ------------------------------------------------------------------

    def sweep(self, *, dry_run: bool = False) -> builtins.list[str]:
        """Sweep every answering host (see :meth:`sweep_host`). A dry run deletes
        nothing, not even on connecting."""
        if dry_run:
            self._auto_sweep = False
        hosts = self._hosts.answering()
        with self._lock:
            gone, self._swept = self._swept, []  # what connecting swept already
        for host in hosts:
            gone += self.sweep_host(host, dry_run=dry_run)
        return gone

    def on_connect(self, host: Host) -> None:
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
                lease = lease_of(dom)
                if lease is None or not lease.expired(now):
                    in_use |= disk_files(dom)
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
                    log.warning("libvirt host %s: %s", host.uri, words(exc))
        if dry_run:
            return gone
        for name in gone:
            names.discard(name)
            self._delete_volumes(host, name)
        self._sweep_volumes(host, names, in_use, now)
        return gone

    def _sweep_volumes(self, host: Host, names: set[str], in_use: set[str], now: float) -> None:
        """Delete ``host``'s VM volumes whose domain is gone and has been for a while,
        unused booted states, and unused image uploads."""
        libvirt = libvirt_module()
        pool = self._hosts.pool(host)
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
        if self._states is not None:
            for vol in self._states.sweep(host, in_use, now, ORPHAN_VOLUME_S):
                log.info("libvirt host %s: deleted unused booted-state volume %s", host.uri, vol)
        for vol in self._hosts.sweep_images(host, in_use, now):
            log.info("libvirt host %s: deleted unused image volume %s", host.uri, vol)

    def close(self) -> None:
        self._closed.set()
