"""The libvirt backend's way into its guests: the agent over libvirt streams, and
the snapshots taken and restored through the domain's monitor.

Channels are held and released by the guest layer's pool (``guest._channels``);
here is only how one is opened (a stream on the agent's virtio-serial port,
bridged to a socket pair) and what a failure means (a VM whose domain ended
is reported gone, with its console's last lines).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from vmlease._errors import BackendTimeout, ChannelError, VMNotFound
from vmlease.backends.guest._agent import AGENT_PORT, VISITOR_PORT, AgentChannel
from vmlease.backends.guest._channels import Channels, Link, Opener
from vmlease.backends.guest._monitor import snapshot_outcome
from vmlease.backends.guest._wakeup import refresh
from vmlease.backends.libvirt._bounded import within
from vmlease.backends.libvirt._domains import Domains, error, words
from vmlease.backends.libvirt._hosts import libvirt_module
from vmlease.backends.libvirt._stream import StreamSocket

__all__ = ["CHANNEL_TIMEOUT_S", "Agents"]

#: How long opening and greeting a VM's agent may take.
CHANNEL_TIMEOUT_S = 10.0


class Agents:
    """This process's agent channels to its libvirt VMs.

    Args:
        domains: where the VMs are.
        console_tail: a VM's console's last lines, for the message of a VM
            that is gone.
    """

    def __init__(self, domains: Domains, console_tail: Callable[[str, int], str]) -> None:
        self._domains = domains
        self._console_tail = console_tail
        self.channels = Channels()
        self._port = AGENT_PORT

    def visit(self) -> None:
        """Open channels on the agents' visitors' port from now on, beside the
        VMs' owners (a domain without that port is reached on its owner's)."""
        self._port = VISITOR_PORT

    def link(self, name: str) -> Link:
        return self.channels.link(name)

    @contextlib.contextmanager
    def agent(self, name: str, timeout_s: float = CHANNEL_TIMEOUT_S) -> Iterator[AgentChannel]:
        """VM ``name``'s channel, held for one operation."""
        link = self.channels.link(name)
        with link.lock:
            try:
                channel = self.channels.channel(link, self._opener(name), timeout_s)
            except VMNotFound as exc:
                if self._domains.record(name) is None:
                    raise
                raise ChannelError(
                    f"VM {name} is gone: its domain ended (destroyed outside vmlease, or "
                    f"libvirtd stopped and ended its clients' VMs); its console said:\n"
                    f"{self._console_tail(name, 25)}"
                ) from exc
            try:
                yield channel
            except ChannelError as exc:
                link.drop()
                # A VM that ran out of time is silent, not known to be gone.
                if not channel.late and self._ends_soon(name):
                    raise ChannelError(
                        f"VM {name} is gone: its domain ended ({exc}); its console said:\n"
                        f"{self._console_tail(name, 25)}"
                    ) from exc
                raise
            finally:
                self.channels.done(link)

    def _ends_soon(self, name: str, within_s: float = 3.0) -> bool:
        """Whether VM ``name``'s domain is gone, or goes within ``within_s``.

        A channel closes a moment before libvirt drops the domain it belonged
        to (libvirtd stopping ends its clients' VMs), so a failed channel
        waits that moment before calling the VM alive.
        """
        deadline = time.monotonic() + within_s
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                within(left, f"looking for VM {name}", lambda: self._domains.find(name))
            except VMNotFound:
                return True
            except BackendTimeout:
                return False  # libvirt does not answer: cannot tell
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _opener(self, name: str) -> Opener:
        """How to open VM ``name``'s agent channel: a libvirt stream on its port."""

        def opener(timeout_s: float) -> tuple[AgentChannel, Callable[[], None]]:
            def close(opened: tuple[AgentChannel, Callable[[], None]]) -> None:
                opened[0].close()
                opened[1]()

            what = f"opening the command channel of VM {name}"
            try:
                return within(timeout_s, what, lambda: open_(timeout_s), late=close)
            except BackendTimeout as exc:
                raise ChannelError(str(exc)) from exc

        def open_(timeout_s: float) -> tuple[AgentChannel, Callable[[], None]]:
            libvirt = libvirt_module()
            deadline = time.monotonic() + timeout_s
            host, dom = self._domains.find(name)
            conn = self._domains.hosts.connect(host)
            port = self._port
            if port != AGENT_PORT and port not in dom.XMLDesc(0):
                port = AGENT_PORT  # made by an older vmlease, or its image's agent has one port
            while True:
                stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
                try:
                    dom.openChannel(port, stream, 0)
                    break
                except libvirt.libvirtError as exc:
                    with contextlib.suppress(libvirt.libvirtError):
                        stream.abort()
                    if time.monotonic() > deadline:
                        raise ChannelError(
                            f"cannot open the command channel of VM {name}: {words(exc)}"
                        ) from exc
                    if self._domains.lookup(host, name) is None:
                        raise VMNotFound(f"VM {name} is gone from {host.uri}") from exc
                    time.sleep(0.1)
            bridge = StreamSocket(stream, libvirt, name)

            def close() -> None:
                # Ending a stream waits on libvirtd, which may not answer: not here.
                threading.Thread(
                    target=bridge.close, name="vmlease-stream-close", daemon=True
                ).start()

            return AgentChannel(bridge.sock, name=name), close

        return opener

    # -- snapshots ---------------------------------------------------------------

    def snapshot(self, name: str, tag: str, timeout_s: float) -> None:
        """Save memory and disk as ``tag`` inside the VM's qcow2 overlay (``savevm``).

        Through the domain's monitor rather than ``virDomainSnapshotCreateXML``:
        libvirt reverts a running domain's internal snapshot by starting a new
        QEMU, which drops the domain's autodestroy, so a restored VM would
        outlive a runner that dies. ``savevm`` and ``loadvm`` keep the process.
        """
        with self.channels.link(name).lock:
            self._monitor(name, f"savevm {tag}", timeout_s)

    def restore(
        self,
        name: str,
        tag: str,
        timeout_s: float,
        then: Callable[[AgentChannel, float], None] | None = None,
    ) -> None:
        """Bring memory and disk back to ``tag`` (``loadvm``); then today's time and
        fresh randomness, and ``then(channel, deadline)`` when given."""
        deadline = time.monotonic() + timeout_s
        link = self.channels.link(name)
        with link.lock:
            link.drop()
            self._monitor(name, f"loadvm {tag}", timeout_s)
            left = max(0.1, min(CHANNEL_TIMEOUT_S, deadline - time.monotonic()))
            channel = self.channels.channel(link, self._opener(name), left)
            refresh(channel, left)
            if then is not None:
                then(channel, max(time.monotonic() + left, deadline))
            self.channels.done(link)

    def monitor(self, name: str, command: str, timeout_s: float) -> str:
        """Run a human-monitor command in VM ``name``'s QEMU within ``timeout_s``; its
        output, empty on success. A guest left stopped (``loadvm`` fails so) runs on."""
        libvirt = libvirt_module()
        import libvirt_qemu

        def run() -> str:
            host, dom, _lease = self._domains.ours(name)
            hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            try:
                said = str(libvirt_qemu.qemuMonitorCommand(dom, command, hmp) or "").strip()
                if said and dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                    dom.resume()
            except libvirt.libvirtError as exc:
                raise error(exc, f"VM {name}: {command} on {host.uri}") from exc
            return said

        return within(timeout_s, f"VM {name}: {command}", run)

    def _monitor(self, name: str, command: str, timeout_s: float) -> None:
        """``savevm`` or ``loadvm``; BackendError with what QEMU said if it fails."""
        snapshot_outcome(name, command, self.monitor(name, command, timeout_s))
