"""A small synchronous QMP client (QEMU Machine Protocol: JSON lines over a Unix socket)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError
from vmlease._unix import connect_unix

__all__ = ["QMP", "host_forwards", "try_quit"]


class QMP:
    """One QMP connection; events are skipped, replies returned."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0) -> None:
        try:
            self._sock = connect_unix(path, timeout_s)
        except OSError as exc:
            raise BackendError(f"cannot connect to QMP at {path}: {exc}") from exc
        self._file = self._sock.makefile("rwb")
        try:
            self._read(time.monotonic() + timeout_s)  # greeting
            self.execute("qmp_capabilities", timeout_s=timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        self._sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            line = self._file.readline()
        except OSError as exc:
            raise BackendError(f"QMP read failed: {exc}") from exc
        if not line:
            raise BackendError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout_s: float = 30.0
    ) -> Any:
        """Run a QMP command and return its ``return`` value; BackendError on an error reply."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        deadline = time.monotonic() + timeout_s
        try:
            self._file.write(json.dumps(request).encode() + b"\r\n")
            self._file.flush()
        except OSError as exc:
            raise BackendError(f"QMP write failed: {exc}") from exc
        return self._reply(command, deadline)

    def _reply(self, command: str, deadline: float) -> Any:
        while True:
            msg = self._read(deadline)
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                raise BackendError(f"QMP {command} failed: {err.get('desc', err)}")
            return msg.get("return")

    def hmp(self, command: str, *, timeout_s: float = 30.0) -> str:
        """A human-monitor command's output ("" when it succeeded silently)."""
        said = self.execute("human-monitor-command", {"command-line": command}, timeout_s=timeout_s)
        return str(said or "").strip()

    def pass_fd(self, fdname: str, fd: int, *, timeout_s: float = 10.0) -> None:
        """Hand QEMU a file descriptor as ``fdname`` (``getfd``, the descriptor sent with it)."""
        request = json.dumps({"execute": "getfd", "arguments": {"fdname": fdname}}).encode()
        deadline = time.monotonic() + timeout_s
        try:
            self._file.flush()
            socket.send_fds(self._sock, [request + b"\r\n"], [fd])
        except OSError as exc:
            raise BackendError(f"QMP write failed: {exc}") from exc
        self._reply("getfd", deadline)

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_forwards(info_usernet: str) -> dict[int, int]:
    """The TCP forwards ``info usernet`` lists: guest port -> host port."""
    found = {}
    for line in info_usernet.splitlines():
        fields = line.split()
        # TCP[HOST_FORWARD]  FD  127.0.0.1  HOST-PORT  10.0.2.15  GUEST-PORT  RecvQ  SendQ
        if len(fields) >= 6 and fields[0] == "TCP[HOST_FORWARD]":
            try:
                found[int(fields[5])] = int(fields[3])
            except ValueError:
                continue
    return found


def try_quit(path: Path, timeout_s: float = 5.0) -> bool:
    """Ask the QEMU behind ``path`` to quit; False if it could not be asked."""
    try:
        with QMP(path, timeout_s=timeout_s) as qmp:
            qmp.execute("quit", timeout_s=timeout_s)
    except (TimeoutError, BackendError, OSError):
        return False
    return True
