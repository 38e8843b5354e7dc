"""What the command-line doubles share: machines, faults and a call log.

A TEST DOUBLE, not OrbStack or Multipass. It answers the commands vmlease
uses with the output formats and messages of the real tools (see
tests/data/), and runs each "machine" as a real vmlease QEMU VM, so commands
and file copies really happen in a guest. State lives in
``$VMLEASE_DOUBLE_DIR``:

- ``machines.json``: name -> {id, image, state, cpus, memory_mb, ...};
- ``qemu/``: the QEMU backend's VM directories;
- ``faults.json``: failures to inject (see :func:`take_fault`);
- ``calls.log``: one JSON line per invocation (argv), for tests to read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmlease._spec import VMSpec
from vmlease.backends.qemu import QemuBackend


def home() -> Path:
    path = Path(os.environ["VMLEASE_DOUBLE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked() -> Iterator[dict[str, Any]]:
    """The machine table, locked for the duration; written back on exit."""
    lock = home() / "machines.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        path = home() / "machines.json"
        table: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        yield table
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        tmp.replace(path)


def machines() -> dict[str, Any]:
    with locked() as table:
        return dict(table)


def log_call(tool: str, argv: list[str]) -> None:
    with (home() / "calls.log").open("a") as f:
        f.write(json.dumps([tool, *argv]) + "\n")


def take_fault(tool: str, command: str) -> dict[str, Any] | None:
    """The next injected fault for ``command``, used up as it is taken.

    ``faults.json`` holds a list of ``{"tool", "command", "times", "stderr",
    "exit", "hang_s", "after"}``: ``after`` makes the double do the real work
    first (a create that hangs after making its machine), ``hang_s`` sleeps
    before failing.
    """
    path = home() / "faults.json"
    with locked():
        if not path.exists():
            return None
        faults = json.loads(path.read_text())
        for fault in faults:
            if fault.get("tool") == tool and fault.get("command") == command and fault["times"]:
                fault["times"] -= 1
                path.write_text(json.dumps(faults))
                return dict(fault)
    return None


def fail(fault: dict[str, Any]) -> None:
    if fault.get("hang_s"):
        time.sleep(float(fault["hang_s"]))
    sys.stderr.write(fault.get("stderr", "") + "\n")
    sys.exit(int(fault.get("exit", 1)))


def qemu() -> QemuBackend:
    return QemuBackend(state_dir=home())


def new_id() -> str:
    return secrets.token_hex(13).upper()


def make_machine(name: str, record: dict[str, Any]) -> None:
    """Create the QEMU VM behind machine ``name`` and wait until it answers."""
    backend = qemu()
    spec = VMSpec(cpus=int(record.get("cpus", 1)), memory_mb=int(record.get("memory_mb", 256)))
    backend.create(name, spec)
    backend.wait_ready(name, 60.0)
    backend.close()


def start_machine(name: str) -> None:
    backend = qemu()
    backend.start(name)
    backend.wait_ready(name, 60.0)
    backend.close()


def stop_machine(name: str) -> None:
    backend = qemu()
    backend.stop(name, 30.0)
    backend.close()


def delete_machine(name: str) -> None:
    backend = qemu()
    with contextlib.suppress(Exception):
        backend.delete(name)
    backend.close()


def run(name: str, argv: list[str], cwd: str | None) -> int:
    """Run ``argv`` in machine ``name`` with this process's stdin; pass output and status on."""
    backend = qemu()
    stdin = sys.stdin.buffer.read()
    result = backend.exec(name, argv, stdin=stdin, env=None, cwd=cwd, timeout_s=None)
    backend.close()
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    return result.exit_code


def push(name: str, local: str, remote: str) -> None:
    backend = qemu()
    backend.put(name, Path(local), remote)
    backend.close()


def pull(name: str, remote: str, local: str) -> None:
    backend = qemu()
    backend.get(name, remote, Path(local))
    backend.close()


def main(tool: str, argv: list[str], dispatch: Callable[[str, list[str]], int]) -> int:
    """Log the call, apply an injected fault (before or after the work), dispatch."""
    log_call(tool, argv)
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    fault = take_fault(tool, command)
    if fault is not None and not fault.get("after"):
        fail(fault)
    code = dispatch(command, args)
    if fault is not None:
        fail(fault)
    return code
