"""Where the libvirt backend's VMs are, and finding, reading and destroying their domains.

``<state>/libvirt/NAME`` records the host VM ``NAME`` went to (written before
the domain is made) and, once it has one, its mark. A domain counts as
vmlease's only while it carries a lease (``_lease.py``); one without is
never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError, VMNotFound
from vmlease._paths import ensure_private_dir
from vmlease._procfs import host_tsc_khz
from vmlease.backends._base import BackendVM
from vmlease.backends.libvirt._hosts import Host, Hosts, download, libvirt_module
from vmlease.backends.libvirt._lease import NAMESPACE, Lease, parse_lease

__all__ = [
    "Domains",
    "disk_files",
    "error",
    "lease_of",
    "state_socket",
    "tsc_khz",
    "version",
    "words",
]


class Domains:
    """The VMs of one state directory on libvirt hosts: their records and domains.

    Args:
        hosts: the hosts VMs go to.
        where_dir: the directory of per-VM host records.
    """

    def __init__(self, hosts: Hosts, where_dir: Path) -> None:
        self.hosts = hosts
        self._where_dir = where_dir

    # -- records ---------------------------------------------------------------

    def record_host(self, name: str, host: Host, mark: str = "") -> None:
        """Write which host VM ``name`` is on (and its mark, once it has one)."""
        ensure_private_dir(self._where_dir)
        path = self._where_dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}")
        tmp.write_text(f"{host.uri}\n{mark}\n")
        tmp.replace(path)

    def record(self, name: str) -> tuple[Host, str] | None:
        """The recorded host of VM ``name`` and its mark ("" before it is marked)."""
        try:
            lines = (self._where_dir / name).read_text().splitlines()
        except OSError:
            return None
        if not lines or not lines[0].strip():
            return None
        return self.hosts.by_uri(lines[0].strip()), (lines[1].strip() if len(lines) > 1 else "")

    def recorded_host(self, name: str) -> Host | None:
        record = self.record(name)
        return record[0] if record is not None else None

    def forget(self, name: str) -> None:
        """Remove VM ``name``'s record."""
        (self._where_dir / name).unlink(missing_ok=True)

    # -- domains ---------------------------------------------------------------

    def listing(self) -> list[BackendVM]:
        """Every domain on every answering host, with its lease where it has one."""
        libvirt = libvirt_module()
        found = []
        for host in self.hosts.answering():
            try:
                domains = self.hosts.connect(host).listAllDomains(0)
            except libvirt.libvirtError as exc:
                raise error(exc, f"listing domains on {host.uri}") from exc
            for dom in domains:
                with contextlib.suppress(libvirt.libvirtError):
                    state = dom.state()[0]
                    lease = lease_of(dom)
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

    def lookup(self, host: Host, name: str) -> Any | None:
        """Domain ``name`` on ``host``, or None."""
        libvirt = libvirt_module()
        conn = self.hosts.connect(host)
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise error(exc, f"looking up {name} on {host.uri}") from exc

    def find(self, name: str) -> tuple[Host, Any]:
        """The host VM ``name`` is on and its domain; VMNotFound if none has it."""
        recorded = self.recorded_host(name)
        if recorded is not None:
            dom = self.lookup(recorded, name)
            if dom is not None:
                return recorded, dom
        for host in self.hosts.answering():
            if host is recorded:
                continue
            dom = self.lookup(host, name)
            if dom is not None:
                return host, dom
        raise VMNotFound(f"the libvirt backend has no VM named {name!r}")

    def ours(self, name: str) -> tuple[Host, Any, Lease]:
        """Like find, for a domain that carries vmlease's lease; VMNotFound for another's."""
        host, dom = self.find(name)
        lease = lease_of(dom)
        if lease is None:
            raise VMNotFound(
                f"the domain {name!r} on {host.uri} is not one vmlease made "
                "(it has no vmlease lease in its metadata): left alone"
            )
        return host, dom, lease

    def console_tail(self, name: str, lines: int) -> str:
        """The last ``lines`` of VM ``name``'s console log (its volume's last MiB); ""
        when it cannot be read."""
        try:
            host = self.recorded_host(name) or self.find(name)[0]
            vol = self.hosts.volume(host, f"{name}.console")
            if vol is None:
                return ""
            size = int(vol.info()[2])
            tail = download(self.hosts.connect(host), vol, max(0, size - (1 << 20)))
            text = tail.decode(errors="replace")
        except Exception:  # VMLeaseError or libvirt's: nothing to show
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def destroy(self, host: Host, name: str, dom: Any = None) -> None:
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
                raise error(exc, f"destroying VM {name} on {host.uri}") from exc
            return
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def lease_of(dom: Any) -> Lease | None:
    """The lease domain ``dom`` carries, or None (not vmlease's)."""
    libvirt = libvirt_module()
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    except libvirt.libvirtError:
        return None
    return parse_lease(text)


def disk_files(dom: Any) -> set[str]:
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


def state_socket(pool_dir: str, name: str) -> str:
    """Where VM ``name``'s state channel points: QEMU's migration listener when it
    loads a booted state. A Unix socket path holds at most 107 bytes."""
    path = f"{pool_dir}/{name}.sock"
    if len(path.encode()) > 100:
        path = f"{pool_dir}/{hashlib.sha256(name.encode()).hexdigest()[:16]}.sock"
    return path


def tsc_khz(conn: Any, *, local: bool = False) -> int | None:
    """The host's TSC frequency, for ``tsc_early_khz``: from its capabilities, or,
    for a ``local`` host whose libvirtd does not say (a user's ``qemu:///session``
    without access to ``/dev/kvm``), from this machine's ``/proc/cpuinfo``.
    Without it some microvm boots hang calibrating the TSC against the PIT."""
    fallback = host_tsc_khz() if local else None
    try:
        root = ET.fromstring(conn.getCapabilities())  # noqa: S314 - from the host's libvirtd
    except Exception:
        return fallback
    counter = root.find("host/cpu/counter[@name='tsc']")
    if counter is None:
        return fallback
    try:
        return int(counter.get("frequency", "0")) // 1000 or fallback
    except ValueError:
        return fallback


def version(number: int) -> str:
    """libvirt's version number as text (9000000 -> 9.0.0)."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def words(exc: BaseException) -> str:
    """An error's first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error(exc: Any, doing: str) -> BackendError:
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
    return BackendError(f"{doing}: {words(exc)}", transient=transient)
