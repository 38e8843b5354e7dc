"""A VM's private interfaces and names, as the guest layer sends them to its agent."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent_peer import MakeChannel, Peer, frame, read_frame
from vmlease import ChannelError
from vmlease.backends.guest import _agent as proto
from vmlease.backends.guest._lans import NAMES_SCRIPT, LanLink, LanNames, pack, set_lans


def test_the_payload_holds_each_link_then_each_block_of_names() -> None:
    payload = pack(
        [
            LanLink(0, "02:aa:bb:cc:dd:ee", "192.168.100.11/24"),
            LanLink(1, "02:00:00:00:00:01", None),
        ],
        [LanNames("lan", "192.168.100.10 a\n192.168.100.11 b")],
    )
    assert payload[:4] == struct.pack(">I", 2)
    first, second = payload[4:19], payload[19:34]
    assert first == struct.pack(">I", 0) + bytes.fromhex("02aabbccddee") + bytes(
        [192, 168, 100, 11, 24]
    )
    # No address: 0.0.0.0/0, which the agent takes as "remove it".
    assert second == struct.pack(">I", 1) + bytes.fromhex("020000000001") + bytes(5)
    rest = payload[34:]
    assert rest[:4] == struct.pack(">I", 1)
    assert rest[4:] == (
        struct.pack(">I", 3)
        + b"lan"
        + struct.pack(">I", 33)
        + b"192.168.100.10 a\n192.168.100.11 b"
    )


def _agent_of(protocol: int, replies: list[bytes], got: list[tuple[int, bytes]]) -> Peer:
    def peer(sock: socket.socket) -> None:
        _kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + f"vmlease-agent {protocol}".encode()))
        for reply in replies:
            got.append(read_frame(sock))
            sock.sendall(reply)

    return peer


def test_an_agent_of_protocol_4_is_told_in_one_exchange(channel_with: MakeChannel) -> None:
    got: list[tuple[int, bytes]] = []
    ch, t = channel_with(_agent_of(4, [frame(proto.OK)], got))
    ch.handshake(5.0)
    links = [LanLink(0, "02:aa:bb:cc:dd:ee", "192.168.100.11/24")]
    names = [LanNames("lan", "192.168.100.11 b")]
    set_lans(ch, links, names, time.monotonic() + 5, "vm-b")
    t.join()
    assert got == [(proto.NET, pack(links, names))]


def test_an_agent_that_cannot_set_the_network_is_a_channel_error_naming_the_vm(
    channel_with: MakeChannel,
) -> None:
    got: list[tuple[int, bytes]] = []
    refusal = frame(proto.ERR, b"the interface of private network 1: No such device")
    ch, t = channel_with(_agent_of(4, [refusal], got))
    ch.handshake(5.0)
    with pytest.raises(ChannelError, match=r"VM vm-b: setting up its private network.*No such"):
        set_lans(ch, [LanLink(1, "02:00:00:00:00:01", None)], [], time.monotonic() + 5, "vm-b")
    t.join()


def test_an_older_agent_is_given_one_shell_for_links_and_names(channel_with: MakeChannel) -> None:
    got: list[tuple[int, bytes]] = []
    exited = frame(proto.EXIT, struct.pack(">iB", 0, 0))
    ch, t = channel_with(_agent_of(3, [exited], got))
    ch.handshake(5.0)
    links = [LanLink(0, "02:aa:bb:cc:dd:ee", "192.168.100.11/24")]
    set_lans(ch, links, [LanNames("lan", "192.168.100.11 b")], time.monotonic() + 5, "vm-b")
    t.join()
    [(kind, payload)] = got
    assert kind == proto.EXEC
    argv = _argv(payload)
    assert argv[:2] == ["sh", "-c"]
    assert "ip -batch -" in argv[2]
    assert "hosts=/etc/hosts" in argv[2]
    assert argv[3:] == [
        "sh",
        "0",
        "02:aa:bb:cc:dd:ee",
        "192.168.100.11/24",
        "lan",
        "192.168.100.11 b",
    ]


def _argv(payload: bytes) -> list[str]:
    """The argv of an EXEC payload (u32 argc, then u32 length and bytes of each)."""
    (count,) = struct.unpack_from(">I", payload)
    offset, argv = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from(">I", payload, offset)
        argv.append(payload[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return argv


def test_nothing_to_set_sends_nothing(channel_with: MakeChannel) -> None:
    got: list[tuple[int, bytes]] = []
    ch, t = channel_with(_agent_of(4, [], got))
    ch.handshake(5.0)
    set_lans(ch, [], [], time.monotonic() + 5, "vm-b")
    t.join()
    assert got == []


def _names(hosts: Path, tag: str, lines: str) -> str:
    script = f"set -e\nhosts=$1 tag=$2 lines=$3\n{NAMES_SCRIPT}"
    subprocess.run(["sh", "-c", script, "sh", str(hosts), tag, lines], check=True)
    return hosts.read_text()


def test_an_older_agents_names_replace_their_own_block_and_keep_the_rest(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.1 gateway")  # no final newline
    first = _names(hosts, "lan", "192.168.100.10 a")
    assert first == (
        "127.0.0.1 localhost\n10.0.0.1 gateway\n"
        "# vmlease network lan\n192.168.100.10 a\n# vmlease network lan end\n"
    )
    _names(hosts, "db", "192.168.101.10 a")
    again = _names(hosts, "lan", "192.168.100.10 a\n192.168.100.11 b")
    assert again == (
        "127.0.0.1 localhost\n10.0.0.1 gateway\n"
        "# vmlease network db\n192.168.101.10 a\n# vmlease network db end\n"
        "# vmlease network lan\n192.168.100.10 a\n192.168.100.11 b\n# vmlease network lan end\n"
    )
    assert not (tmp_path / "hosts.vmlease").exists()


def test_an_older_agents_names_make_a_hosts_file_where_there_is_none(tmp_path: Path) -> None:
    made = _names(tmp_path / "hosts", "lan", "192.168.100.10 a")
    assert made.startswith("127.0.0.1 localhost\n::1 localhost\n# vmlease network lan\n")
