"""Forwarded ports: 127.0.0.1 only, chosen without races, recorded, and kept
across snapshot restores and stop/start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return sock.recv(64)


def _listening_on(port: int) -> set[str]:
    """The local addresses the host listens on ``port`` at (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_a_forward_reaches_sshd_from_127_0_0_1_only(
    session: vmlease.Session, debian_image: Image, state: Path
) -> None:
    vm = session.create(image="debian-12")
    port = vm.forward(22)
    assert _banner(port).startswith(b"SSH-2.0-OpenSSH")
    assert _listening_on(port) == {"127.0.0.1"}
    assert vm.forward(22) == port  # the same forward, not a second one
    other = session.create(image="debian-12")
    assert other.forward(22) != port  # the kernel chose: no two VMs share a port
    listing = subprocess.run(
        [sys.executable, "-m", "vmlease", "ls", "--json"],
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(listing.stdout)["vms"]}
    assert rows[vm.name]["forwards"] == {"22": port}
    assert rows[vm.name]["start"] == "mapped state"
    table = subprocess.run(
        [sys.executable, "-m", "vmlease", "ls"],
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"127.0.0.1:{port}->22" in table


def test_a_forward_survives_a_restore_and_a_restart(
    session: vmlease.Session, debian_image: Image
) -> None:
    vm = session.create(image="debian-12")
    vm.snapshot("before")
    port = vm.forward(22)
    vm.restore("before")  # a state from before the forward existed
    assert _banner(port).startswith(b"SSH-2.0")
    vm.stop()
    vm.start()
    assert vm.forward(22) == port
    assert _banner(port).startswith(b"SSH-2.0")


def test_a_forward_and_ssh_survive_a_reset(session: vmlease.Session, debian_image: Image) -> None:
    vm = session.create(image="debian-12")
    port = vm.forward(22)
    assert vm.can_reset
    vm.reset()
    assert vm.forward(22) == port
    assert _banner(port).startswith(b"SSH-2.0")
    done = subprocess.run(
        vm.ssh.argv(["hostname"]), capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, vm.name), done.stderr


def test_forwards_need_a_network_and_a_real_port(
    session: vmlease.Session, debian_image: Image
) -> None:
    vm = session.create(image="debian-12", network="none")
    with pytest.raises(vmlease.ConfigError, match="has no network"):
        vm.forward(22)
    for bad in (0, 70000):
        with pytest.raises(vmlease.ConfigError, match="from 1 to 65535"):
            vm.forward(bad)
