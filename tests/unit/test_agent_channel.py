"""Host side of the agent protocol against a scripted peer on a socketpair."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.support.agent_peer import MakeChannel, frame, read_frame
from vmlease import BootError, ChannelError, GuestFileError
from vmlease.backends.guest import _agent as proto
from vmlease.backends.guest._agent import AgentChannel


def test_handshake_skips_leftovers_from_an_earlier_connection(channel_with: MakeChannel) -> None:
    def peer(sock: socket.socket) -> None:
        kind, nonce = read_frame(sock)
        assert kind == proto.HELLO
        # Junk, a stale frame and half a header, then the answer.
        sock.sendall(
            b"\x04\x00\x00\x00\x03abc"
            + b"\xff\x00"
            + frame(proto.HELLO, nonce + b"vmlease-agent 1")
        )

    ch, t = channel_with(peer)
    assert ch.handshake(5.0) == "vmlease-agent 1"
    t.join()


def test_handshake_times_out_with_a_boot_error(channel_with: MakeChannel) -> None:
    ch, _ = channel_with(lambda sock: None)
    with pytest.raises(BootError, match="did not answer"):
        ch.handshake(0.3)


def test_exec_collects_output_in_order_and_sends_stdin(channel_with: MakeChannel) -> None:
    got_stdin: list[bytes] = []

    def peer(sock: socket.socket) -> None:
        kind, _req = read_frame(sock)
        assert kind == proto.EXEC
        while True:
            kind, data = read_frame(sock)
            assert kind == proto.STDIN
            if not data:
                break
            got_stdin.append(data)
        sock.sendall(
            frame(proto.STDOUT, b"out1 ")
            + frame(proto.STDERR, b"err")
            + frame(proto.STDOUT, b"out2")
        )
        sock.sendall(frame(proto.EXIT, struct.pack(">iB", 7, 0)))

    ch, t = channel_with(peer)
    big = os.urandom(600_000)
    result = ch.exec(["x"], stdin=big, env={"A": "1"}, cwd="/tmp", timeout_s=10)
    t.join()
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out1 out2", b"err")
    assert b"".join(got_stdin) == big


def test_a_command_that_exits_mid_stdin_leaves_the_stream_on_a_frame_boundary(
    channel_with: MakeChannel,
) -> None:
    """The command exits while a STDIN frame is half sent: the rest of that frame
    still goes out, so the next request is read as a request."""
    seen: list[int] = []

    def peer(sock: socket.socket) -> None:
        assert read_frame(sock)[0] == proto.EXEC
        kind, length = struct.unpack(">BI", sock.recv(5, socket.MSG_WAITALL))
        assert kind == proto.STDIN
        sock.recv(1000, socket.MSG_WAITALL)  # part of it, then the command is done
        sock.sendall(frame(proto.EXIT, struct.pack(">iB", 0, 0)))
        sock.recv(length - 1000, socket.MSG_WAITALL)  # the rest of that frame
        while True:  # what follows must parse as whole frames up to the next EXEC
            kind, _ = read_frame(sock)
            seen.append(kind)
            if kind == proto.EXEC:
                sock.sendall(frame(proto.EXIT, struct.pack(">iB", 7, 0)))
                return

    host, guest = socket.socketpair()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    thread = threading.Thread(target=peer, args=(guest,), daemon=True)
    thread.start()
    ch = AgentChannel(host, name="t")
    try:
        first = ch.exec(["true"], stdin=os.urandom(1 << 20), env=None, cwd=None, timeout_s=5)
        assert first.exit_code == 0
        assert ch.exec(["next"], stdin=None, env=None, cwd=None, timeout_s=5).exit_code == 7
    finally:
        ch.close()
        guest.close()
        thread.join(5)
    assert seen[-1] == proto.EXEC
    assert set(seen[:-1]) <= {proto.STDIN}


def test_exec_timeout_sends_kill_and_reports_it(channel_with: MakeChannel) -> None:
    def peer(sock: socket.socket) -> None:
        read_frame(sock)
        read_frame(sock)  # end of stdin
        kind, data = read_frame(sock)
        assert kind == proto.KILL
        assert struct.unpack(">I", data) == (9,)
        sock.sendall(frame(proto.EXIT, struct.pack(">iB", 137, 1)))

    ch, t = channel_with(peer)
    result = ch.exec(["sleep", "9"], stdin=None, env=None, cwd=None, timeout_s=0.2)
    t.join()
    assert result.timed_out
    assert result.exit_code == 137


def test_a_closed_channel_is_a_channel_error_and_stays_broken(channel_with: MakeChannel) -> None:
    ch, t = channel_with(lambda sock: sock.close())
    t.join()
    with pytest.raises(ChannelError, match="broke"):
        ch.exec(["true"], stdin=None, env=None, cwd=None, timeout_s=5)
    assert ch.broken
    with pytest.raises(ChannelError, match="broken"):
        ch.exec(["true"], stdin=None, env=None, cwd=None, timeout_s=5)


def test_abort_fd_ends_a_wait_at_once() -> None:
    host, guest = socket.socketpair()
    r, w = os.pipe()
    ch = AgentChannel(host, name="t", abort_fd=r)
    os.write(w, b"x")
    with pytest.raises(ChannelError, match="exited"):
        ch.exec(["true"], stdin=None, env=None, cwd=None, timeout_s=None)
    for fd in (r, w):
        os.close(fd)
    guest.close()
    ch.close()


def test_get_error_leaves_no_local_file(channel_with: MakeChannel, tmp_path: Path) -> None:
    def peer(sock: socket.socket) -> None:
        read_frame(sock)
        sock.sendall(frame(proto.ERR, b"cannot read /nope: No such file or directory"))

    ch, t = channel_with(peer)
    target = tmp_path / "out.bin"
    with pytest.raises(GuestFileError, match="No such file"):
        ch.get("/nope", target)
    t.join()
    assert list(tmp_path.iterdir()) == []


def test_info_usernet_is_read_for_host_forwards() -> None:
    from vmlease.backends.qemu._qmp import host_forwards

    text = (
        "Hub -1 (net0):\r\n"
        "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
        "  TCP[HOST_FORWARD]  13       127.0.0.1 40123       10.0.2.15    22     0     0\r\n"
        "  TCP[ESTABLISHED]   20        10.0.2.15 51000   151.101.2.132    80     0     0\r\n"
        "  TCP[HOST_FORWARD]  14       127.0.0.1 40124       10.0.2.15  8080     0     0\r\n"
    )
    assert host_forwards(text) == {22: 40123, 8080: 40124}
    assert host_forwards("") == {}


def test_a_guest_that_never_reports_a_killed_command_fails_at_its_deadline(
    channel_with: MakeChannel,
) -> None:
    stop = threading.Event()

    def peer(sock: socket.socket) -> None:
        stop.wait(5)  # reads nothing, answers nothing: a stopped VM

    ch, _t = channel_with(peer)
    started = time.monotonic()
    with pytest.raises(ChannelError, match=r"VM t: command \['sleep', '9'\] got no answer"):
        ch.exec(["sleep", "9"], stdin=None, env=None, cwd=None, timeout_s=0.2, answer_s=0.2)
    stop.set()
    assert time.monotonic() - started < 2.0  # 0.2 s, then 0.2 s for the kill's answer
    assert ch.broken


def test_a_guest_that_stops_reading_a_put_fails_it_at_its_deadline(
    channel_with: MakeChannel, tmp_path: Path
) -> None:
    stop = threading.Event()

    def peer(sock: socket.socket) -> None:
        read_frame(sock)  # the PUT, then nothing more is read
        stop.wait(5)

    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 << 20))  # more than the socket buffers hold
    ch, _t = channel_with(peer)
    started = time.monotonic()
    with pytest.raises(ChannelError, match=re.escape(f"VM t: put of {big} to /x got no answer")):
        ch.put(big, "/x", 0o644, time.monotonic() + 0.5)
    stop.set()
    assert time.monotonic() - started < 2.0
    assert ch.broken


def test_an_operation_that_runs_out_of_time_says_why_the_vm_may_be_silent() -> None:
    host, guest = socket.socketpair()
    try:
        ch = AgentChannel(host, name="t", explain=lambda: "its QEMU process is stopped")
        said = r"got no answer within .*; its QEMU process is stopped"
        with pytest.raises(ChannelError, match=said):
            ch.sync(0.2)
    finally:
        host.close()
        guest.close()


def test_a_protocol_3_agent_is_woken_in_one_exchange(channel_with: MakeChannel) -> None:
    got: list[tuple[int, bytes]] = []

    def peer(sock: socket.socket) -> None:
        _kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + b"vmlease-agent 3"))
        got.append(read_frame(sock))
        sock.sendall(frame(proto.OK))

    ch, t = channel_with(peer)
    ch.handshake(5.0)
    before = time.time()
    ch.wake_as("vm-7", "k1", 5.0)
    t.join()
    [(kind, payload)] = got
    assert kind == proto.WAKE
    seconds, _nanos, seed_len = struct.unpack_from(">QII", payload)
    assert abs(seconds - before) <= 1
    assert seed_len == 64
    rest = payload[16 + seed_len :]
    (name_len,) = struct.unpack_from(">I", rest)
    assert rest[4 : 4 + name_len] == b"vm-7"
    assert rest[4 + name_len :] == b"vmlease: guest vm-7 up, started from booted state k1\n"


def test_requests_sent_with_the_wake_go_in_its_exchange_and_get_their_answers(
    channel_with: MakeChannel,
) -> None:
    got: list[int] = []

    def peer(sock: socket.socket) -> None:
        _kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + b"vmlease-agent 4"))
        # Both arrive before either is answered: one round trip.
        got.extend(read_frame(sock)[0] for _ in range(3))
        sock.sendall(frame(proto.OK) + frame(proto.OK) + frame(proto.ERR, b"no such device"))
        got.append(read_frame(sock)[0])
        sock.sendall(frame(proto.OK))

    ch, t = channel_with(peer)
    ch.handshake(5.0)
    also = [(proto.NET, b"one"), (proto.NET, b"two")]
    assert ch.wake_as("vm-7", "k1", 5.0, also=also) == [None, "no such device"]
    ch.sync(5.0)  # the channel is in step: the sync's answer is its own
    t.join()
    assert got == [proto.WAKE, proto.NET, proto.NET, proto.SYNC]


def test_an_older_agent_is_woken_by_its_clock_and_a_command(channel_with: MakeChannel) -> None:
    kinds: list[int] = []

    def peer(sock: socket.socket) -> None:
        kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + b"vmlease-agent 2"))
        kind, _ = read_frame(sock)
        kinds.append(kind)
        sock.sendall(frame(proto.OK))
        kind, _ = read_frame(sock)
        kinds.append(kind)
        sock.sendall(frame(proto.EXIT, struct.pack(">iB", 0, 0)))

    ch, t = channel_with(peer)
    ch.handshake(5.0)
    # Nothing else goes with the wake-up: NET is left to the caller.
    assert ch.wake_as("vm-7", "k1", 5.0, also=[(proto.NET, b"x")]) == []
    t.join()
    assert kinds == [proto.SETTIME, proto.EXEC]


def test_an_agent_that_refuses_to_wake_is_a_channel_error(channel_with: MakeChannel) -> None:
    def peer(sock: socket.socket) -> None:
        _kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + b"vmlease-agent 3"))
        read_frame(sock)
        sock.sendall(frame(proto.ERR, b"sethostname: Operation not permitted"))

    ch, t = channel_with(peer)
    ch.handshake(5.0)
    with pytest.raises(ChannelError, match="sethostname"):
        ch.wake_as("vm-7", "k1", 5.0)
    t.join()


def test_a_channel_the_vm_closed_says_so_whether_a_send_or_a_read_finds_out(
    channel_with: MakeChannel,
) -> None:
    def peer(sock: socket.socket) -> None:
        _kind, nonce = read_frame(sock)
        sock.sendall(frame(proto.HELLO, nonce + b"vmlease-agent 3"))
        sock.close()

    ch, t = channel_with(peer)
    ch.handshake(5.0)
    t.join()
    with pytest.raises(ChannelError, match="the VM closed the channel"):
        ch.exec(["true"], stdin=b"x" * (1 << 22), env=None, cwd=None, timeout_s=5.0)
