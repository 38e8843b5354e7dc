"""Kill a VM owner at a chosen point and measure how long until nothing is left.

Used by the integration tests (a few trials) and ``python -m benchmarks reap``
(many).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from tests.support.procs import processes_under
from vmlease._ledger import Ledger, VMState
from vmlease._procfs import pids

T = TypeVar("T")
OWNER = Path(__file__).with_name("owner.py")
#: Where a kill lands: the marker to wait for, and what it means.
POINTS = {
    "creating": "CREATING",  # ledger row written, backend create not yet run
    "launching": "CREATING",  # ... plus a random delay: inside qemu-img or qemu's start
    "booting": "LAUNCHED",  # QEMU up, guest booting
    "ready": "READY",  # VM answering
}


@dataclass
class Owner:
    """A running owner process and what it said."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> IO[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def wait_for(self, marker: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.stdout.readline()
            if not line:
                raise RuntimeError(f"owner ended before {marker}: {self.lines}")
            self.lines.append(line.strip())
            if line.startswith(marker):
                return line.strip()
        raise TimeoutError(f"no {marker} within {timeout_s} s: {self.lines}")

    def finish(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout_s)
        self.stdout.close()
        return code


def start_owner(state_dir: Path, *args: str) -> Owner:
    proc = subprocess.Popen(
        [sys.executable, str(OWNER), str(state_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return Owner(proc)


def leftovers(state_dir: Path, ignore: frozenset[str] = frozenset()) -> list[str]:
    """What of the owner's VMs still exists: qemu processes, VM directories, live rows.

    ``ignore`` names VMs in the state directory that are not the owner's.
    """
    needle = str(state_dir).encode()
    spared = [str(state_dir / "qemu" / name / "qemu.pid").encode() for name in ignore]
    found = [
        f"qemu pid {pid}"
        for pid in pids(
            lambda args: (
                any(b"qemu-system" in a for a in args)
                and any(needle in a for a in args)
                and not any(s in args for s in spared)
            )
        )
    ]
    qemu_dir = state_dir / "qemu"
    if qemu_dir.is_dir():
        found += [
            f"directory {p.name}" for p in qemu_dir.iterdir() if p.is_dir() and p.name not in ignore
        ]
    if (state_dir / "ledger.sqlite3").exists():
        ledger = Ledger(state_dir / "ledger.sqlite3")
        found += [f"ledger row {r.name} ({r.state.value})" for r in ledger.records()]
        ledger.close()
    return found


def reapers_under(root: Path) -> list[int]:
    """Pids of reapers serving a state directory under ``root``."""
    return processes_under(root, b"vmlease._reaper")


@dataclass(frozen=True)
class Trial:
    point: str
    delay_s: float
    reap_s: float | None  # None: not clean within the timeout
    leaked: list[str]


def kill_trial(
    state_dir: Path,
    point: str,
    delay_s: float,
    timeout_s: float = 10.0,
    ignore: frozenset[str] = frozenset(),
) -> Trial:
    """SIGKILL an owner at ``point`` (+ ``delay_s``); wait until nothing of it is left.

    ``ignore`` names VMs in the state directory that are not the owner's.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = start_owner(state_dir)
    owner.wait_for(POINTS[point])
    time.sleep(delay_s)
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.finish()
    killed = time.monotonic()
    while time.monotonic() - killed < timeout_s:
        if not leftovers(state_dir, ignore):
            return Trial(point, delay_s, time.monotonic() - killed, [])
        time.sleep(0.05)
    return Trial(point, delay_s, None, leftovers(state_dir, ignore))


def gone_events(state_dir: Path) -> list[str]:
    """The detail of each VM's last 'deleting' event: who deleted it."""
    ledger = Ledger(state_dir / "ledger.sqlite3")
    try:
        details = []
        for record in ledger.records(include_gone=True):
            deleting = [e for e in ledger.events(record.id) if e.state is VMState.DELETING]
            details.append(deleting[-1].detail or "" if deleting else "")
        return details
    finally:
        ledger.close()


#: Random delays after each point before the kill, in seconds (low, high).
DELAYS = {
    "creating": (0.0, 0.0),
    "launching": (0.0, 0.3),
    "booting": (0.0, 1.5),
    "ready": (0.0, 0.0),
}


def run_trials(trials: int, seed: int = 0) -> list[Trial]:
    """``trials`` SIGKILL trials at the points in turn, each with its own state directory."""
    rng = random.Random(seed)
    points = list(POINTS)
    done = []
    # Each trial has its own state directory, so its own reaper: let them go soon.
    os.environ.setdefault("VMLEASE_REAPER_IDLE_S", "1")
    with tempfile.TemporaryDirectory(prefix="vmlease-reap-") as tmp:
        for i in range(trials):
            point = points[i % len(points)]
            low, high = DELAYS[point]
            done.append(kill_trial(Path(tmp) / f"t{i}", point, rng.uniform(low, high)))
        deadline = time.monotonic() + 15
        while reapers_under(Path(tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
    return done


@dataclass(frozen=True)
class ReaperTrial:
    """A reaper killed under a live owner, then the owner killed."""

    replaced_s: float | None  # SIGKILL of the reaper to a new reaper serving; None: none came
    reap_s: float | None  # SIGKILL of the owner to nothing left; None: not within the timeout
    leaked: list[str]


def wait_until(check: Callable[[], T | None], timeout_s: float, every_s: float = 0.02) -> T | None:
    """The first true value ``check`` returns within ``timeout_s``, or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(every_s)


def kill_reaper_then_owner(state_dir: Path, timeout_s: float = 10.0) -> ReaperTrial:
    """SIGKILL the reaper of a live owner with one VM; once another reaper
    serves, SIGKILL the owner; wait until nothing of it is left."""
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = start_owner(state_dir)
    owner.wait_for("READY")
    [first] = reapers_under(state_dir)
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()
    # The owner's watcher starts a new reaper and registers with it, which its log says.
    said = f"] registered pid {owner.proc.pid} "

    def new_reaper() -> int | None:
        log = (state_dir / "reaper.log").read_text(errors="replace")
        return next(
            (p for p in reapers_under(state_dir) if p != first and f"reaper[{p}{said}" in log),
            None,
        )

    new = wait_until(new_reaper, timeout_s)
    replaced_s = time.monotonic() - killed if new else None
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.finish()
    killed = time.monotonic()
    clean = wait_until(lambda: not leftovers(state_dir), timeout_s, every_s=0.05)
    reap_s = time.monotonic() - killed if clean else None
    return ReaperTrial(replaced_s, reap_s, [] if clean else leftovers(state_dir))
