"""Reaching a VM by name from another process (``vmlease exec``, ``vmlease ssh``,
``vmlease ssh-config``, the connectors): a kept VM, or one a running session
owns. Only VMs in the ledger can be reached. Backends are asked to
:meth:`~vmlease.backends.Backend.visit`, so these commands run beside the
owner's instead of in turns with them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease import backends as _backends
from vmlease._errors import ConfigError, VMLeaseError, VMNotFound, VMStateError
from vmlease._ledger import Ledger, Record, VMState
from vmlease._ssh import SSHInfo
from vmlease.backends import Backend, ExecResult

__all__ = ["Attached", "Reachable", "exec_in", "inventory", "live_names", "ssh_info"]


def exec_in(
    state_dir: Path,
    name: str,
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    timeout_s: float | None = None,
) -> ExecResult:
    """Run ``argv`` in the VM called ``name`` that vmlease owns."""
    if not argv:
        raise ConfigError("no command given: vmlease exec NAME -- COMMAND [ARG...]")
    record = _running(state_dir, name, "to run commands")
    backend = _visitor(state_dir, record)
    try:
        return backend.exec(name, list(argv), stdin=stdin, env=None, cwd=None, timeout_s=timeout_s)
    finally:
        backend.close()


class Attached:
    """A running VM vmlease owns, reached by name from this process: commands and
    files over its channel (which its session lets go of when idle).

    Raises VMNotFound (with where to look) if vmlease owns no VM of that name,
    VMStateError if it is not running.
    """

    def __init__(self, state_dir: Path, name: str) -> None:
        record = _running(state_dir, name, "to be reached")
        self.name = name
        self._backend = _visitor(state_dir, record)

    def exec(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout_s: float | None = None
    ) -> ExecResult:
        return self._backend.exec(
            self.name, list(argv), stdin=stdin, env=None, cwd=None, timeout_s=timeout_s
        )

    def put(self, local: Path, remote: str) -> None:
        self._backend.put(self.name, local, remote)

    def get(self, remote: str, local: Path) -> None:
        self._backend.get(self.name, remote, local)

    def close(self) -> None:
        self._backend.close()


def _visitor(state_dir: Path, record: Record) -> Backend:
    """A backend object that reaches ``record``'s VM as a visitor."""
    backend = _backends.get(record.backend, state_dir=state_dir)
    backend.visit()
    return backend


def _running(state_dir: Path, name: str, what: str) -> Record:
    """The ledger row of VM ``name``, which must be running."""
    ledger = Ledger(state_dir / "ledger.sqlite3", create=False)
    try:
        rows = [r for r in ledger.records() if r.name == name]
    finally:
        ledger.close()
    if not rows:
        raise VMNotFound(f"vmlease has no VM named {name!r}; `vmlease ls` lists them")
    if len(rows) > 1:
        raise ConfigError(f"more than one backend has a VM named {name!r}")
    record = rows[0]
    if record.state not in (VMState.READY, VMState.KEPT):
        raise VMStateError(f"VM {name} is {record.state.value}; it must be running {what}")
    return record


def ssh_info(state_dir: Path, name: str) -> SSHInfo:
    """How to reach VM ``name`` with SSH; its port 22 is forwarded (and recorded) first."""
    record = _running(state_dir, name, "to reach it with SSH")
    backend = _visitor(state_dir, record)
    try:
        info = backend.ssh(name)
    finally:
        backend.close()
    if record.forwards.get(22) != info.port:
        ledger = Ledger(state_dir / "ledger.sqlite3", create=False)
        try:
            ledger.set_forwards(record.id, {**record.forwards, 22: info.port})
        finally:
            ledger.close()
    return info


def _live(state_dir: Path) -> list[Record]:
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    ledger = Ledger(path, create=False)
    try:
        return ledger.records(states=(VMState.READY, VMState.KEPT))
    finally:
        ledger.close()


def live_names(state_dir: Path) -> list[str]:
    """Names of the VMs in the ledger that run (ready or kept), oldest first."""
    return [r.name for r in _live(state_dir)]


@dataclass(frozen=True, slots=True)
class Reachable:
    """A running VM for an inventory: how SSH reaches it, or why it cannot."""

    name: str
    session_id: str
    backend: str
    ssh: SSHInfo | None
    why_not: str = ""


def inventory(state_dir: Path, *, session_id: str | None = None) -> list[Reachable]:
    """Every running VM vmlease owns (of one session, if given), oldest first, with
    how SSH reaches it; a VM without an SSH server or a network says why not."""
    found = []
    for record in _live(state_dir):
        if session_id is not None and record.owner.session_id != session_id:
            continue
        try:
            info: SSHInfo | None = ssh_info(state_dir, record.name)
            why = ""
        except VMLeaseError as exc:
            info, why = None, str(exc)
        found.append(Reachable(record.name, record.owner.session_id, record.backend, info, why))
    return found
