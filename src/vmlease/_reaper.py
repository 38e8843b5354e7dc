"""The reaper: a small detached process that deletes the VMs of owners that died.

One reaper serves every session that uses a state directory. A session
connects to ``<state>/reaper.sock``, registers its owner identity and waits
for the acknowledgement before it creates anything. When that connection
closes, or the owner's pid (with its start time) is no longer alive, the
reaper deletes the owner's VMs through their backends and records it in the
ledger. It also sweeps, at start and every 30 s (``$VMLEASE_REAPER_SWEEP_S``),
for VMs past their lease, such as those of a hung owner. It exits once nobody
has been registered for ``idle_exit_s`` (5 s, or ``$VMLEASE_REAPER_IDLE_S``).

Starting is race-free: ``<state>/reaper.lock`` is held (``flock``) by the one
serving reaper for as long as it runs, so of several reapers started at once
all but one exit; the kernel frees the lock of a reaper that died. A spawning
session waits until the new reaper reports that it listens (or that another
one does) before it connects.

Protocol: one JSON object per line. Session: ``{"op": "register", "owner":
{...}}``; reaper: ``{"ok": true, "pid": N}``. Then the session says nothing
more, except ``{"op": "bye"}`` before an orderly close.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vmlease._cleanup import Outcome, delete_records, find_reapable
from vmlease._errors import ReaperUnavailable, VMLeaseError
from vmlease._identity import Liveness, Owner, liveness
from vmlease._ledger import Ledger, VMState
from vmlease._unix import connect_unix
from vmlease.backends import Backends

__all__ = ["ReaperLink", "serve", "spawn_reaper"]

SOCKET = "reaper.sock"
LOCK = "reaper.lock"
LOG = "reaper.log"
IDLE_EXIT_S = 5.0
TICK_S = 0.5
SWEEP_EVERY_S = 30.0
REGISTER_TIMEOUT_S = 15.0


log = logging.getLogger("vmlease.reaper")


def _log_to_file(state_dir: Path) -> None:
    """In the reaper's own process: its records go to ``<state>/reaper.log``."""
    handler = logging.FileHandler(state_dir / LOG)
    handler.setFormatter(
        logging.Formatter("%(asctime)s reaper[%(process)d] %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _log_outcomes(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        log.info("%s %s (%s)%s", o.action, o.name, o.why, f": {o.error}" if o.error else "")


def _seconds_setting(variable: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default``."""
    try:
        value = float(os.environ.get(variable, default))
    except ValueError:
        return default
    return value if value > 0 else default


# -- the server --------------------------------------------------------------


class _Server:
    def __init__(self, state_dir: Path, idle_exit_s: float) -> None:
        self.state_dir = state_dir
        self.idle_exit_s = idle_exit_s
        self.sweep_every_s = _seconds_setting("VMLEASE_REAPER_SWEEP_S", SWEEP_EVERY_S)
        self.ledger = Ledger(state_dir / "ledger.sqlite3")
        self.backends = Backends(state_dir)
        self.sel = selectors.DefaultSelector()
        self.owners: dict[socket.socket, Owner | None] = {}
        self.buffers: dict[socket.socket, bytes] = {}
        self.idle_since = time.monotonic()

    def reap(self, owner: Owner, why: str) -> None:
        rows = [
            (r, why)
            for r in self.ledger.records(session_id=owner.session_id)
            if r.owner.pid == owner.pid
            and r.owner.start_time == owner.start_time
            and r.state is not VMState.KEPT
        ]
        if not rows:
            return
        _log_outcomes(
            delete_records(
                self.ledger,
                rows,
                self.backends,
                reason=f"reaped: owner pid {owner.pid} {why}",
                take_over=True,  # the owner may have died halfway through deleting
            )
        )

    def drop(self, conn: socket.socket, why: str) -> None:
        owner = self.owners.pop(conn, None)
        self.buffers.pop(conn, None)
        self.sel.unregister(conn)
        conn.close()
        if owner is not None:
            self.reap(owner, why)
        if not self.owners:
            self.idle_since = time.monotonic()

    def on_message(self, conn: socket.socket, line: bytes) -> None:
        try:
            msg = json.loads(line)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            self.drop(conn, "sent garbage")
            return
        if op == "register":
            try:
                owner = Owner(**msg["owner"])
            except (KeyError, TypeError):
                self.drop(conn, "sent a bad registration")
                return
            self.owners[conn] = owner
            conn.sendall(json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\n")
            log.info("registered pid %d (session %s)", owner.pid, owner.session_id)
        elif op == "bye":
            self.drop(conn, "closed its session")

    def on_readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.drop(conn, "ended")
            return
        buf = self.buffers.get(conn, b"") + data
        *lines, rest = buf.split(b"\n")
        self.buffers[conn] = rest
        for line in lines:
            if conn not in self.owners:
                break  # dropped by an earlier line
            self.on_message(conn, line)

    def check_owners(self) -> None:
        for conn, owner in list(self.owners.items()):
            if owner is not None and liveness(owner) is Liveness.DEAD:
                self.drop(conn, "is no longer alive")

    def run(self, listener: socket.socket) -> None:
        self.sel.register(listener, selectors.EVENT_READ)
        # Owners that died while no reaper ran are handled right away.
        self.sweep()
        next_sweep = time.monotonic() + self.sweep_every_s
        while True:
            for key, _ in self.sel.select(TICK_S):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    self.owners[conn] = None
                    self.buffers[conn] = b""
                    self.sel.register(conn, selectors.EVENT_READ)
                else:
                    assert isinstance(key.fileobj, socket.socket)
                    self.on_readable(key.fileobj)
            self.check_owners()
            if time.monotonic() >= next_sweep:
                self.sweep()  # leases that expired under a hung but living owner
                next_sweep = time.monotonic() + self.sweep_every_s
            if not self.owners and time.monotonic() - self.idle_since >= self.idle_exit_s:
                return

    def sweep(self) -> None:
        rows = [(r, s.value) for r, s in find_reapable(self.ledger)]
        if rows:
            _log_outcomes(
                delete_records(self.ledger, rows, self.backends, reason="swept by the reaper")
            )


def serve(state_dir: Path, *, idle_exit_s: float = IDLE_EXIT_S, ready: int | None = None) -> int:
    """Run the reaper for ``state_dir`` until it is idle; 0 also if another one serves.

    ``ready`` is a pipe to write one line to once it listens (or knows
    another reaper does), for the process that started it.
    """

    def tell(word: str) -> None:
        if ready is not None:
            with contextlib.suppress(OSError):
                os.write(ready, word.encode() + b"\n")
                os.close(ready)

    os.chdir(state_dir)  # bind a short relative name: socket paths are limited to 107 bytes
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        tell("another")
        return 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        Path(SOCKET).unlink(missing_ok=True)  # a dead reaper's: we hold the lock
        listener.bind(SOCKET)
        Path(SOCKET).chmod(0o600)
        listener.listen(128)
        tell("listening")
        log.info("started")
        server = _Server(state_dir, idle_exit_s)
        try:
            server.run(listener)
        finally:
            # Stop accepting before giving up the lock: a session that connects
            # now gets no acknowledgement and starts the next reaper.
            Path(SOCKET).unlink(missing_ok=True)
            listener.close()
            # Only an idle reaper returns normally; after a crash the sessions
            # still connected are alive and will register with the next one.
            for conn in list(server.owners):
                conn.close()
            server.backends.close()
            server.ledger.close()
            log.info("idle, exiting")
    finally:
        listener.close()
        os.close(lock)
    return 0


# -- starting it ---------------------------------------------------------------


def _reaper_env() -> dict[str, str]:
    """The environment for the reaper: this process's, with vmlease importable."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def spawn_reaper(state_dir: Path) -> None:
    """Start a detached reaper for ``state_dir`` and wait until it (or another) listens."""
    done = subprocess.run(
        [sys.executable, "-m", "vmlease._reaper", "--state-dir", str(state_dir), "--detach"],
        env=_reaper_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=REGISTER_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or done.stdout.strip() not in ("listening", "another"):
        raise ReaperUnavailable(
            f"the reaper for {state_dir} did not start: "
            f"{(done.stderr or done.stdout).strip()[-500:] or 'no reason given'}"
        )


def _detach_and_serve(state_dir: Path, idle_exit_s: float) -> int:
    """Fork a reaper that outlives us; print what it reported once it is up."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reaper
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(state_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, w)
        os.closerange(w + 1, 1 << 16)
        try:
            _log_to_file(state_dir)
            code = serve(state_dir, idle_exit_s=idle_exit_s, ready=w)
        except BaseException:  # the reaper's last word goes to its log
            log.exception("crashed")
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        word = f.readline().strip()
    print(word or "failed")
    return 0 if word else 1


# -- the session's side ------------------------------------------------------------


class ReaperLink:
    """A session's registration with the reaper of its state directory.

    Once registered, a watcher thread waits on the connection. The reaper
    never speaks after its acknowledgement, so the connection ending means
    the reaper is gone (killed, say, by the OOM killer): the watcher at once
    registers the owner with a new reaper, which it starts. If none can be
    had, :attr:`registered` turns False, the session's next create is
    refused, and its live VMs are still deleted when it ends.

    Args:
        state_dir: the state directory.
        spawn: starts a reaper (injected for tests); default spawn_reaper.
        timeout_s: how long registering may take, spawning included.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        spawn: Callable[[Path], None] = spawn_reaper,
        timeout_s: float = REGISTER_TIMEOUT_S,
    ) -> None:
        self.state_dir = state_dir
        self._spawn = spawn
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._owner: Owner | None = None
        self._watcher: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1
        self.reaper_pid: int | None = None
        #: How many times the reaper went away under this session, and how many
        #: times a new one took the registration over.
        self.lost = 0
        self.replaced = 0

    @property
    def registered(self) -> bool:
        """True while a reaper holds our registration."""
        with self._lock:
            return self._sock is not None

    def _try_register(self, owner: Owner) -> socket.socket | None:
        try:
            sock = connect_unix(self.state_dir / SOCKET, 2.0)
        except OSError:
            return None
        try:
            sock.settimeout(5.0)
            sock.sendall(json.dumps({"op": "register", "owner": asdict(owner)}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("the reaper closed the connection")
                reply += chunk
            answer = json.loads(reply)
            if not answer.get("ok"):
                raise OSError(f"the reaper refused: {answer}")
        except (OSError, ValueError):
            sock.close()
            return None
        sock.settimeout(None)
        self.reaper_pid = int(answer.get("pid", 0))
        return sock

    def _connect(self, owner: Owner) -> socket.socket:
        """A registered connection to a reaper, starting one if none runs."""
        deadline = time.monotonic() + self._timeout_s
        last_error = "no reaper answered"
        while time.monotonic() < deadline:
            sock = self._try_register(owner)
            if sock is not None:
                return sock
            try:
                self._spawn(self.state_dir)
            except (VMLeaseError, OSError, subprocess.SubprocessError) as exc:
                last_error = str(exc)
                time.sleep(0.1)
        raise ReaperUnavailable(
            f"no reaper acknowledged this session within {self._timeout_s:g} s ({last_error}); "
            f"vmlease creates no VM that nothing would delete if this process died. "
            f"See {self.state_dir / LOG}"
        )

    def register(self, owner: Owner) -> None:
        """Register ``owner`` and wait for the acknowledgement; start a reaper if none runs.

        Raises ReaperUnavailable if no reaper acknowledges within the timeout.
        """
        with self._lock:
            self._owner = owner
            if self._sock is not None:
                return
            self._sock = self._connect(owner)
            if self._watcher is None or not self._watcher.is_alive():
                self._stop_r, self._stop_w = os.pipe()
                self._watcher = threading.Thread(
                    target=self._watch, name="vmlease-reaper-watch", daemon=True
                )
                self._watcher.start()

    def _watch(self) -> None:
        """Wait for the connection to end; then hand the registration to a new reaper."""
        stop = self._stop_r
        while True:
            with self._lock:
                sock = self._sock
            if sock is None:
                return
            try:
                readable, _, _ = select.select([sock.fileno(), stop], [], [])
            except (OSError, ValueError):
                return  # closed under us: close() is under way
            if stop in readable:
                return
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                continue  # nothing is expected; ignore it
            with self._lock:
                if self._sock is not sock:
                    return
                sock.close()
                self._sock = None
                self.lost += 1
                owner = self._owner
                log.warning(
                    "the reaper (pid %s) went away; registering with a new one", self.reaper_pid
                )
                if owner is None:
                    return
                try:
                    self._sock = self._connect(owner)
                except ReaperUnavailable as exc:
                    log.error("%s; this session's next create will be refused", exc)
                    return
                self.replaced += 1
                log.warning("a new reaper (pid %s) holds this session", self.reaper_pid)

    def close(self) -> None:
        """Say goodbye (the session deleted its VMs) and disconnect."""
        with self._lock:
            sock, self._sock = self._sock, None
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                with contextlib.suppress(OSError):
                    os.write(self._stop_w, b"x")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(b'{"op": "bye"}\n')
                sock.close()
        if watcher is not None:
            watcher.join(timeout=5.0)
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stop_r, self._stop_w = -1, -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmlease._reaper")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--detach", action="store_true", help="fork and report when listening")
    parser.add_argument("--idle-exit", type=float, default=None)
    args = parser.parse_args(argv)
    if args.idle_exit is None:
        args.idle_exit = _seconds_setting("VMLEASE_REAPER_IDLE_S", IDLE_EXIT_S)
    if args.detach:
        return _detach_and_serve(args.state_dir, args.idle_exit)
    _log_to_file(args.state_dir)
    return serve(args.state_dir, idle_exit_s=args.idle_exit)


if __name__ == "__main__":
    sys.exit(main())
