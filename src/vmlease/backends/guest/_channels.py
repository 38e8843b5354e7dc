"""One process's agent channels: one per VM, held for one operation at a time,
released when idle.

A guest agent serves one connection at a time, so a channel this process
holds shuts out every other process (``vmlease exec``, pyinfra's connector).
Each backend therefore opens a channel for an operation, keeps it while
operations follow one another, and closes it once nobody has used it for
``IDLE_RELEASE_S``. How a channel is opened is the backend's own (a unix
socket of QEMU's, a libvirt stream); the rule for keeping it is here, once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmlease.backends.guest._agent import AgentChannel

__all__ = ["IDLE_RELEASE_S", "Channels", "Link", "Opener"]

#: A channel unused this long is closed, so that other processes may reach the VM.
IDLE_RELEASE_S = 0.25

#: Opens VM's channel within ``timeout_s``: the channel, and what closes the
#: transport under it when the channel goes (or None).
Opener = Callable[[float], tuple[AgentChannel, Callable[[], None] | None]]


@dataclass
class Link:
    """This process's way to one VM's agent: one user at a time (``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    channel: AgentChannel | None = None
    close_transport: Callable[[], None] | None = None
    used: float = 0.0  # when the channel was last asked for (monotonic)
    timer: threading.Timer | None = None

    def drop(self) -> None:
        """Close the channel and what it runs over; the next use opens a new one."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.close_transport is not None:
            self.close_transport()
            self.close_transport = None


class Channels:
    """This process's links to its VMs' agents, by VM name.

    Args:
        idle_release_s: how long a channel may go unused before it is closed.
    """

    def __init__(self, idle_release_s: float = IDLE_RELEASE_S) -> None:
        self._idle_release_s = idle_release_s
        self._lock = threading.Lock()
        self._links: dict[str, Link] = {}

    def link(self, name: str) -> Link:
        """VM ``name``'s link (made on first use)."""
        with self._lock:
            return self._links.setdefault(name, Link())

    def names(self) -> list[str]:
        with self._lock:
            return list(self._links)

    def channel(self, link: Link, opener: Opener, timeout_s: float) -> AgentChannel:
        """``link``'s channel, opened and greeted if it has none that works.

        The caller holds ``link.lock``; the channel is released once it has
        been idle for ``idle_release_s`` after this call.
        """
        link.used = time.monotonic()
        self._release_when_idle(link, self._idle_release_s)
        if link.channel is not None and not link.channel.broken:
            return link.channel
        link.drop()
        channel, close_transport = opener(timeout_s)
        try:
            channel.handshake(timeout_s)
        except BaseException:
            channel.close()
            if close_transport is not None:
                close_transport()
            raise
        link.channel, link.close_transport = channel, close_transport
        return channel

    def done(self, link: Link) -> None:
        """An operation on ``link`` ended: its idle time counts from now."""
        link.used = time.monotonic()
        self._release_when_idle(link, self._idle_release_s)

    def forget(self, name: str) -> None:
        """Close VM ``name``'s channel and forget its link."""
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            with link.lock:
                if link.timer is not None:
                    link.timer.cancel()
                    link.timer = None
                link.drop()

    def close(self) -> None:
        for name in self.names():
            self.forget(name)

    def _release_when_idle(self, link: Link, after_s: float) -> None:
        """Close ``link``'s channel once nobody has used it for ``idle_release_s``.

        A link in use when the timer fires is looked at again later, so a
        channel never outlives its last use by much more than the idle time.
        """
        if link.timer is not None and link.timer.is_alive():
            return

        def release() -> None:
            if not link.lock.acquire(blocking=False):
                link.timer = None
                self._release_when_idle(link, self._idle_release_s)  # busy: look again later
                return
            try:
                link.timer = None
                if link.channel is None:
                    return
                idle = time.monotonic() - link.used
                if idle < self._idle_release_s:
                    self._release_when_idle(link, self._idle_release_s - idle)
                    return
                link.drop()
            finally:
                link.lock.release()

        timer = threading.Timer(after_s, release)
        timer.daemon = True
        link.timer = timer
        timer.start()
