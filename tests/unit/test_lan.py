"""A private network's handle: what it asks of the session, and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from vmlease._errors import ConfigError
from vmlease._lan import PrivateNetwork


def _network(members: list[str]) -> tuple[PrivateNetwork, list[dict[str, Any]]]:
    asked: list[dict[str, Any]] = []

    def ask(name: str, request: dict[str, Any]) -> dict[str, Any]:
        assert name == "lan"
        asked.append(request)
        return {"ok": True}

    return PrivateNetwork("lan", ask, lambda: members), asked


class _VM:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_partition_names_its_vms_and_a_heal_and_clear_ask_the_switch() -> None:
    lan, asked = _network(["a", "b", "c"])
    lan.partition([_VM("a"), "b"], ["c"])
    lan.heal()
    lan.impair("c", delay_s=0.2, loss=0.1)
    lan.clear()
    assert asked == [
        {"op": "partition", "groups": [["a", "b"], ["c"]]},
        {"op": "heal"},
        {"op": "impair", "port": "c", "delay_s": 0.2, "loss": 0.1},
        {"op": "clear"},
    ]


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda lan: lan.partition(["a"], ["z"]), "not on network lan"),
        (lambda lan: lan.partition(), "at least one group"),
        (lambda lan: lan.partition([42]), "not a VM"),
        (lambda lan: lan.impair("a", delay_s=61), "between 0 and 60"),
        (lambda lan: lan.impair("a", loss=-0.1), "between 0 and 1"),
        (lambda lan: lan.impair("a", loss="much"), "must be a number"),
    ],
)
def test_what_cannot_be_done_to_a_network_is_refused_before_the_switch_is_asked(
    call: Any, says: str
) -> None:
    lan, asked = _network(["a", "b"])
    with pytest.raises(ConfigError, match=says):
        call(lan)
    assert asked == []


@pytest.mark.parametrize("name", ["", "LAN", "9lan", "a" * 16, "lan_1"])
def test_a_network_name_that_cannot_be_one_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a network"):
        PrivateNetwork(name, lambda n, r: {}, list)
