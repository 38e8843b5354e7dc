"""The switch as a process: ports QEMU's stream netdevs connect to, its control
socket, and its end with its owner."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmlease.backends.guest._switch import CONTROL

BROADCAST = b"\xff" * 6


def _frame(source: int, dest: bytes = BROADCAST) -> bytes:
    data = dest + bytes([0x52, 0x54, 0, 0, 0, source]) + b"\x08\x00payload"
    return struct.pack(">I", len(data)) + data


def _ask(net: Path, **request: object) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(net / CONTROL))
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply: dict[str, object] = json.loads(conn.makefile().readline())
    return reply


def _link(net: Path, name: str) -> socket.socket:
    path = _ask(net, op="attach", port=name)["path"]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(2)
    conn.connect(str(net / str(path)))
    return conn


def _got(conn: socket.socket) -> bytes | None:
    try:
        head = conn.recv(4, socket.MSG_WAITALL)
    except TimeoutError:
        return None
    (size,) = struct.unpack(">I", head)
    return conn.recv(size, socket.MSG_WAITALL)


@pytest.fixture
def switch(
    tmp_path: Path,
) -> Iterator[tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    owner = subprocess.Popen(["sleep", "300"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmlease.backends.guest._switch", str(tmp_path), str(owner.pid)]
    )
    deadline = time.monotonic() + 10
    while not (tmp_path / CONTROL).exists():
        assert time.monotonic() < deadline, "the switch did not start"
        time.sleep(0.02)
    try:
        yield tmp_path, proc, owner
    finally:
        proc.kill()
        owner.kill()
        proc.wait()
        owner.wait()


def test_frames_cross_the_switch_until_a_partition_cuts_them(
    switch: tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    net, _proc, _owner = switch
    with _link(net, "a") as a, _link(net, "b") as b:
        time.sleep(0.1)  # both connections accepted
        a.sendall(_frame(1))
        assert _got(b) is not None
        assert _ask(net, op="partition", groups=[["a"], ["b"]]) == {"ok": True}
        a.sendall(_frame(1))
        assert _got(b) is None
        _ask(net, op="heal")
        a.sendall(_frame(1))
        assert _got(b) is not None
    assert _ask(net, op="nonsense")["ok"] is False


def test_the_switch_ends_with_its_owner_and_leaves_nothing(
    switch: tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    net, proc, owner = switch
    _link(net, "a").close()
    owner.kill()
    assert proc.wait(timeout=10) == 0
    assert not net.exists()  # its directory went with it


def test_a_tcp_port_links_its_vm_like_a_unix_one(
    switch: tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    net, _proc, _owner = switch
    reply = _ask(net, op="attach", port="b", uids=[os.getuid()])
    assert isinstance(reply["tcp"], int)
    with _link(net, "a") as a, socket.create_connection(("127.0.0.1", reply["tcp"]), 2) as b:
        b.settimeout(2)
        time.sleep(0.1)  # both connections accepted
        a.sendall(_frame(1))
        assert _got(b) is not None
        b.sendall(_frame(2))
        assert _got(a) is not None
    # Asked again (a VM started again), the port is the same one.
    assert _ask(net, op="attach", port="b", uids=[os.getuid()])["tcp"] == reply["tcp"]


#: Connects to 127.0.0.1:PORT and prints whether the switch hung up on it.
_STRANGER = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2)
c.settimeout(3)
try:
    print("closed" if c.recv(1) == b"" else "open")
except TimeoutError:
    print("open")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="runs a process as another user, which takes root")
def test_a_tcp_port_hangs_up_on_other_users(
    switch: tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    net, _proc, _owner = switch
    port = _ask(net, op="attach", port="b", uids=[0])["tcp"]
    stranger = subprocess.run(
        ["/usr/bin/python3", "-c", _STRANGER, str(port)],  # one that user may run
        cwd="/",
        user=65534,
        group=65534,
        capture_output=True,
        text=True,
        check=True,
    )
    assert stranger.stdout.strip() == "closed"
