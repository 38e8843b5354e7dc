"""The example suite under injected faults: does it pass, what did retrying cost,
did anything leak.

Each run is ``pytest examples`` with ``--vm-faults`` (30% of backend
operations fail transiently, 5% hang for 0.5 s; a hung create has made its
VM) and ``--vm-retry=attempts=10,total_s=60``, in a state directory of its
own; a first run without faults is the baseline. Per run: tests passed and
failed, faults injected, retries by operation, VMs adopted after hung
creates, the longest any operation took with its retries (bound: 60 s), and
leaks (qemu processes, VM directories, ledger rows not deleted). It also
times the pre-flight checks a session runs when it starts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tests.support.killing import leftovers

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
FAULTS = "failure_rate=0.3,hang_rate=0.05,hang_s=0.5"
BOUND_S = 60.0


def run_suite(state: Path, faults: str | None) -> dict[str, Any]:
    report = state.parent / f"{state.name}-report.json"
    junit = state.parent / f"{state.name}-junit.xml"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(REPO / "examples" / "pytest.ini"),
        str(REPO / "examples"),
        "--ignore",
        str(REPO / "examples" / "debian"),
        f"--vm-retry=attempts=10,total_s={BOUND_S:g}",
        f"--vm-report={report}",
        f"--junitxml={junit}",
    ]
    if faults:
        argv.append(f"--vm-faults={faults}")
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    wall = time.perf_counter() - start
    suite = ET.parse(junit).getroot().find("testsuite")  # noqa: S314 - pytest's own output
    assert suite is not None
    tests = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    figures = json.loads(report.read_text()) if report.exists() else {}
    time.sleep(1.5)  # let a reaper finish whatever it was doing
    left = leftovers(state)
    return {
        "faults": faults,
        "exit_code": done.returncode,
        "tests": tests,
        "passed": tests - failed - int(suite.get("skipped", 0)),
        "failed": failed,
        "wall_s": wall,
        "faults_injected": figures.get("faults", 0),
        "retries": figures.get("retries", {}),
        "adopted": figures.get("adopted", 0),
        "longest_op_s": max(figures.get("longest_op_s", {}).values(), default=0.0),
        "leaks": left,
        "output_tail": done.stdout[-1500:] if done.returncode else "",
    }


def preflight_ms(samples: int = 20) -> float:
    """Median time of the checks a session runs when it starts, in ms."""
    from vmlease.backends.qemu import QemuBackend

    backend = QemuBackend()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        backend.preflight(cheap=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(runs: int = 5) -> int:
    RESULTS.mkdir(exist_ok=True)
    results = []
    preflight = preflight_ms()
    with tempfile.TemporaryDirectory(prefix="vmlease-faults-") as tmp:
        plan: list[str | None] = [None] + [f"{FAULTS},seed={seed}" for seed in range(1, runs + 1)]
        for i, faults in enumerate(plan):
            results.append(run_suite(Path(tmp) / f"run{i}", faults))
    (RESULTS / "faults.json").write_text(
        json.dumps(
            {"bound_s": BOUND_S, "session_preflight_ms": preflight, "runs": results}, indent=2
        )
        + "\n"
    )
    print(f"\nexample suite under injected faults ({FAULTS}; retry bound {BOUND_S:g} s per op)")
    header = (
        f"{'run':<14}{'passed':>8}{'failed':>8}{'faults':>8}{'retries':>9}"
        f"{'adopted':>9}{'longest op s':>14}{'leaks':>7}{'wall s':>8}"
    )
    print(header)
    for i, r in enumerate(results):
        label = "no faults" if r["faults"] is None else f"faults seed {i}"
        print(
            f"{label:<14}{r['passed']:>8}{r['failed']:>8}{r['faults_injected']:>8}"
            f"{sum(r['retries'].values()):>9}{r['adopted']:>9}{r['longest_op_s']:>14.2f}"
            f"{len(r['leaks']):>7}{r['wall_s']:>8.1f}"
        )
    totals: dict[str, int] = {}
    for r in results:
        for op, n in r["retries"].items():
            totals[op] = totals.get(op, 0) + n
    print(
        "retries by operation, all runs: "
        + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
    )
    bad = [r for r in results if r["exit_code"] != 0 or r["leaks"] or r["longest_op_s"] > BOUND_S]
    for r in bad:
        print(f"FAILED RUN ({r['faults']}): leaks {r['leaks']}\n{r['output_tail']}")
    print(f"pre-flight checks at session start: {preflight:.2f} ms (median of 20)")
    print(f"results: {RESULTS / 'faults.json'}")
    return 1 if bad else 0
