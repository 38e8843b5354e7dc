"""VM handles: what a test does with one VM of a session.

A handle checks its arguments and the VM's state, then hands every backend
operation to the session that made it, which times it, retries it under the
session's policy when the backend calls the failure transient, and records
state changes in the ledger. What a handle needs of its session is the
:class:`VMHost` protocol, and nothing more.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from vmlease._errors import (
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestFileError,
    UnsupportedOperation,
    VMLeaseError,
    VMStateError,
)
from vmlease._ledger import VMState
from vmlease._results import CommandResult, TranscriptEntry
from vmlease._retry import RetryPolicy
from vmlease._spec import VMSpec
from vmlease._ssh import SSHInfo
from vmlease._waits import INIT_PROBE, Check, listening_probe, poll, port_number
from vmlease.backends import Backend, ExecResult

__all__ = ["UNSUPPORTED", "VM", "Capability", "CommandResult", "TranscriptEntry", "VMHost"]

T = TypeVar("T")
#: The optional operations a handle may ask about (fields of ``Capabilities``).
Capability = Literal["snapshots", "stop_start", "forwards", "ssh", "networks"]
#: What a backend without a capability cannot do, and what to do instead.
UNSUPPORTED: dict[Capability, str] = {
    "snapshots": "cannot take or restore snapshots; use a fresh VM per test instead",
    "stop_start": "cannot stop and start a VM; delete it and create another instead",
    "forwards": "cannot forward ports; reach the VM through vm.run instead",
    "ssh": "cannot reach VMs with SSH; reach them through vm.run instead",
    "networks": "has no private networks; reach other VMs through their forwards instead",
}

DEFAULT_STOP_TIMEOUT_S = 30.0
#: How long the waits wait unless told otherwise, in seconds.
DEFAULT_WAIT_S = 60.0
#: How much of the console ``wait_for_console`` searches.
CONSOLE_SCAN_LINES = 5000
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]+")
TRANSCRIPT_LIMIT = 200
_OUTPUT_KEPT = 2000


_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_tag(tag: object) -> None:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ConfigError(
            f"invalid snapshot name {tag!r}: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _argv(argv: object) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise ConfigError(
            f"argv must be a list of strings, not the string {argv!r}; "
            f"for a shell line use ['sh', '-c', {argv!r}]"
        )
    if not isinstance(argv, Sequence) or not argv:
        raise ConfigError(f"argv must be a non-empty list of strings, not {argv!r}")
    bad = [a for a in argv if not isinstance(a, str)]
    if bad:
        raise ConfigError(f"every argument must be a string; not {bad[0]!r}")
    return tuple(argv)


class VMHost(Protocol):
    """What a VM handle needs of the session that made it (``Session`` is one).

    The methods are the session's private side: a handle calls them, nothing
    else should.
    """

    boot_timeout_s: float
    retry_policy: RetryPolicy
    state_dir: Path

    def _vm_state(self, vm: VM) -> VMState | None:
        """The VM's state in the ledger; None once the session has ended."""

    def _vm_can_reset(self, vm: VM) -> bool:
        """Whether the backend can reset the VM without a snapshot."""

    def _vm_op(
        self,
        vm: VM,
        op: str,
        fn: Callable[[Backend, float], T],
        *,
        timeout_s: float,
        fails_vm: bool = False,
    ) -> T:
        """Run ``fn(backend, limit)`` for ``vm``, timed and retried under the session's
        policy; with ``fails_vm`` a failure leaves the VM ``failed``."""

    def _vm_supports(self, capability: Capability) -> None:
        """Raise UnsupportedOperation unless the backend declares ``capability``."""

    def _vm_transition(self, vm: VM, state: VMState) -> None:
        """Record that ``vm`` is now in ``state``."""

    def _vm_note(self, vm: VM, detail: str) -> None:
        """Record an event of ``vm`` that does not change its state (a snapshot)."""

    def _vm_forwarded(self, vm: VM, guest_port: int, host_port: int) -> None:
        """Record that ``vm``'s ``guest_port`` is reachable on 127.0.0.1:``host_port``."""

    def _vm_delete(self, vm: VM) -> None:
        """Delete ``vm`` and record it."""

    def _vm_keep(self, vm: VM, why: str) -> None:
        """Hand ``vm`` over to the ledger as kept: the session no longer deletes it."""

    def _vm_console(self, vm: VM, lines: int) -> str:
        """The last ``lines`` of ``vm``'s console."""


