"""A backend instance's networks: a join that fails half-way is undone, and a VM
leaves even a network whose switch no longer answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmlease._errors import BackendError
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
