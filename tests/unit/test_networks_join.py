"""A backend instance's networks: a join that fails half-way is undone, and a VM
leaves even a network whose switch no longer answers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

import pytest

from vmlease._errors import BackendError, InvalidSpec
from vmlease.backends.guest._agent import NET, AgentChannel
from vmlease.backends.guest._lans import LanLink, LanNames, pack
from vmlease.backends.guest._machine import lan_mac
from vmlease.backends.guest._segments import Networks


def test_a_join_that_fails_half_way_is_undone_and_a_dead_switch_does_not_fail_a_leave(
    tmp_path: Path,
) -> None:
    networks = Networks(tmp_path)
    try:
        [port] = networks.join("one", ("lan",))
        assert port.socket.is_socket()
        assert port.tcp is None
        # "a/b" cannot name a port: the switch refuses it after the network counted it.
        with pytest.raises(BackendError):
            networks.join("a/b", ("lan", "back"))
        networks.leave("a/b")
        assert networks.control("lan", op="stats")["ports"] == ["one"]
        # The switch dies: the VM still leaves, and the network's directory is gone with it.
        path = port.network
        networks.control("lan", op="stop")
        networks.leave("one")
    finally:
        networks.close()
    assert not path.exists()


class _Channel:
    """What the guest of a VM is sent (an agent of protocol 4)."""

    protocol = 4

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def request(self, kind: int, payload: bytes, timeout_s: float, *, what: str) -> None:
        assert kind == NET
        self.sent.append(payload)


def test_vms_are_known_by_name_and_alias_and_no_two_go_by_one_name(tmp_path: Path) -> None:
    networks = Networks(tmp_path)
    try:
        networks.join("vm-1", ("lan",), alias="server")
        with pytest.raises(InvalidSpec, match="goes by 'server' already"):
            networks.join("vm-2", ("lan",), alias="server")
        with pytest.raises(InvalidSpec, match="goes by 'vm-1' already"):
            networks.join("vm-2", ("lan",), alias="vm-1")
        assert networks.joined("vm-2") == ()  # refused before it joined anything
        networks.join("vm-2", ("lan",))
        channel = _Channel()
        told = networks.configure("vm-2", cast(AgentChannel, channel), time.monotonic() + 5)
        names = LanNames("lan", "192.168.100.10 vm-1 server\n192.168.100.11 vm-2")
        assert channel.sent == [
            pack([LanLink(0, lan_mac("vm-2", 0), "192.168.100.11/24")], [names])
        ]
        assert told == []  # vm-1's guest was never set up: it learns the names when it is
        networks.leave("vm-1")
        networks.join("vm-3", ("lan",), alias="server")  # the alias is free again
    finally:
        networks.close()


def test_network_directories_no_switch_serves_are_swept_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    networks = Networks(tmp_path)
    try:
        [port] = networks.join("one", ("lan",))  # a live network, its switch running
        stale = tmp_path / ".lan-0000dead-lan"
        stale.mkdir()
        (stale / "x.sock").touch()
        young = tmp_path / ".lan-0000beef-lan"  # a switch of another session, starting
        young.mkdir()
        later = time.time() + 600
        os.utime(young, (later, later))
        assert networks.sweep(now=time.time() + 120) == [stale]
        assert young.is_dir()
        assert port.network.is_dir()
    finally:
        networks.close()
