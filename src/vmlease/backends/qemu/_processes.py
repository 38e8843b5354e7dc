"""QEMU processes: starting them, knowing them, watching them end, killing them.

A VM is a directory ``<state>/qemu/<name>/``; its QEMU runs daemonized and
writes its pid to ``qemu.pid`` there. A pid counts as the VM's only if that
process's command line names this VM's pidfile (pids are reused). Exits are
watched with a pidfd, so a VM that dies while booting or mid-command fails
a wait at once instead of at a timeout.

This process keeps one :class:`Live` handle per running VM it has talked to:
the pidfd, and the VM's agent link (``guest._channels``), whose lock
serialises this process's use of the VM. The agent has two ports, each
taking one host connection at a time (QEMU queues the next): the owner's
(``agent.sock``) and the visitors' (``visitor.sock``, after :meth:`Processes.visit`).
A link's channel is closed when idle, by the rule all QEMU-based backends
share, so that visitors take turns on theirs.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmlease._errors import BackendError, BackendTimeout, ChannelError, VMNotFound
from vmlease._procfs import cmdline, is_stopped, memory_bytes, pids_with_arg
from vmlease._runner import Runner
from vmlease._unix import connect_unix
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._channels import Channels, Link
from vmlease.backends.qemu._launch import (
    AGENT_SOCKET,
    CONSOLE_LOG,
    DISK,
    PIDFILE,
    QMP_SOCKET,
    VISITOR_SOCKET,
)
from vmlease.backends.qemu._qmp import QMP
from vmlease.backends.qemu._reach import RECORD

__all__ = ["Live", "Processes", "monitor_command"]

#: The longest ``qemu -daemonize`` may take to return (it has opened its sockets by then).
LAUNCH_TIMEOUT_S = 30.0
#: How long a broken channel waits to see whether QEMU is ending (a guest panic).
_EXIT_GRACE_S = 1.0


@dataclass
class Live:
    """This process's handles on a running VM: its process and its agent link."""

    pid: int
    pidfd: int
    link: Link = field(default_factory=Link)

    @property
    def lock(self) -> threading.Lock:
        """Held for one operation on the VM (its channel's one user at a time)."""
        return self.link.lock


