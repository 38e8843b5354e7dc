"""SIGKILL the owner of a VM at random points; count leaks and time the reaping.

Each trial starts a process that creates one VM, kills it with SIGKILL at one
of four points (just after the ledger write, inside the backend create, while
the guest boots, once it is ready; with a random delay where it makes
sense), then waits until no qemu process, VM directory or live ledger row of
it is left. Target: 0 leaks, every trial clean within 10 s (aim 5 s).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tests.support.killing import POINTS, run_trials

RESULTS = Path(__file__).parent / "results"


def main(*, trials: int) -> int:
    results = run_trials(trials)
    leaks = [t for t in results if t.leaked]
    times = [t.reap_s for t in results if t.reap_s is not None]
    by_point: dict[str, Any] = {}
    for point in POINTS:
        mine = [t.reap_s for t in results if t.point == point and t.reap_s is not None]
        if mine:
            by_point[point] = {
                "trials": len(mine),
                "median_s": statistics.median(mine),
                "max_s": max(mine),
            }
    summary = {
        "trials": trials,
        "leaks": len(leaks),
        "leaked": [{"point": t.point, "delay_s": t.delay_s, "left": t.leaked} for t in leaks],
        "time_to_reap_s": {
            "median": statistics.median(times) if times else None,
            "max": max(times) if times else None,
        },
        "by_point": by_point,
        "target": {"leaks": 0, "max_s": 10.0, "aim_s": 5.0},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reap.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"vmlease reaping after SIGKILL ({trials} trials; JSON in {RESULTS / 'reap.json'})")
    print(f"{'point':<12}{'trials':>8}{'median s':>10}{'max s':>8}")
    for point, fig in by_point.items():
        print(f"{point:<12}{fig['trials']:>8}{fig['median_s']:>10.2f}{fig['max_s']:>8.2f}")
    if times:
        print(
            f"{'all':<12}{len(times):>8}{statistics.median(times):>10.2f}{max(times):>8.2f}"
            "   target: every trial within 10 s"
        )
    print(f"leaks: {len(leaks)} (must be 0)")
    for t in leaks:
        print(f"  {t.point} +{t.delay_s:.2f}s left {t.leaked}")
    return 1 if leaks else 0
