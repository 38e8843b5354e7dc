"""The libvirt backend's side of private networks (``guest/_segments.py``).

A VM's interface on a network is a ``client`` interface (QEMU's ``-netdev
socket``) connected to its port on the network's switch, a TCP port on
127.0.0.1 that only this user, root and the user the host runs QEMU as may
connect to. The switch is this process's, as on the qemu backend, so a
network is the session's, partitions and impairments work the same, and
nothing of it is left on the host: the interfaces end with their domains.
The host must therefore be this machine (a ``qemu:///`` URI); VMs on a remote
host are refused a network before anything is made.

A link is cut with the human monitor's ``set_link`` on the interface's alias.
"""

from __future__ import annotations

from collections.abc import Callable

from vmlease._errors import BackendError, InvalidSpec
from vmlease._spec import VMSpec
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._machine import Lan, placeholder_mac
from vmlease.backends.guest._segments import LanOperations, qemu_uids
from vmlease.backends.libvirt._agents import Agents
from vmlease.backends.libvirt._domain import lan_alias
from vmlease.backends.libvirt._hosts import Host, Hosts

__all__ = ["LibvirtLans", "placeholders"]


def placeholders(spec: VMSpec) -> tuple[Lan, ...]:
    """The interfaces a booted state's key is made with: every VM's differ."""
    return tuple(Lan("", placeholder_mac(index)) for index in range(len(spec.networks)))


class LibvirtLans(LanOperations):
    """The libvirt backend's private-network operations (mixed into it)."""

    agents: Agents
    hosts: Hosts

    def _lans_for(self, name: str, spec: VMSpec, host: Host) -> tuple[Lan, ...]:
        """VM ``name`` (to be made on ``host``) joins its spec's networks; its interfaces."""
        if not spec.networks:
            return ()
        if not host.passes_files:
            raise InvalidSpec(
                f"VM {name}: private networks on the libvirt backend need the host to be "
                f"this machine (a qemu:/// URI), not {host.uri}; leave networks out, or "
                "list a local URI in VMLEASE_LIBVIRT_URIS"
            )
        uids = qemu_uids()
        found = self.hosts.qemu_uid(host)
        if found is not None:
            uids.add(found)
        ports = self.lans.join(name, spec.networks, alias=spec.alias, uids=uids)
        return tuple(Lan("", port.mac, port.tcp or 0) for port in ports)

    def _lans_ready(
        self, name: str, channel: AgentChannel, deadline: float, *, saving: bool
    ) -> Callable[[], None]:
        """Before a save (``saving``): VM ``name``'s interfaces up with no address.
        Otherwise: its interfaces and names set; returns what tells the other VMs,
        to call without holding ``name``'s channel."""
        if not self.lans.joined(name):
            return lambda: None
        if saving:
            self.lans.prepare(name, channel, deadline)
            return lambda: None
        told = self._lans_up(name, channel, deadline)
        return lambda: self._tell(told, deadline)

    def _set_link(self, name: str, index: int, up: bool, timeout_s: float) -> None:
        state = "on" if up else "off"
        said = self.agents.monitor(name, f"set_link {lan_alias(index)} {state}", timeout_s)
        if said.strip():
            raise BackendError(f"VM {name}: set_link: {said.strip()}")

    def _lans_restored(self, name: str) -> Callable[[AgentChannel, float], None] | None:
        """What sets VM ``name``'s names again after a snapshot's restore (VMs may have
        joined its networks since), if it is on any."""
        if not self.lans.joined(name):
            return None

        def names(channel: AgentChannel, deadline: float) -> None:
            self.lans.configure(name, channel, deadline)  # the others know this VM already

        return names