def running_pid(vm_dir: Path) -> int | None:
    """The pid of the QEMU of ``vm_dir`` if it runs; a reused pid does not count."""
    try:
        pid = int((vm_dir / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    args = cmdline(pid)
    return pid if args is not None and str(vm_dir / PIDFILE).encode() in args else None


def wait_exit(live: Live, timeout_s: float) -> bool:
    """Whether the process ended within ``timeout_s``."""
    r, _, _ = select.select([live.pidfd], [], [], timeout_s)
    return bool(r)


def kill(live: Live) -> None:
    """SIGKILL the process and wait (up to 10 s) until it is gone."""
    try:
        signal.pidfd_send_signal(live.pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_exit(live, 10.0)


def kill_all(vm_dir: Path) -> int:
    """SIGKILL every QEMU of ``vm_dir`` and wait for each to end; returns how many.

    The owner may have died while QEMU was starting, with no pidfile yet, so
    every process whose command line names this VM's pidfile counts.
    """
    count = 0
    for pid in pids_with_arg(str(vm_dir / PIDFILE)):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone meanwhile
        try:
            kill(Live(pid=pid, pidfd=pidfd))
            count += 1
        finally:
            os.close(pidfd)
    return count


def last_words(vm_dir: Path, lines: int = 25) -> str:
    """The console's last lines, from the kernel's panic line when it panicked."""
    try:
        tail = (vm_dir / CONSOLE_LOG).read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    at = max((i for i, line in enumerate(tail) if "Kernel panic" in line), default=-1)
    return "\n".join(tail[at : at + lines] if at >= 0 else tail[-lines:])


def clear_runtime(vm_dir: Path) -> None:
    """Remove what a QEMU that ran leaves behind: its sockets and pidfile."""
    for leftover in (QMP_SOCKET, AGENT_SOCKET, VISITOR_SOCKET, PIDFILE):
        (vm_dir / leftover).unlink(missing_ok=True)


class Processes:
    """The running VMs under ``root`` as this process sees them.

    Args:
        root: the directory of VM directories.
        runner: runs ``qemu -daemonize`` (injected for tests).
        on_silence: ``on_silence(name)`` is called while a conversation with
            VM ``name``'s agent has been silent for a second, to raise if the
            VM cannot answer (see ``AgentChannel``).
    """

    def __init__(
        self,
        root: Path,
        runner: Runner,
        *,
        on_silence: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self._run = runner
        self._on_silence = on_silence
        self._lock = threading.Lock()
        self._live: dict[str, Live] = {}
        self._channels = Channels()
        self._socket = AGENT_SOCKET

    def visit(self) -> None:
        """Reach the agents through their visitors' port from now on, beside the
        processes that own the VMs (a VM whose machine has no such port is
        reached through its owner's, in turns)."""
        self._socket = VISITOR_SOCKET

    def dir(self, name: str) -> Path:
        return self.root / name

    def attach(self, name: str) -> Live:
        """This process's handle on running VM ``name`` (opened on first use)."""
        with self._lock:
            live = self._live.get(name)
            if live is not None:
                return live
            vm_dir = self.dir(name)
            if not (vm_dir / RECORD).exists():
                raise VMNotFound(f"the qemu backend has no VM named {name!r}")
            pid = running_pid(vm_dir)
            if pid is None:
                raise BackendError(
                    f"VM {name} is not running; if it was not stopped, its console "
                    f"({vm_dir / CONSOLE_LOG}) says why it ended"
                )
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError as exc:
                raise BackendError(f"VM {name} is not running") from exc
            self._channels.forget(name)
            live = Live(pid=pid, pidfd=pidfd, link=self._channels.link(name))
            self._live[name] = live
            return live

    def forget(self, name: str) -> None:
        """Drop this process's handle on ``name`` (the VM runs on)."""
        with self._lock:
            live = self._live.pop(name, None)
        self._channels.forget(name)
        if live is not None:
            os.close(live.pidfd)

    def channel(self, name: str, live: Live, timeout_s: float) -> AgentChannel:
        """The agent channel of a running VM, connected and greeted; caller holds ``live.lock``."""
        on_silence = self._on_silence

        def opener(limit: float) -> tuple[AgentChannel, None]:
            path = self.dir(name) / self._socket
            if not path.exists():
                path = self.dir(name) / AGENT_SOCKET
            try:
                sock = connect_unix(path, limit)
            except OSError as exc:
                raise ChannelError(
                    f"cannot connect to the command channel of VM {name}: {exc}"
                ) from exc

            def watch() -> None:
                if on_silence is not None and not is_stopped(live.pid):
                    on_silence(name)

            def explain() -> str:
                if is_stopped(live.pid):
                    return f"its QEMU process ({live.pid}) is stopped (SIGSTOP, or a debugger)"
                return ""

            channel = AgentChannel(
                sock, name=name, abort_fd=live.pidfd, watch=watch, explain=explain
            )
            return channel, None

        return self._channels.channel(live.link, opener, timeout_s)

    @contextlib.contextmanager
    def operation(self, name: str, timeout_s: float) -> Iterator[AgentChannel]:
        """The agent channel of running VM ``name``, opened within ``timeout_s`` and
        held for one operation.

        If the channel breaks because the VM ended (its QEMU was killed from
        outside, or the guest panicked and QEMU exited), the error says the
        VM is gone and shows the console's last lines.
        """
        live = self.attach(name)
        with live.lock:
            channel = self.channel(name, live, timeout_s)
            try:
                yield channel
            except ChannelError as exc:
                # A VM that ran out of time is silent, not known to be gone.
                if channel.late or is_stopped(live.pid) or not wait_exit(live, _EXIT_GRACE_S):
                    raise
                raise ChannelError(
                    f"VM {name} is gone: its QEMU process ended ({exc}); its console "
                    f"said:\n{last_words(self.dir(name))}"
                ) from exc

    def listing(self) -> list[tuple[str, int | None, dict[str, str]]]:
        """Every VM directory under the root: its name, its QEMU's pid if it runs,
        and what it costs the host (its disk overlay's blocks, QEMU's memory)."""
        if not self.root.is_dir():
            return []
        found = []
        for vm_dir in sorted(self.root.iterdir()):
            if not (vm_dir / RECORD).is_file():
                continue
            pid = running_pid(vm_dir)
            detail = {"dir": str(vm_dir)}
            with contextlib.suppress(OSError):
                detail["disk_bytes"] = str((vm_dir / DISK).stat().st_blocks * 512)
            if pid is not None:
                detail["pid"] = str(pid)
                rss = memory_bytes(pid)
                if rss is not None:
                    detail["memory_bytes"] = str(rss)
            found.append((vm_dir.name, pid, detail))
        return found

    def launch(self, name: str, argv: list[str], timeout_s: float, *, qemu: str) -> None:
        """Start the QEMU of ``name`` (``-daemonize``: it returns once its sockets are open).

        ``qemu`` is the emulator as the user named it, for the error's advice.
        """
        vm_dir = self.dir(name)
        clear_runtime(vm_dir)
        done = self._run(argv, timeout_s=min(timeout_s, LAUNCH_TIMEOUT_S), cwd=vm_dir)
        if done.returncode is None:
            raise BackendTimeout(
                f"qemu for VM {name} did not start in time: {done.stderr.strip()[-2000:]}",
                command=argv,
                stderr=done.stderr,
            )
        if done.returncode != 0:
            hint = ""
            if "unable to find CPU model" in done.stderr:
                hint = (
                    f"; VMLEASE_QEMU_CPU names a CPU model {qemu} does not know: "
                    f"`{qemu} -cpu help` lists those it does"
                )
            raise BackendError(
                f"qemu for VM {name} exited {done.returncode}: {done.stderr.strip()[-2000:]}{hint}",
                command=argv,
                exit_code=done.returncode,
                stderr=done.stderr,
            )
        self.forget(name)
        self.attach(name)

    def close(self) -> None:
        for name in list(self._live):
            self.forget(name)


def monitor_command(vm_dir: Path, command: str, timeout_s: float) -> str:
    """Run a human-monitor command in the QEMU of ``vm_dir``; its output ("" on
    success). ``loadvm`` stops the guest before it looks for the snapshot and
    does not start it again when that fails, so after a failure a stopped guest
    is resumed. BackendTimeout, naming the command, when the monitor does not
    answer within ``timeout_s`` (saying so when QEMU is stopped)."""
    deadline = time.monotonic() + timeout_s
    try:
        with QMP(vm_dir / QMP_SOCKET, timeout_s=timeout_s) as qmp:
            left = max(0.1, deadline - time.monotonic())
            text = qmp.hmp(command, timeout_s=left)
            if text and not qmp.execute("query-status", timeout_s=left).get("running"):
                qmp.execute("cont", timeout_s=left)
            return text
    except BackendError as exc:
        if not isinstance(exc.__cause__, TimeoutError):
            raise
        pid = running_pid(vm_dir)
        why = "; its QEMU process is stopped" if pid is not None and is_stopped(pid) else ""
        raise BackendTimeout(
            f"VM {vm_dir.name}: {command} got no answer from QEMU's monitor within "
            f"{timeout_s:g} s{why}"
        ) from exc
