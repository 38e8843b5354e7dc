"""Reaching a VM by name from another process (``vmlease exec``, ``vmlease ssh``,
``vmlease ssh-config``): a kept VM, or one a running session owns. Only VMs in
the ledger can be reached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmlease import backends as _backends
from vmlease._errors import ConfigError, VMNotFound, VMStateError
from vmlease._ledger import Ledger, Record, VMState
from vmlease._ssh import SSHInfo
from vmlease.backends import ExecResult

__all__ = ["exec_in", "live_names", "ssh_info"]


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
    backend = _backends.get(record.backend, state_dir=state_dir)
    try:
        return backend.exec(name, list(argv), stdin=stdin, env=None, cwd=None, timeout_s=timeout_s)
    finally:
        backend.close()


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
    backend = _backends.get(record.backend, state_dir=state_dir)
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


def live_names(state_dir: Path) -> list[str]:
    """Names of the VMs in the ledger that run (ready or kept), oldest first."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    ledger = Ledger(path, create=False)
    try:
        return [r.name for r in ledger.records(states=(VMState.READY, VMState.KEPT))]
    finally:
        ledger.close()
