"""Another process's long command beside the owner's, and operations on a
stopped QEMU: how long the owner waits, and how long a failure takes.

Side by side in one run, on one tiny VM per trial:

- ``owner's echo, other process on the visitors' port``: while another
  process runs ``sleep 6`` in the VM through the agent's second port (what
  ``vmlease exec`` does now), the owning session's ``vm.run(["echo"])``;
- ``owner's echo, other process on the owner's port``: the same with the
  other process on the owner's port, taking turns with it (the baseline:
  how ``vmlease exec`` reached a VM before the second port);
- ``run(timeout_s=3) on a stopped QEMU``: seconds until ``vm.run(["true"],
  timeout_s=3)`` fails with the VM's QEMU stopped (SIGSTOP); before the
  deadlines held, 14 s;
- ``put(timeout_s=3) on a stopped QEMU``, ``snapshot on a stopped QEMU``
  (``Timeouts(snapshot_s=3)``).

Medians of ``runs`` trials; JSON in ``results/deadlines.json``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmlease

RESULTS = Path(__file__).parent / "results"

#: The other process: runs ``sleep 6`` in VM argv[2], on the visitors' port if argv[3] says so.
_OTHER = """
import sys
from pathlib import Path
from vmlease import backends
backend = backends.get("qemu", state_dir=Path(sys.argv[1]))
if sys.argv[3] == "visitor":
    backend.visit()
print("started", flush=True)
backend.exec(sys.argv[2], ["sleep", "6"], stdin=None, env=None, cwd=None, timeout_s=30)
"""


def _owner_wait(vm: vmlease.VM, state: Path, port: str) -> float:
    """Seconds the owner's echo takes while another process runs ``sleep 6``."""
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER, str(state), vm.name, port],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        other.stdout.readline()
        time.sleep(1.0)  # its command runs by now (the owner's channel cannot look)
        started = time.perf_counter()
        vm.run(["echo", "mine"], check=True)
        return time.perf_counter() - started
    finally:
        other.wait(60)
        if other.stdout is not None:
            other.stdout.close()


def _stopped(vm: vmlease.VM, state: Path, big: Path) -> dict[str, float]:
    """Seconds until each operation fails with the VM's QEMU stopped."""
    pid = int((state / "qemu" / vm.name / "qemu.pid").read_text())
    took: dict[str, float] = {}
    os.kill(pid, signal.SIGSTOP)
    try:
        for label, op in (
            ("run", lambda: vm.run(["true"], timeout_s=3)),
            ("put", lambda: vm.put(big, "/root/big", timeout_s=3)),
            ("snapshot", lambda: vm.snapshot("s")),
        ):
            started = time.perf_counter()
            try:
                op()
            except vmlease.VMLeaseError:
                took[label] = time.perf_counter() - started
            else:
                raise AssertionError(f"{label} succeeded on a stopped QEMU")
    finally:
        os.kill(pid, signal.SIGCONT)
    vm.run(["true"], check=True)
    return took


def main(runs: int = 5) -> int:
    policy = vmlease.RetryPolicy(attempts=1, timeouts=vmlease.Timeouts(snapshot_s=3))
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-bench-") as tmp:
        state = Path(tmp) / "state"
        big = Path(tmp) / "big"
        big.write_bytes(os.urandom(4 << 20))
        with vmlease.Session(state_dir=state, retry=policy) as session:
            for _ in range(runs):
                vm = session.create()
                for port in ("visitor", "owner"):
                    samples.setdefault(f"echo_other_on_{port}_port_s", []).append(
                        _owner_wait(vm, state, port)
                    )
                for label, seconds in _stopped(vm, state, big).items():
                    samples.setdefault(f"stopped_qemu_{label}_fails_after_s", []).append(seconds)
                vm.delete()
    figures = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deadlines.json").write_text(json.dumps({"runs": runs, **figures}, indent=2))
    print(f"deadlines: medians of {runs} (seconds)")
    rows = [
        ("owner's echo, other process on the visitors' port", "echo_other_on_visitor_port_s"),
        ("owner's echo, other process on the owner's port (before)", "echo_other_on_owner_port_s"),
        ("run(timeout_s=3) on a stopped QEMU (before: 14 s)", "stopped_qemu_run_fails_after_s"),
        ("put(timeout_s=3) on a stopped QEMU", "stopped_qemu_put_fails_after_s"),
        ("snapshot (snapshot_s=3) on a stopped QEMU", "stopped_qemu_snapshot_fails_after_s"),
    ]
    for text, key in rows:
        print(f"  {text:<60} {figures[key]:8.3f}")
    return 0
