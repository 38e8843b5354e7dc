"""Faults of vmlease's own machinery and of the host, N trials each: leaks and times.

Kinds, each with real VMs in a state directory of its own:

- ``reaper+owner``: the reaper of a live owner is killed (SIGKILL), then,
  once a new reaper holds the session, the owner. Fault: the owner's kill.
- ``qemu killed``: a VM's QEMU is killed from outside while its session
  runs; the next command fails, the session ends. Error: kill to the error.
- ``disk full``: the state directory is a 48 MiB tmpfs and the guest writes
  200 MB; the rest of the room is then taken too, so the ledger cannot be
  written, and the session ends. Error: start of the write to DiskFull.
  Fault: the error to nothing left.
- ``hung owner``: an owner with a 2 s lease is stopped (SIGSTOP); the reaper
  (sweeping every second here, 30 s by default) deletes its VM. Fault: the
  lease's end.
- ``killed in delete``: an owner is killed (SIGKILL) while it deletes its VM
  (SIGTERM started the delete; the delete pauses 0.5 s in the backend).

Per kind: leaks (must be 0), time from the fault to nothing left (median,
max), and time for the error to reach the user where there is one. Nothing
left means no qemu process, no VM directory and no live ledger row (for
``disk full``, rows are settled by a cleanup once the room is back, which is
counted in the time).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.disks import CannotMount, fill, small_filesystem
from tests.support.killing import (
    kill_reaper_then_owner,
    leftovers,
    reapers_under,
    start_owner,
    wait_until,
)
from tests.support.ledger import ledger_records
from tests.support.procs import processes_under

import vmlease
from vmlease._cleanup import cleanup

RESULTS = Path(__file__).parent / "results"
CLEAN_WITHIN_S = 15.0


@dataclass(frozen=True)
class Outcome:
    """One trial: seconds from the fault to nothing left (None: not within the bound)."""

    clean_s: float | None
    error_s: float | None = None
    leaked: tuple[str, ...] = ()


def _clean_after(state: Path, fault_at: float) -> Outcome:
    clean = wait_until(lambda: not leftovers(state), CLEAN_WITHIN_S, every_s=0.02)
    if not clean:
        return Outcome(None, leaked=tuple(leftovers(state)))
    return Outcome(time.monotonic() - fault_at)


def reaper_then_owner(state: Path) -> Outcome:
    trial = kill_reaper_then_owner(state)
    return Outcome(trial.reap_s, None, tuple(trial.leaked))


def qemu_killed(state: Path) -> Outcome:
    error_s = None
    with vmlease.Session(state_dir=state) as session:
        vm = session.create()
        pid = int((state / "qemu" / vm.name / "qemu.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        fault_at = time.monotonic()
        try:
            vm.run(["true"])
        except vmlease.ChannelError:
            error_s = time.monotonic() - fault_at
    done = _clean_after(state, fault_at)
    return Outcome(done.clean_s, error_s, done.leaked)


def disk_full(_state: Path) -> Outcome:
    with small_filesystem(48) as mount:
        state = mount / "state"
        error_s = None
        with vmlease.Session(state_dir=state) as session:
            vm = session.create()
            started = time.monotonic()
            try:
                vm.run(["dd", "if=/dev/zero", "of=/root/big", "bs=1M", "count=200"], timeout_s=100)
            except vmlease.DiskFull:
                error_s = time.monotonic() - started
            fault_at = time.monotonic()
            filler = fill(mount)
        gone = wait_until(lambda: not [x for x in leftovers(state) if "ledger" not in x], 15.0)
        filler.unlink()
        cleanup(state)  # room is back: the rows are settled
        done = _clean_after(state, fault_at)
        if not gone:
            return Outcome(None, error_s, done.leaked or ("the VM outlived its session",))
        return Outcome(done.clean_s, error_s, done.leaked)


def hung_owner(state: Path) -> Outcome:
    owner = start_owner(state, "--count", "1", "--max-age", "2")
    owner.wait_for("READY")
    os.kill(owner.proc.pid, signal.SIGSTOP)
    [row] = ledger_records(state)
    assert row.expires_at is not None
    lease_ends = time.monotonic() + (row.expires_at - time.time())
    try:
        done = _clean_after(state, lease_ends)
    finally:
        os.kill(owner.proc.pid, signal.SIGKILL)
        owner.finish()
    return done


def killed_in_delete(state: Path) -> Outcome:
    owner = start_owner(state, "--count", "1", "--delete-pause", "0.5")
    owner.wait_for("READY")
    owner.proc.send_signal(signal.SIGTERM)
    owner.wait_for("DELETING")
    os.kill(owner.proc.pid, signal.SIGKILL)
    fault_at = time.monotonic()
    owner.finish()
    return _clean_after(state, fault_at)


KINDS: dict[str, Callable[[Path], Outcome]] = {
    "reaper+owner": reaper_then_owner,
    "qemu killed": qemu_killed,
    "disk full": disk_full,
    "hung owner": hung_owner,
    "killed in delete": killed_in_delete,
}


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    clean = [o.clean_s for o in outcomes if o.clean_s is not None]
    errors = [o.error_s for o in outcomes if o.error_s is not None]
    return {
        "trials": len(outcomes),
        "leaks": sum(1 for o in outcomes if o.leaked or o.clean_s is None),
        "leaked": [list(o.leaked) for o in outcomes if o.leaked],
        "clean_median_s": statistics.median(clean) if clean else None,
        "clean_max_s": max(clean) if clean else None,
        "error_median_s": statistics.median(errors) if errors else None,
        "error_max_s": max(errors) if errors else None,
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main(*, trials: int) -> int:
    saved = {k: os.environ.get(k) for k in ("VMLEASE_REAPER_IDLE_S", "VMLEASE_REAPER_SWEEP_S")}
    os.environ["VMLEASE_REAPER_IDLE_S"] = "1"
    os.environ["VMLEASE_REAPER_SWEEP_S"] = "1"
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vmlease-chaos-") as tmp:
            for kind, trial in KINDS.items():
                outcomes = []
                try:
                    for i in range(trials):
                        outcomes.append(trial(Path(tmp) / f"{kind.replace(' ', '-')}-{i}"))
                except CannotMount as exc:
                    results[kind] = {"skipped": str(exc)}
                    continue
                results[kind] = _summary(outcomes)
            wait_until(lambda: not reapers_under(Path(tmp)), 15.0)
            # A leaking trial is counted above; what it left must not outlive the run.
            for pid in processes_under(Path(tmp), b"qemu-system") + reapers_under(Path(tmp)):
                os.kill(pid, signal.SIGKILL)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(f"== chaos: {trials} trials of each fault")
    print(
        f"{'fault':18}{'leaks':>7}{'clean, median':>16}{'max':>10}{'error, median':>16}{'max':>10}"
    )
    code = 0
    for kind, r in results.items():
        if "skipped" in r:
            print(f"{kind:18}  skipped: {r['skipped']}")
            continue
        print(
            f"{kind:18}{r['leaks']:>7}{_s(r['clean_median_s']):>16}{_s(r['clean_max_s']):>10}"
            f"{_s(r['error_median_s']):>16}{_s(r['error_max_s']):>10}"
        )
        code |= 1 if r["leaks"] else 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps({"trials": trials, "kinds": results}, indent=2))
    return code
