"""A private network's switch: Ethernet frames between VMs' second interfaces,
with no root, bridge or TAP.

Each VM on a network has a port of its own on the switch, a listening Unix
stream socket its QEMU connects to (``-netdev stream``), and, for QEMU that
runs as another user (libvirt's), a TCP port on 127.0.0.1 that accepts only
the users it was given (``-netdev socket``; both frame a packet with its
length in 4 bytes). The switch learns which port each source MAC address came from, sends a
frame for a known address to that port alone and floods the others
(broadcast, multicast, unknown) to every port that can hear the sender.

Faults are the switch's to make: a port can be down (it sends and receives
nothing), the ports can be split into groups that do not hear each other (a
partition, healed by one group again), and each port can delay or drop the
frames it receives. ``Switch`` is the policy, with its side effects (sending,
the clock, the dice) injected; ``serve`` runs it on real sockets.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONTROL", "Impairment", "Switch", "main", "tcp_peer_uid"]

#: Frames shorter than an Ethernet header carry nothing to switch.
_HEADER = 14
#: Learned addresses a switch keeps, at most (a guest cannot fill its memory).
_MAX_LEARNED = 4096
#: Frames held for delay, at most; beyond it a delayed frame is dropped.
_MAX_HELD = 10000


@dataclass(frozen=True, slots=True)
class Impairment:
    """What happens to frames a port receives.

    Attributes:
        delay_s: how long each is held before delivery.
        loss: the share dropped (0 to 1).
    """

    delay_s: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be between 0 and 1, not {self.loss!r}")
        if not 0.0 <= self.delay_s <= 60.0:
            raise ValueError(f"delay must be between 0 and 60 s, not {self.delay_s!r}")


@dataclass(order=True)
class _Held:
    due: float
    seq: int
    sender: str = field(compare=False)
    port: str = field(compare=False)
    frame: bytes = field(compare=False)


class Switch:
    """The switching policy of one network.

    Args:
        send: delivers a frame to a port.
        clock: the current time, in seconds.
        dice: a number in [0, 1) per frame that a lossy port receives.
    """

    def __init__(
        self,
        send: Callable[[bytes, str], None],
        clock: Callable[[], float],
        dice: Callable[[], float] = random.random,
    ) -> None:
        self._send = send
        self._clock = clock
        self._dice = dice
        self.ports: set[str] = set()
        self._learned: dict[bytes, str] = {}
        self._down: set[str] = set()
        self._group: dict[str, int] = {}
        self._impaired: dict[str, Impairment] = {}
        self._held: list[_Held] = []
        self._seq = 0
        self.dropped = 0

    # -- what the session asks ------------------------------------------------

    def attach(self, port: str) -> None:
        """A VM's port joins (it also joins by sending its first frame)."""
        self.ports.add(port)

    def detach(self, port: str) -> None:
        """A VM's port leaves: nothing more is sent to it."""
        self.ports.discard(port)
        self._down.discard(port)
        self._group.pop(port, None)
        self._impaired.pop(port, None)
        self._learned = {mac: p for mac, p in self._learned.items() if p != port}

    def set_link(self, port: str, up: bool) -> None:
        """Cut (``up=False``) or restore a port's link."""
        if up:
            self._down.discard(port)
        else:
            self._down.add(port)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the ports into ``groups`` that hear only each other; a port in no
        group hears only itself."""
        self._group = {}
        for index, group in enumerate(groups):
            for port in group:
                if port in self._group:
                    raise ValueError(f"{port} is in more than one group")
                self._group[port] = index

    def heal(self) -> None:
        """Every port hears every other again."""
        self._group = {}

    def clear(self) -> None:
        """No partition and no impairment: the network as it was made."""
        self._group = {}
        self._impaired = {}

    def impair(self, port: str, impairment: Impairment) -> None:
        """Delay or drop what ``port`` receives (``Impairment()`` for neither)."""
        if impairment == Impairment():
            self._impaired.pop(port, None)
        else:
            self._impaired[port] = impairment

    # -- frames ------------------------------------------------------------

    def _hears(self, sender: str, receiver: str) -> bool:
        if receiver == sender or receiver in self._down:
            return False
        if not self._group:
            return True
        mine = self._group.get(sender)
        return mine is not None and self._group.get(receiver) == mine

    def receive(self, frame: bytes, port: str) -> None:
        """A frame from ``port``: learn its source, and pass it on."""
        if port in self._down or len(frame) < _HEADER:
            return
        self.ports.add(port)
        dest, source = frame[:6], frame[6:12]
        if not source[0] & 1 and (source in self._learned or len(self._learned) < _MAX_LEARNED):
            self._learned[source] = port
        known = None if dest[0] & 1 else self._learned.get(dest)
        targets = [known] if known is not None else sorted(self.ports)
        for target in targets:
            if self._hears(port, target):
                self._deliver(frame, port, target)

    def _deliver(self, frame: bytes, sender: str, port: str) -> None:
        impairment = self._impaired.get(port)
        if impairment is None:
            self._send(frame, port)
            return
        if impairment.loss and self._dice() < impairment.loss:
            self.dropped += 1
            return
        if impairment.delay_s <= 0:
            self._send(frame, port)
        elif len(self._held) >= _MAX_HELD:
            self.dropped += 1
        else:
            self._seq += 1
            heapq.heappush(
                self._held,
                _Held(self._clock() + impairment.delay_s, self._seq, sender, port, frame),
            )

    def due(self) -> float | None:
        """When the next held frame is due, if one is held."""
        return self._held[0].due if self._held else None

    def flush(self) -> None:
        """Deliver the held frames that are due, unless their way was cut meanwhile
        (a link down, a partition, a port gone)."""
        now = self._clock()
        while self._held and self._held[0].due <= now:
            held = heapq.heappop(self._held)
            if held.port in self.ports and self._hears(held.sender, held.port):
                self._send(held.frame, held.port)


def tcp_peer_uid(peer: tuple[str, int], listener: socket.socket) -> int | None:
    """The user owning the other end of a connection from ``peer`` to ``listener``
    (both on 127.0.0.1), from ``/proc/net/tcp``; None if it cannot be told."""
    ours = listener.getsockname()[1]
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == peer[1] and int(remote[1], 16) == ours:
            return int(fields[7])
    return None


# -- the switch process ----------------------------------------------------------

#: What a port's connection may hold unsent before frames to it are dropped
#: (a guest that stops reading must not grow the switch).
_BACKLOG = 4 << 20
#: The largest frame a port may send (QEMU's own limit for stream netdevs).
_MAX_FRAME = 69632
CONTROL = "control.sock"


class _Port:
    """One VM's link: the listening sockets QEMU connects to, and its connection."""

    def __init__(self, name: str, listeners: list[socket.socket], uids: set[int]) -> None:
        self.name = name
        self.listeners = listeners
        #: Who may connect over TCP.
        self.uids = uids
        self.conn: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class _Server:
    """The switch on real sockets, in the network's directory (its working
    directory: socket names stay short whatever the path)."""

    def __init__(self, owner_fd: int | None) -> None:
        self.sel = selectors.DefaultSelector()
        self.ports: dict[str, _Port] = {}
        self.switch = Switch(self._send, time.monotonic)
        self.running = True
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(CONTROL)
        self.control.listen(16)
        self.sel.register(self.control, selectors.EVENT_READ, ("control", None))
        if owner_fd is not None:
            self.sel.register(owner_fd, selectors.EVENT_READ, ("owner", None))

    def _send(self, frame: bytes, name: str) -> None:
        port = self.ports.get(name)
        if port is None or port.conn is None:
            return
        if len(port.outbuf) > _BACKLOG:
            self.switch.dropped += 1
            return
        port.outbuf += struct.pack(">I", len(frame)) + frame
        self._pump(port)

    def _pump(self, port: _Port) -> None:
        assert port.conn is not None
        try:
            sent = port.conn.send(port.outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._hang_up(port)
            return
        del port.outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if port.outbuf else 0)
        self.sel.modify(port.conn, events, ("link", port))

    def _hang_up(self, port: _Port) -> None:
        if port.conn is not None:
            self.sel.unregister(port.conn)
            port.conn.close()
        port.conn = None
        port.inbuf.clear()
        port.outbuf.clear()

    def attach(self, name: str, uids: set[int] | None = None) -> dict[str, Any]:
        """Port ``name``'s Unix socket, and with ``uids`` a TCP port on 127.0.0.1 that
        those users alone may connect to."""
        if not name.isidentifier() and not name.replace("-", "_").isidentifier():
            raise ValueError(f"{name!r} cannot name a port")
        port = self.ports.get(name)
        if port is None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            Path(f"{name}.sock").unlink(missing_ok=True)
            listener.bind(f"{name}.sock")
            port = self.ports[name] = _Port(name, [], set())
            self._listen(port, listener)
            self.switch.attach(name)
        if uids is not None and len(port.listeners) == 1:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            port.uids = uids
            self._listen(port, tcp)
        reply: dict[str, Any] = {"path": f"{name}.sock"}
        if len(port.listeners) > 1:
            reply["tcp"] = port.listeners[1].getsockname()[1]
        return reply

    def _listen(self, port: _Port, listener: socket.socket) -> None:
        """``listener`` takes ``port``'s connection from now on."""
        listener.listen(1)
        listener.setblocking(False)
        port.listeners.append(listener)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", port))

    def detach(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            return
        self._hang_up(port)
        for listener in port.listeners:
            self.sel.unregister(listener)
            listener.close()
        Path(f"{name}.sock").unlink(missing_ok=True)
        self.switch.detach(name)

    def _accept(self, port: _Port, listener: socket.socket) -> None:
        conn, peer = listener.accept()
        if listener.family == socket.AF_INET and tcp_peer_uid(peer, listener) not in port.uids:
            conn.close()  # another user's process: not a VM of this network
            return
        conn.setblocking(False)
        self._hang_up(port)  # a VM started again replaces its old link
        port.conn = conn
        self.sel.register(conn, selectors.EVENT_READ, ("link", port))

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "attach":
            uids = request.get("uids")
            return self.attach(str(request["port"]), None if uids is None else set(map(int, uids)))
        if op == "detach":
            self.detach(str(request["port"]))
        elif op == "link":
            self.switch.set_link(str(request["port"]), bool(request["up"]))
        elif op == "partition":
            self.switch.partition([[str(p) for p in group] for group in request["groups"]])
        elif op == "heal":
            self.switch.heal()
        elif op == "clear":
            self.switch.clear()
        elif op == "impair":
            impairment = Impairment(float(request.get("delay_s", 0)), float(request.get("loss", 0)))
            self.switch.impair(str(request["port"]), impairment)
        elif op == "stats":
            return {"ports": sorted(self.ports), "dropped": self.switch.dropped}
        elif op == "stop":
            self.running = False
        else:
            raise ValueError(f"unknown request {op!r}")
        return {}

    def _control(self) -> None:
        conn, _ = self.control.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                reply: dict[str, Any] = {"ok": True, **self.command(json.loads(data))}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _read(self, port: _Port) -> None:
        assert port.conn is not None
        try:
            chunk = port.conn.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._hang_up(port)
            return
        port.inbuf += chunk
        while len(port.inbuf) >= 4:
            (size,) = struct.unpack(">I", port.inbuf[:4])
            if size > _MAX_FRAME:
                self._hang_up(port)  # not a QEMU stream netdev
                return
            if len(port.inbuf) < 4 + size:
                break
            frame = bytes(port.inbuf[4 : 4 + size])
            del port.inbuf[: 4 + size]
            self.switch.receive(frame, port.name)

    def run(self) -> None:
        while self.running:
            due = self.switch.due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            for key, events in self.sel.select(timeout):
                kind, port = key.data
                if kind == "owner":
                    return
                if kind == "control":
                    self._control()
                elif kind == "listen":
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(port, key.fileobj)
                elif events & selectors.EVENT_READ:
                    self._read(port)
                if kind == "link" and port.conn is not None and events & selectors.EVENT_WRITE:
                    self._pump(port)
            self.switch.flush()


def main(argv: list[str]) -> int:
    """``python -m vmlease.backends.guest._switch NET_DIR OWNER_PID``: serve the network
    in NET_DIR until its owner exits or it is told to stop."""
    net_dir, owner = Path(argv[0]), int(argv[1])
    os.chdir(net_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        owner_fd: int | None = os.pidfd_open(owner)
    except ProcessLookupError:
        return 0  # its owner is gone already
    server = _Server(owner_fd)
    try:
        server.run()
    finally:
        for name in list(server.ports):
            server.detach(name)
        # The network's directory is the switch's: nothing of it outlives the switch.
        shutil.rmtree(net_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
