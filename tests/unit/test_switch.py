"""The private network switch's policy: learning, flooding, links, partitions, impairments."""

from __future__ import annotations

import pytest

from vmlease.backends.guest._switch import Impairment, Switch

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0x00, 0, 0, n])


def frame(dest: bytes, source: bytes, body: bytes = b"x") -> bytes:
    return dest + source + b"\x08\x00" + body


class Net:
    def __init__(self, *ports: str) -> None:
        self.now = 0.0
        self.sent: list[tuple[str, bytes]] = []
        self.rolls: list[float] = []
        self.switch = Switch(
            lambda data, port: self.sent.append((port, data)),
            lambda: self.now,
            lambda: self.rolls.pop(0),
        )
        for port in ports:
            self.switch.attach(port)

    def to(self) -> list[str]:
        got = [port for port, _ in self.sent]
        self.sent.clear()
        return got


def test_a_broadcast_floods_every_other_port_and_a_learned_address_gets_its_port_alone() -> None:
    net = Net("a", "b", "c")
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["b", "c"]
    net.switch.receive(frame(mac(1), mac(2)), "b")  # a's address is known: to a alone
    assert net.to() == ["a"]
    net.switch.receive(frame(mac(9), mac(2)), "b")  # unknown: flooded
    assert net.to() == ["a", "c"]


def test_a_port_joins_by_sending_and_runt_frames_are_ignored() -> None:
    net = Net("a")
    net.switch.receive(frame(BROADCAST, mac(2)), "b")
    assert net.to() == ["a"]
    net.switch.receive(b"short", "a")
    assert net.to() == []


def test_a_link_down_neither_sends_nor_receives_until_it_is_up_again() -> None:
    net = Net("a", "b", "c")
    net.switch.set_link("b", up=False)
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["c"]
    net.switch.receive(frame(BROADCAST, mac(2)), "b")
    assert net.to() == []
    net.switch.set_link("b", up=True)
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["b", "c"]


def test_a_partition_splits_the_ports_into_groups_until_it_heals() -> None:
    net = Net("a", "b", "c", "d")
    net.switch.partition([["a", "b"], ["c"]])
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["b"]
    net.switch.receive(frame(BROADCAST, mac(3)), "c")
    assert net.to() == []
    net.switch.receive(frame(BROADCAST, mac(4)), "d")  # in no group: alone
    assert net.to() == []
    net.switch.heal()
    net.switch.receive(frame(mac(3), mac(1)), "a")
    assert net.to() == ["c"]
    with pytest.raises(ValueError, match="more than one group"):
        net.switch.partition([["a"], ["a", "b"]])


def test_a_delayed_port_gets_its_frames_when_due_and_a_lossy_one_loses_its_share() -> None:
    net = Net("a", "b", "c")
    net.switch.impair("b", Impairment(delay_s=0.5))
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["c"]
    assert net.switch.due() == 0.5
    net.now = 0.4
    net.switch.flush()
    assert net.to() == []
    net.now = 0.5
    net.switch.flush()
    assert net.to() == ["b"]
    net.switch.impair("b", Impairment())
    net.switch.impair("c", Impairment(loss=0.5))
    net.rolls = [0.2, 0.7]
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    assert net.to() == ["b", "b", "c"]
    assert net.switch.dropped == 1


def test_a_held_frame_is_not_delivered_across_a_cut_made_while_it_waited() -> None:
    net = Net("a", "b")
    net.switch.impair("b", Impairment(delay_s=1.0))
    net.switch.receive(frame(BROADCAST, mac(1)), "a")
    net.switch.partition([["a"], ["b"]])
    net.now = 2.0
    net.switch.flush()
    assert net.to() == []


@pytest.mark.parametrize(("delay", "loss"), [(-1.0, 0.0), (61.0, 0.0), (0.0, 1.5)])
def test_an_impairment_out_of_range_is_refused(delay: float, loss: float) -> None:
    with pytest.raises(ValueError, match="between"):
        Impairment(delay_s=delay, loss=loss)
