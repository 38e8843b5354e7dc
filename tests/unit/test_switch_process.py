"""The switch as a process: ports QEMU's stream netdevs connect to, its control
socket, and its end with its owner."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmlease.backends.qemu._switch import CONTROL

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
        [sys.executable, "-m", "vmlease.backends.qemu._switch", str(tmp_path), str(owner.pid)]
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
