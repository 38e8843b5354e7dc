"""A private network's switch: Ethernet frames between VMs' second interfaces,
with no root, bridge or TAP.

Each VM on a network gives QEMU ``-netdev dgram`` with a Unix datagram
socket of its own (its port) and the switch's socket as the remote end.
The switch learns which port each source MAC address came from, sends a
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
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Impairment", "Switch"]

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