class VM:
    """A handle on one VM of a session. Get one from :meth:`Session.create`."""

    def __init__(self, host: VMHost, ledger_id: int, name: str, spec: VMSpec) -> None:
        self._host = host
        self._ledger_id = ledger_id
        self.name = name
        self.spec = spec
        self.transcript: list[TranscriptEntry] = []
        self.last_state = VMState.INTENDED

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state.value}>"

    @property
    def ledger_id(self) -> int:
        """The VM's row in the ledger."""
        return self._ledger_id

    @property
    def state_dir(self) -> Path:
        """Its session's state directory: where other processes find it
        (``VMLEASE_STATE_DIR`` for ``vmlease exec``, ``pyinfra @vmlease/NAME``)."""
        return self._host.state_dir

    @property
    def state(self) -> VMState:
        """The VM's state as the ledger records it (the last one seen once the session ended)."""
        state = self._host._vm_state(self)
        return self.last_state if state is None else state

    def _require(self, *states: VMState) -> None:
        state = self.state
        if state in states:
            return
        if state is VMState.GONE:
            raise VMStateError(f"VM {self.name} has been deleted")
        if state is VMState.STOPPED:
            raise VMStateError(f"VM {self.name} is stopped: call start() first")
        raise VMStateError(f"VM {self.name} is {state.value}, not {' or '.join(states)}")

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        check: bool = False,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Run ``argv`` in the VM (no shell) and return what it did.

        Args:
            argv: program and arguments; for a shell line pass ``["sh", "-c", line]``.
            input: bytes (or text, encoded as UTF-8) for the command's stdin.
            check: raise CommandFailed if it exits non-zero.
            timeout_s: kill it after this many seconds and raise CommandTimeout.
            env: extra environment variables.
            cwd: working directory in the guest.
        """
        args = _argv(argv)
        if timeout_s is not None and (isinstance(timeout_s, bool) or timeout_s <= 0):
            raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        data = input.encode() if isinstance(input, str) else input
        self._require(VMState.READY)
        start = time.monotonic()
        answer_s = self._host.retry_policy.timeouts.answer_s

        def attempt(backend: Backend, limit: float) -> ExecResult:
            # The command's own limit, cut to what the session's policy has left;
            # the backend answers within it plus the guest's time to report a kill.
            command_s = None if timeout_s is None else max(0.1, limit - answer_s)
            return backend.exec(self.name, args, stdin=data, env=env, cwd=cwd, timeout_s=command_s)

        try:
            # Only a failure the backend calls transient is retried, and for
            # exec that means the command never started: it is not run twice.
            raw: ExecResult = self._host._vm_op(
                self,
                "exec",
                attempt,
                timeout_s=math.inf if timeout_s is None else timeout_s + answer_s,
            )
        except VMLeaseError:
            self._note(TranscriptEntry(args, None, time.monotonic() - start, "", "(channel error)"))
            raise
        result = CommandResult(
            args, raw.exit_code, raw.stdout, raw.stderr, time.monotonic() - start
        )
        self._note(
            TranscriptEntry(
                args,
                result.exit_code,
                result.duration_s,
                result.stdout[:_OUTPUT_KEPT],
                result.stderr[:_OUTPUT_KEPT],
            )
        )
        if raw.timed_out:
            raise CommandTimeout(
                vm=self.name,
                argv=args,
                timeout_s=timeout_s or 0.0,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        if check and result.exit_code != 0:
            raise CommandFailed(
                vm=self.name,
                argv=args,
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result

    def _note(self, entry: TranscriptEntry) -> None:
        self.transcript.append(entry)
        del self.transcript[:-TRANSCRIPT_LIMIT]

    def put(
        self, local: str | os.PathLike[str], remote: str, *, timeout_s: float | None = None
    ) -> None:
        """Copy the local file ``local`` to ``remote`` in the VM (binary-safe, any size).

        The guest file appears whole or not at all; its mode follows the local file.
        A copy that takes longer than ``timeout_s`` (default: the session's
        ``Timeouts.copy_s``) fails with ChannelError and leaves no partial file.
        """
        path = Path(local)
        if not path.is_file():
            raise GuestFileError(f"cannot copy {path} into VM {self.name}: no such local file")
        if not isinstance(remote, str) or not remote:
            raise ConfigError(f"remote must be a path in the guest, not {remote!r}")
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "put",
            lambda backend, limit: backend.put(self.name, path, remote, timeout_s=limit),
            timeout_s=self._copy_limit(timeout_s),
        )

    def get(
        self, remote: str, local: str | os.PathLike[str], *, timeout_s: float | None = None
    ) -> None:
        """Copy ``remote`` from the VM to the local file ``local`` (binary-safe, any size).

        ``local`` is replaced only once the whole file has arrived, within
        ``timeout_s`` (default: the session's ``Timeouts.copy_s``).
        """
        path = Path(local)
        if not path.parent.is_dir():
            raise GuestFileError(f"cannot copy into {path}: {path.parent} is not a directory")
        if path.is_dir():
            raise GuestFileError(f"cannot copy into {path}: it is a directory")
        if not isinstance(remote, str) or not remote:
            raise ConfigError(f"remote must be a path in the guest, not {remote!r}")
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "get",
            lambda backend, limit: backend.get(self.name, remote, path, timeout_s=limit),
            timeout_s=self._copy_limit(timeout_s),
        )

    def _copy_limit(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self._host.retry_policy.timeouts.copy_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        return float(timeout_s)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut the VM down; its disk is kept for :meth:`start`."""
        self._host._vm_supports("stop_start")
        self._require(VMState.READY, VMState.STOPPED)
        if self.state is VMState.STOPPED:
            return
        self._host._vm_transition(self, VMState.STOPPING)
        self._host._vm_op(
            self,
            "stop",
            lambda backend, limit: backend.stop(self.name, limit),
            timeout_s=timeout_s,
            fails_vm=True,
        )
        self._host._vm_transition(self, VMState.STOPPED)

    def start(self, boot_timeout_s: float | None = None) -> None:
        """Boot a stopped VM again; returns when it answers commands."""
        self._host._vm_supports("stop_start")
        self._require(VMState.READY, VMState.STOPPED)
        if self.state is VMState.READY:
            return
        host = self._host
        timeout = boot_timeout_s or host.boot_timeout_s
        host._vm_transition(self, VMState.STARTING)
        host._vm_op(
            self,
            "start",
            lambda backend, limit: backend.start(self.name, timeout_s=limit),
            timeout_s=host.retry_policy.timeouts.start_s,
            fails_vm=True,
        )
        host._vm_op(
            self,
            "boot",
            lambda backend, limit: backend.wait_ready(self.name, limit),
            timeout_s=timeout,
            fails_vm=True,
        )
        host._vm_transition(self, VMState.READY)

    def delete(self) -> None:
        """Destroy the VM. Deleting a deleted VM does nothing."""
        self._host._vm_delete(self)

    def keep(self, why: str = "kept for inspection") -> None:
        """Leave the VM running after the session ends, for a person to inspect.

        The session, its sweeps and the reaper leave a kept VM alone;
        ``vmlease cleanup`` (or its lease running out) deletes it.
        """
        self._require(VMState.READY, VMState.STOPPED)
        self._host._vm_keep(self, why)

    def snapshot(self, tag: str) -> None:
        """Save the VM's memory and disk state as ``tag`` (replacing a snapshot of that name).

        UnsupportedOperation if the backend cannot (see its capabilities).
        """
        _check_tag(tag)
        self._host._vm_supports("snapshots")
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "snapshot",
            lambda backend, limit: backend.snapshot(self.name, tag, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.snapshot_s,
        )
        self._host._vm_note(self, f"snapshot {tag}")

    def restore(self, tag: str) -> None:
        """Bring memory and disk back to snapshot ``tag``: what happened since is gone.

        The guest clock is set to the current time afterwards.
        """
        _check_tag(tag)
        self._host._vm_supports("snapshots")
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "restore",
            lambda backend, limit: backend.restore(self.name, tag, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.snapshot_s,
        )
        self._host._vm_note(self, f"restored {tag}")

    def reset(self) -> None:
        """Bring the VM back to the moment it was made and ready: memory, disk, name,
        SSH key and forwards as they were; snapshots taken since are gone.

        Without a snapshot: the backend starts the VM again from the saved booted
        state it started from. UnsupportedOperation where it cannot (see
        ``can_reset``); there, ``snapshot`` after creating and ``restore`` do it.
        """
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "reset",
            lambda backend, limit: backend.reset(self.name, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.start_s,
        )
        self._host._vm_note(self, "reset")

    @property
    def can_reset(self) -> bool:
        """Whether ``reset`` works for this VM (the QEMU backend: it started from a
        saved booted state whose memory is mapped)."""
        return self._host._vm_can_reset(self)

    def forward(self, guest_port: int) -> int:
        """Forward TCP ``guest_port`` of the VM to 127.0.0.1 (only there) and return
        the host port. The kernel picks a free one, so parallel workers never race;
        the ledger records it (``vmlease ls`` shows it), and a forward survives
        snapshot restores and stop/start. Forwarding a port again returns the same."""
        port = port_number(guest_port)
        self._host._vm_supports("forwards")
        self._require(VMState.READY)
        host_port: int = self._host._vm_op(
            self,
            "forward",
            lambda backend, limit: backend.forward(self.name, port, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.forward_s,
        )
        self._host._vm_forwarded(self, port, host_port)
        return host_port

    def link_down(self, network: str | None = None) -> None:
        """Unplug the VM from private ``network`` (its only one if left out): its
        interface loses its carrier and nothing passes, until :meth:`link_up`."""
        self._set_link(network, up=False)

    def link_up(self, network: str | None = None) -> None:
        """Plug the VM back into private ``network`` (see :meth:`link_down`)."""
        self._set_link(network, up=True)

    def _set_link(self, network: str | None, *, up: bool) -> None:
        names = self.spec.networks
        if network is None and len(names) == 1:
            network = names[0]
        if network is None or network not in names:
            raise ConfigError(f"VM {self.name} is on the networks {list(names)}: name one of them")
        self._host._vm_supports("networks")
        self._require(VMState.READY)
        self._host._vm_op(
            self,
            "link",
            lambda backend, limit: backend.set_link(self.name, network, up, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.forward_s,
        )

    @property
    def ssh(self) -> SSHInfo:
        """How to reach the VM with SSH: host, port, user, key path, and a
        known_hosts file holding its real host key (``.argv(cmd)`` builds an
        ``ssh`` command line; ``.config(alias)`` an OpenSSH ``Host`` block).
        Forwards port 22 the first time."""
        self._host._vm_supports("ssh")
        self._require(VMState.READY)
        info: SSHInfo = self._host._vm_op(
            self,
            "ssh",
            lambda backend, limit: backend.ssh(self.name, timeout_s=limit),
            timeout_s=self._host.retry_policy.timeouts.forward_s,
        )
        self._host._vm_forwarded(self, 22, info.port)
        return info

    # -- waiting for a real system (one loop, one timeout: see _waits.py) --------

    def wait_until_succeeds(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = DEFAULT_WAIT_S,
        interval_s: float = 0.2,
    ) -> CommandResult:
        """Run ``argv`` until it exits 0 and return that run; WaitTimeout if it never does."""
        args = _argv(argv)

        def once() -> Check[CommandResult]:
            result = self.run(args, timeout_s=max(1.0, timeout_s))
            if result.ok:
                return Check(result)
            return Check(None, f"exit {result.exit_code}\n{result.stdout}{result.stderr}")

        return poll(
            f"VM {self.name}: {list(args)} did not succeed",
            once,
            timeout_s=timeout_s,
            interval_s=interval_s,
            console=self.console_tail,
        )

    def wait_for_unit(self, unit: str, *, timeout_s: float = DEFAULT_WAIT_S) -> None:
        """Wait until the systemd unit ``unit`` is active; WaitTimeout at once if it failed,
        UnsupportedOperation at once in a guest whose init is not systemd."""
        if not isinstance(unit, str) or not _UNIT_RE.fullmatch(unit):
            raise ConfigError(f"not a systemd unit name: {unit!r}")
        init = self.run(["sh", "-c", INIT_PROBE], timeout_s=30).stdout.strip()
        if init != "systemd":
            raise UnsupportedOperation(
                f"VM {self.name} is not a systemd guest (its init is {init or 'unknown'}): "
                f"there is no unit {unit} to wait for. Wait for what the service does "
                "(wait_for_port), or for its own check (wait_until_succeeds, e.g. "
                '["rc-service", "NAME", "status"] under OpenRC)'
            )

        def once() -> Check[bool]:
            result = self.run(["systemctl", "is-active", unit], timeout_s=30)
            state = result.stdout.strip()
            if state == "active":
                return Check(True)
            status = self.run(["systemctl", "status", "--no-pager", "--lines=20", unit])
            said = f"{unit} is {state or 'unknown'}\n{status.stdout}"
            return Check(None, said, final=state == "failed")

        poll(
            f"VM {self.name}: unit {unit} did not become active",
            once,
            timeout_s=timeout_s,
            interval_s=0.25,
            console=self.console_tail,
        )

    def wait_for_port(self, port: int, *, timeout_s: float = DEFAULT_WAIT_S) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        probe = listening_probe(port_number(port))

        def once() -> Check[bool]:
            if self.run(probe, timeout_s=30).ok:
                return Check(True)
            listening = self.run(["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"])
            return Check(None, f"nothing listens on port {port}; sockets:\n{listening.stdout}")

        poll(
            f"VM {self.name}: nothing listened on port {port}",
            once,
            timeout_s=timeout_s,
            interval_s=0.2,
            console=self.console_tail,
        )

    def wait_for_console(
        self, pattern: str | re.Pattern[str], *, timeout_s: float = DEFAULT_WAIT_S
    ) -> re.Match[str]:
        """Wait until the console shows a line matching ``pattern`` (a regular expression)."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)

        def once() -> Check[re.Match[str]]:
            text = self.console_tail(CONSOLE_SCAN_LINES)
            found = regex.search(text)
            return Check(found) if found else Check(None, "the console has no such line")

        return poll(
            f"VM {self.name}: the console never said {regex.pattern!r}",
            once,
            timeout_s=timeout_s,
            interval_s=0.1,
            console=self.console_tail,
        )

    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the VM's console, for diagnosis."""
        return self._host._vm_console(self, lines)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
