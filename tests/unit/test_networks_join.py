"""A backend instance's networks: a join that fails half-way is undone, and a VM
leaves even a network whose switch no longer answers."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
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


def test_vms_are_known_by_name_and_alias_and_no_two_go_by_one_name_and_macs_follow_addresses(
    tmp_path: Path,
) -> None:
    networks = Networks(tmp_path)
    try:
        [first] = networks.join("vm-1", ("lan",), alias="server")
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
            pack([LanLink(0, lan_mac("192.168.100.11"), "192.168.100.11/24")], [names])
        ]
        assert told == []  # vm-1's guest was never set up: it learns the names when it is
        networks.leave("vm-1")
        [taker] = networks.join("vm-3", ("lan",), alias="server")  # the alias is free again
        # vm-3 takes the address vm-1 left, and its MAC with it: no ARP cache on the
        # network can hold another MAC for that address.
        assert taker.mac == first.mac == "02:76:c0:a8:64:0a"
    finally:
        networks.close()


class _Waking(_Channel):
    """A guest woken from a saved state; its NET answered by ``answer``."""

    def __init__(self, protocol: int, answer: str | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.answer = answer
        self.woken: list[tuple[str, list[tuple[int, bytes]]]] = []

    def wake_as(
        self, name: str, state: str, timeout_s: float, *, also: Sequence[tuple[int, bytes]] = ()
    ) -> list[str | None]:
        self.woken.append((name, list(also)))
        return [self.answer for _ in also]


def test_a_wake_sets_a_vms_networks_in_its_exchange_and_configure_is_left_nothing(
    tmp_path: Path,
) -> None:
    networks = Networks(tmp_path)
    try:
        networks.join("vm-1", ("lan",))
        networks.join("vm-2", ("lan",))
        one = _Waking(4)
        networks.wake("vm-1", "k1", cast(AgentChannel, one), 5.0)
        names = LanNames("lan", "192.168.100.10 vm-1\n192.168.100.11 vm-2")
        link = LanLink(0, lan_mac("192.168.100.10"), "192.168.100.10/24")
        assert one.woken == [("vm-1", [(NET, pack([link], [names]))])]
        assert networks.woken("vm-1") == []  # vm-2 was not set up yet
        assert networks.woken("vm-1") is None  # once
        # vm-2, set up later, tells vm-1 of itself: vm-1 is known to be set up.
        told = networks.configure("vm-2", cast(AgentChannel, _Channel()), time.monotonic() + 5)
        assert told == [("vm-1", names)]
        # A guest that could not set its network is left to configure, which says why.
        two = _Waking(4, answer="no interface for private network 0")
        networks.wake("vm-2", "k1", cast(AgentChannel, two), 5.0)
        assert networks.woken("vm-2") is None
        # An agent older than NET is woken alone.
        three = _Waking(3)
        networks.wake("vm-2", "k1", cast(AgentChannel, three), 5.0)
        assert three.woken == [("vm-2", [])]
        assert networks.woken("vm-2") is None
        # A VM on no network is woken alone.
        networks.join("vm-3", ())
        four = _Waking(4)
        networks.wake("vm-3", "k1", cast(AgentChannel, four), 5.0)
        assert four.woken == [("vm-3", [])]
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
