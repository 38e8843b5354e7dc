"""Host side of the guest agent channel (see ``images/agent.c`` for the protocol).

One channel per VM, one operation at a time (callers hold a lock). Sending
and receiving run in one ``select`` loop, so a command can read a large stdin
while its output streams back without either side blocking the other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from vmlease._errors import BootError, ChannelError, GuestFileError
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import ExecResult

__all__ = [
    "AGENT_PORT",
    "BASE_ENV",
    "OPEN_TIMEOUT_S",
    "VISITOR_PORT",
    "AgentChannel",
    "AgentOperations",
]

#: The virtio-serial port the owning session reaches the guest agent on, by name.
AGENT_PORT = "org.vmlease.agent"
#: The port other processes (``vmlease exec``, connectors) reach it on, beside the owner.
#: No longer than the owner's: libvirt puts the name in a socket path (at most 107 bytes)
#: under the user's home.
VISITOR_PORT = "org.vmlease.visit"

(HELLO, EXEC, STDIN, STDOUT, STDERR, EXIT, KILL, PUT, DATA, GET, OK, ERR, SYNC) = range(1, 14)
SETTIME, WAKE, NET = range(14, 17)
#: The first agent protocol that understands WAKE.
_WAKE_SINCE = 3
_HEADER = struct.Struct(">BI")
_CHUNK = 256 * 1024
#: The environment every command starts from, as a root login's would: dpkg, for
#: one, refuses to run without PATH. A command's own ``env`` is laid over it.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
#: How long opening and greeting a channel may take, at most.
OPEN_TIMEOUT_S = 10.0
#: How long a conversation may be silent before ``watch`` is asked why.
WATCH_EVERY_S = 1.0


def _why(exc: OSError) -> str:
    """What a socket error on the channel means: the far end closing it (a broken
    pipe, a reset connection) is said as such."""
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        return f"the VM closed the channel ({exc.strerror})"
    return str(exc)


def _protocol(version: str) -> int:
    """The protocol number in an agent's HELLO answer ("vmlease-agent 3"); 1 if none."""
    last = version.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 1


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def _strings(items: Sequence[str]) -> bytes:
    out = [struct.pack(">I", len(items))]
    for item in items:
        raw = item.encode()
        out.append(struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


class AgentChannel:
    """A connection to one VM's agent.

    Args:
        sock: a connected stream socket to the VM's agent port.
        name: the VM name, for messages.
        abort_fd: a file descriptor that becomes readable when the VM's
            process ends (a pidfd), so a dead VM fails every wait at once.
        watch: called when a conversation has been silent for
            ``WATCH_EVERY_S``; it raises if the VM cannot answer (QEMU paused it
            on a host I/O error, say). The channel is then broken.
        explain: why the VM may be silent (``"its QEMU process is stopped"``),
            or ""; added to the error of an operation that ran out of time.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        abort_fd: int | None = None,
        watch: Callable[[], None] | None = None,
        explain: Callable[[], str] | None = None,
    ) -> None:
        self._sock = sock
        self._explain = explain
        self._sock.setblocking(False)
        self._name = name
        self._abort_fd = abort_fd
        self._watch = watch
        self._buf = bytearray()
        self._broken: str | None = None
        #: The last operation ran out of time (the VM may be alive, but silent).
        self.late = False
        #: The agent's protocol, known once greeted (``handshake``).
        self.protocol = 1

    def close(self) -> None:
        self._sock.close()

    @property
    def broken(self) -> bool:
        return self._broken is not None

    # -- low level -------------------------------------------------------

    def _fail(self, why: str) -> ChannelError:
        self._broken = why
        return ChannelError(f"command channel to VM {self._name} broke: {why}")

    def _wait(self, deadline: float | None, want_write: bool) -> tuple[bool, bool]:
        """Wait until readable/writable; returns (readable, writable). Raises on abort."""
        rlist: list[int | socket.socket] = [self._sock]
        if self._abort_fd is not None:
            rlist.append(self._abort_fd)
        wlist = [self._sock] if want_write else []
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._watch is not None:
            timeout = WATCH_EVERY_S if timeout is None else min(timeout, WATCH_EVERY_S)
        r, w, _ = select.select(rlist, wlist, [], timeout)
        if self._abort_fd is not None and self._abort_fd in r:
            raise self._fail("the VM's qemu process has exited")
        return self._sock in r, self._sock in w

    def _recv(self) -> None:
        try:
            data = self._sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._fail(_why(exc)) from exc
        if not data:
            raise self._fail("the VM closed the channel")
        self._buf += data

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            end = _HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            yield kind, payload

    def _late(self, what: str, limit: float | None) -> ChannelError:
        """The error of ``what`` that ran out of its ``limit``; the channel is broken."""
        why = self._explain() if self._explain is not None else ""
        within = f" within {limit:g} s" if limit is not None else " in time"
        self._broken = f"{what}: no answer{within}"
        self.late = True
        return ChannelError(
            f"VM {self._name}: {what} got no answer{within}{f'; {why}' if why else ''}"
        )

    def _converse(
        self,
        outgoing: Iterable[bytes],
        handle: Callable[[int, bytes], bool],
        deadline: float | None,
        on_deadline: Callable[[], bytes] | None = None,
        *,
        what: str,
        answer_s: float = DEFAULT.answer_s,
    ) -> bool:
        """Send ``outgoing`` while handing received frames to ``handle`` until it returns True.

        At ``deadline``, ``on_deadline`` (if given) supplies bytes to send and
        the conversation gets ``answer_s`` more; without it, or after that,
        ChannelError naming ``what``. Returns True if the deadline passed.
        """
        limit = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._broken:
            raise ChannelError(f"command channel to VM {self._name} is broken: {self._broken}")
        source = iter(outgoing)
        pending = bytearray()
        cut = False  # part of pending's first frame has gone out
        expired = False
        quiet_since = time.monotonic()
        while True:
            if not pending:
                pending += next(source, b"")
            readable, writable = self._wait(deadline, want_write=bool(pending))
            if readable or writable:
                quiet_since = time.monotonic()
            elif self._watch is not None and time.monotonic() - quiet_since >= WATCH_EVERY_S:
                quiet_since = time.monotonic()
                try:
                    self._watch()
                except BaseException as exc:
                    self._broken = f"{exc}"
                    raise
            if writable and pending:
                try:
                    sent = self._sock.send(pending)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._fail(_why(exc)) from exc
                del pending[:sent]
                cut = bool(pending) and (cut or sent > 0)
            if readable:
                self._recv()
                for kind, payload in self._frames():
                    if handle(kind, payload):
                        if cut:
                            self._finish_frame(pending, answer_s)
                        return expired
            if deadline is not None and time.monotonic() >= deadline and not (readable or writable):
                if expired or on_deadline is None:
                    raise self._late(what, limit if not expired else (limit or 0.0) + answer_s)
                expired = True
                pending += on_deadline()
                deadline = time.monotonic() + answer_s

    def _finish_frame(self, pending: bytearray, within_s: float) -> None:
        """Send the rest of a frame cut short by the answer (a command that
        exited before reading all its input): the agent reads frames whole, so
        the next request must start on a frame boundary."""
        deadline = time.monotonic() + within_s
        while pending:
            _, writable = self._wait(deadline, want_write=True)
            if writable:
                try:
                    del pending[: self._sock.send(pending)]
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise self._fail(_why(exc)) from exc
            elif time.monotonic() >= deadline:
                raise self._fail("the VM stopped reading in the middle of a request")

    # -- operations ------------------------------------------------------

    def handshake(self, timeout_s: float) -> str:
        """Say HELLO and wait for the agent's answer; returns its version string.

        Anything received before the answer (left over from an earlier
        connection) is skipped: the answer is found by its random nonce.
        """
        nonce = secrets.token_bytes(16)
        self._buf.clear()
        deadline = time.monotonic() + timeout_s
        out = [_frame(HELLO, nonce)]
        sent = False
        while True:
            try:
                readable, writable = self._wait(deadline, want_write=not sent)
            except ChannelError as exc:
                raise BootError(f"VM {self._name} stopped before it was ready: {exc}") from exc
            if writable and not sent:
                try:
                    self._sock.sendall(out[0])
                except OSError as exc:
                    raise BootError(f"VM {self._name} closed its channel while booting") from exc
                sent = True
            if readable:
                try:
                    self._recv()
                except ChannelError as exc:
                    raise BootError(f"VM {self._name} closed its channel while booting") from exc
                at = self._buf.find(nonce)
                if at >= _HEADER.size:
                    start = at - _HEADER.size
                    kind, length = _HEADER.unpack_from(self._buf, start)
                    end = start + _HEADER.size + length
                    if kind == HELLO and len(self._buf) >= end:
                        version = bytes(self._buf[at + len(nonce) : end]).decode(errors="replace")
                        del self._buf[:end]
                        self._broken = None
                        self.protocol = _protocol(version)
                        return version
            if time.monotonic() >= deadline:
                why = self._explain() if self._explain is not None else ""
                raise BootError(
                    f"VM {self._name} did not answer on its command channel within "
                    f"{timeout_s:g} s{f'; {why}' if why else ''}"
                )

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout_s: float | None,
        answer_s: float = DEFAULT.answer_s,
    ) -> ExecResult:
        """Run ``argv`` as root with ``BASE_ENV`` and ``env`` over it; killed at
        ``timeout_s``, after which the guest has ``answer_s`` to say so before the
        channel counts as dead."""
        env_items = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
        cwd_raw = (cwd or "").encode()
        request = _strings(argv) + _strings(env_items) + struct.pack(">I", len(cwd_raw)) + cwd_raw

        def outgoing() -> Iterator[bytes]:
            yield _frame(EXEC, request)
            data = stdin or b""
            for i in range(0, len(data), _CHUNK):
                yield _frame(STDIN, data[i : i + _CHUNK])
            yield _frame(STDIN)

        out: list[bytes] = []
        err: list[bytes] = []
        code: list[int] = []

        def handle(kind: int, payload: bytes) -> bool:
            if kind == STDOUT:
                out.append(payload)
            elif kind == STDERR:
                err.append(payload)
            elif kind == EXIT:
                (status,) = struct.unpack_from(">i", payload)
                if len(payload) > 5:
                    err.append(payload[5:])
                code.append(status)
                return True
            return False

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        timed_out = self._converse(
            outgoing(),
            handle,
            deadline,
            on_deadline=lambda: _frame(KILL, struct.pack(">I", 9)),
            what=f"command {list(argv)}",
            answer_s=answer_s,
        )
        return ExecResult(code[0], b"".join(out), b"".join(err), timed_out=timed_out)

    def put(self, local: Path, remote: str, mode: int, deadline: float | None = None) -> None:
        """Copy ``local`` to ``remote`` (mode ``mode``), done by ``deadline``."""

        def outgoing() -> Iterator[bytes]:
            yield _frame(PUT, struct.pack(">I", mode) + remote.encode())
            with local.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield _frame(DATA, chunk)
            yield _frame(DATA)

        error: list[str] = []

        def handle(kind: int, payload: bytes) -> bool:
            if kind == ERR:
                error.append(payload.decode(errors="replace"))
            return kind in (OK, ERR)

        self._converse(outgoing(), handle, deadline, what=f"put of {local} to {remote}")
        if error:
            raise GuestFileError(f"VM {self._name}: {error[0]}")

    def get(self, remote: str, local: Path, deadline: float | None = None) -> None:
        """Copy ``remote`` to ``local`` (replaced only once it is whole), done by ``deadline``."""
        error: list[str] = []
        tmp = local.with_name(f".{local.name}.vmlease-part")
        with tmp.open("wb") as f:

            def handle(kind: int, payload: bytes) -> bool:
                if kind == DATA:
                    if not payload:
                        return True
                    f.write(payload)
                    return False
                if kind == ERR:
                    error.append(payload.decode(errors="replace"))
                    return True
                return False

            try:
                request = [_frame(GET, remote.encode())]
                self._converse(request, handle, deadline, what=f"get of {remote} to {local}")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if error:
            tmp.unlink(missing_ok=True)
            raise GuestFileError(f"VM {self._name}: {error[0]}")
        tmp.replace(local)

    def come_up(self, ready: Sequence[str], deadline: float) -> None:
        """Run an image's command that says a full system is up (systemd, sshd);
        BootError saying how it failed."""
        done = self.exec(
            ready, stdin=None, env=None, cwd=None, timeout_s=max(1.0, deadline - time.monotonic())
        )
        if done.exit_code != 0:
            raise BootError(
                f"VM {self._name} answered but did not come up: {list(ready)} "
                f"{'ran out of time' if done.timed_out else f'exited {done.exit_code}'}"
                f": {(done.stdout + done.stderr).decode(errors='replace')[-1500:]}"
            )

    def set_time(self, when_s: float, timeout_s: float, *, seed: bytes = b"") -> None:
        """Set the guest's wall clock to ``when_s`` (seconds since the epoch).

        With ``seed`` (up to 64 bytes), the guest also credits those bytes
        to its entropy pool and reseeds its random generator, which is
        otherwise where the snapshot left it. An agent older than the seed
        ignores it and only sets the clock.
        """
        seconds = int(when_s)
        nanos = int((when_s - seconds) * 1e9)
        payload = struct.pack(">QI", seconds, nanos) + seed[:64]
        self.request(SETTIME, payload, timeout_s, what="setting the clock")

    def request(self, kind: int, payload: bytes, timeout_s: float, *, what: str) -> None:
        """Send one request the agent answers OK or ERR; ChannelError on ERR."""
        (error,) = self.requests([(kind, payload)], timeout_s, what=what)
        if error is not None:
            raise ChannelError(f"VM {self._name}: {error}")

    def requests(
        self, frames: Sequence[tuple[int, bytes]], timeout_s: float, *, what: str
    ) -> list[str | None]:
        """Send requests the agent answers OK or ERR, all at once (one round trip);
        their answers in order: None for OK, the agent's message for ERR."""
        answers: list[str | None] = []

        def handle(kind: int, body: bytes) -> bool:
            if kind in (OK, ERR):
                answers.append(body.decode(errors="replace") if kind == ERR else None)
            return len(answers) == len(frames)

        deadline = time.monotonic() + timeout_s
        outgoing = b"".join(_frame(kind, payload) for kind, payload in frames)
        self._converse([outgoing], handle, deadline, what=what)
        return answers

    def wake_as(
        self, name: str, state: str, timeout_s: float, *, also: Sequence[tuple[int, bytes]] = ()
    ) -> list[str | None]:
        """After a start from the saved booted state ``state``: today's time, fresh
        randomness and VM ``name``'s own hostname (the guest carries the name of
        the VM it was saved from), and a console line saying so.

        An agent of protocol 3 does it all in one exchange (WAKE), starting no
        process: the first process a guest starts after a start from a state
        is slow, since the emulator has translated none of its code yet. The
        requests ``also`` (of protocol 3 or later) go in the same exchange;
        returns their answers (see ``requests``), or none where the agent is
        older and they were not sent.
        """
        line = f"vmlease: guest {name} up, started from booted state {state}\n"
        if self.protocol >= _WAKE_SINCE:
            when = time.time()
            seed, host = os.urandom(64), name.encode()
            payload = (
                struct.pack(">QII", int(when), int((when % 1) * 1e9), len(seed))
                + seed
                + struct.pack(">I", len(host))
                + host
                + line.encode()
            )
            woke, *answers = self.requests(
                [(WAKE, payload), *also], timeout_s, what="waking the guest"
            )
            if woke is not None:
                raise ChannelError(f"VM {self._name}: {woke}")
            return answers
        self.set_time(time.time(), timeout_s, seed=os.urandom(64))
        script = (
            'hostname "$1" && echo "vmlease: guest $1 up, '
            'started from booted state $2" >/dev/console'
        )
        done = self.exec(
            ["sh", "-c", script, "sh", name, state],
            stdin=None,
            env=None,
            cwd=None,
            timeout_s=timeout_s,
        )
        if done.exit_code != 0:
            raise ChannelError(f"naming the guest failed: {done.stderr!r}")
        return []

    def sync(self, timeout_s: float) -> None:
        """Ask the guest to flush its file systems to disk."""
        self._converse(
            [_frame(SYNC)],
            lambda kind, _p: kind in (OK, ERR),
            time.monotonic() + timeout_s,
            what="sync",
        )


class AgentOperations:
    """``exec``, ``put`` and ``get`` through the guest agent, for a backend that
    mixes this in and gives ``_agent(name, timeout_s)``: VM ``name``'s channel,
    opened within ``timeout_s`` and held for one operation. Each operation
    ends by its deadline, the channel's opening included."""

    def _agent(self, name: str, timeout_s: float) -> AbstractContextManager[AgentChannel]:
        raise NotImplementedError

    @contextmanager
    def _for(self, name: str, what: str, deadline: float | None) -> Iterator[AgentChannel]:
        """VM ``name``'s channel for ``what``, opened by ``deadline``; a channel that
        cannot be opened is a ChannelError naming the operation."""
        limit = OPEN_TIMEOUT_S if deadline is None else _opening(deadline)
        with contextlib.ExitStack() as stack:
            try:
                channel = stack.enter_context(self._agent(name, limit))
            except BootError as exc:
                raise ChannelError(f"VM {name}: {what}: {exc}") from exc
            yield channel

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: bytes | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout_s: float | None,
    ) -> ExecResult:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._for(name, f"command {list(argv)}", deadline) as channel:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return channel.exec(argv, stdin=stdin, env=env, cwd=cwd, timeout_s=left)

    def put(
        self, name: str, local: Path, remote: str, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with self._for(name, f"put of {local} to {remote}", deadline) as channel:
            channel.put(local, remote, local.stat().st_mode & 0o7777, deadline)

    def get(
        self, name: str, remote: str, local: Path, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with self._for(name, f"get of {remote} to {local}", deadline) as channel:
            channel.get(remote, local, deadline)


def _opening(deadline: float) -> float:
    """How long opening a channel may take of what is left until ``deadline``."""
    return max(0.1, min(OPEN_TIMEOUT_S, deadline - time.monotonic()))
