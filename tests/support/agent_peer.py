"""A scripted guest agent on a socketpair, for tests of the agent protocol's host side."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from vmlease.backends.guest._agent import AgentChannel

Peer = Callable[[socket.socket], None]
MakeChannel = Callable[[Peer], tuple[AgentChannel, threading.Thread]]


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", kind, len(payload)) + payload


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    head = sock.recv(5, socket.MSG_WAITALL)
    kind, length = struct.unpack(">BI", head)
    data = sock.recv(length, socket.MSG_WAITALL) if length else b""
    return kind, data


@pytest.fixture
def channel_with() -> Iterator[MakeChannel]:
    """Connects a channel to ``peer`` running in a thread; closes both at teardown."""
    opened: list[tuple[AgentChannel, socket.socket, threading.Thread]] = []

    def make(peer: Peer) -> tuple[AgentChannel, threading.Thread]:
        host, guest = socket.socketpair()
        thread = threading.Thread(target=peer, args=(guest,), daemon=True)
        thread.start()
        channel = AgentChannel(host, name="t")
        opened.append((channel, guest, thread))
        return channel, thread

    yield make
    for channel, guest, thread in opened:
        channel.close()
        guest.close()
        thread.join(5)
