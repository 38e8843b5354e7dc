"""The agent channel pool both QEMU-based backends use: one rule for holding and releasing."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vmlease import BootError
from vmlease.backends.guest import _agent as proto
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._channels import Channels

IDLE_S = 0.1


class Agent:
    """A scripted agent: answers each HELLO; counts connections and closed transports."""

    def __init__(self) -> None:
        self.opened = 0
        self.transports_closed = 0
        self._threads: list[threading.Thread] = []
        self._peers: list[socket.socket] = []

    def opener(self, timeout_s: float) -> tuple[AgentChannel, Callable[[], None]]:
        host, guest = socket.socketpair()
        self.opened += 1
        self._peers.append(guest)
        thread = threading.Thread(target=self._serve, args=(guest,), daemon=True)
        thread.start()
        self._threads.append(thread)

        def close_transport() -> None:
            self.transports_closed += 1

        return AgentChannel(host, name="t"), close_transport

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        try:
            while head := sock.recv(5, socket.MSG_WAITALL):
                kind, length = struct.unpack(">BI", head)
                payload = sock.recv(length, socket.MSG_WAITALL) if length else b""
                if kind == proto.HELLO:
                    reply = payload + b"agent"
                    sock.sendall(struct.pack(">BI", proto.HELLO, len(reply)) + reply)
        except OSError:
            pass

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def agent() -> Iterator[Agent]:
    made = Agent()
    yield made
    made.close()


def _wait_for(cond: Callable[[], bool], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_back_to_back_uses_keep_one_channel(agent: Agent) -> None:
    channels = Channels(idle_release_s=IDLE_S)
    link = channels.link("vm")
    try:
        for _ in range(5):
            with link.lock:
                first = channels.channel(link, agent.opener, 1.0)
            channels.done(link)
        assert agent.opened == 1
        assert link.channel is first
    finally:
        channels.close()


def test_an_idle_channel_is_released_with_its_transport(agent: Agent) -> None:
    channels = Channels(idle_release_s=IDLE_S)
    link = channels.link("vm")
    with link.lock:
        channels.channel(link, agent.opener, 1.0)
    channels.done(link)
    assert _wait_for(lambda: link.channel is None)
    assert agent.transports_closed == 1
    with link.lock:
        channels.channel(link, agent.opener, 1.0)
    assert agent.opened == 2
    channels.close()
    assert agent.transports_closed == 2


def test_a_channel_in_use_is_not_released_under_its_user(agent: Agent) -> None:
    channels = Channels(idle_release_s=IDLE_S)
    link = channels.link("vm")
    try:
        with link.lock:
            channel = channels.channel(link, agent.opener, 1.0)
            time.sleep(IDLE_S * 4)  # a long operation: timers fire meanwhile
            assert link.channel is channel
            assert not channel.broken
        channels.done(link)
        assert _wait_for(lambda: link.channel is None)  # released once idle after all
    finally:
        channels.close()


def test_a_broken_channel_is_replaced(agent: Agent) -> None:
    channels = Channels(idle_release_s=10.0)
    link = channels.link("vm")
    try:
        with link.lock:
            first = channels.channel(link, agent.opener, 1.0)
            first._broken = "the VM closed the channel"
            second = channels.channel(link, agent.opener, 1.0)
        assert second is not first
        assert agent.opened == 2
        assert agent.transports_closed == 1
    finally:
        channels.close()


def test_a_channel_that_fails_its_greeting_closes_its_transport() -> None:
    closed: list[bool] = []

    def silent(timeout_s: float) -> tuple[AgentChannel, Callable[[], None]]:
        host, guest = socket.socketpair()
        guest.close()
        return AgentChannel(host, name="t"), lambda: closed.append(True)

    channels = Channels()
    link = channels.link("vm")
    with link.lock, pytest.raises(BootError, match="closed its channel"):
        channels.channel(link, silent, 0.2)
    assert closed == [True]
    assert link.channel is None
    channels.close()
