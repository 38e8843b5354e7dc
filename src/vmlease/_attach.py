"""Reaching a VM by name from another process (``vmlease exec``): a kept VM,
or one a running session owns. Only VMs in the ledger can be reached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmlease import backends as _backends
from vmlease._errors import ConfigError, VMNotFound, VMStateError
from vmlease._ledger import Ledger, VMState
from vmlease.backends import ExecResult

__all__ = ["exec_in"]


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
        raise VMStateError(f"VM {name} is {record.state.value}; it must be running to run commands")
    backend = _backends.get(record.backend, state_dir=state_dir)
    try:
        return backend.exec(name, list(argv), stdin=stdin, env=None, cwd=None, timeout_s=timeout_s)
    finally:
        backend.close()
