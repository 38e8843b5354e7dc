"""Run the benchmarks and print their figures; JSON goes to benchmarks/results/.

python -m benchmarks            all of them
python -m benchmarks spine      P1 (cold create) and P4 (command round trip)
python -m benchmarks reap       SIGKILL trials: leaks and time to reap
python -m benchmarks suite      a model suite in three modes: efficiency, restore, overhead
python -m benchmarks faults     the example suite under injected faults: passes, retries, leaks
python -m benchmarks startup    the plugin's import cost and the command's start-up time
python -m benchmarks chaos      faults of the machinery and the host: leaks, time to clean, errors
python -m benchmarks guests     debian-12: boots, saved states, resets, commands vs ssh, memory
python -m benchmarks trims      debian-12: what each boot trim buys (systemd-analyze)
python -m benchmarks libvirt    the libvirt backend beside direct QEMU; runner SIGKILL to VMs gone
python -m benchmarks rootless   debian-12 built and started as root and as a normal user
python -m benchmarks deadlines  the owner's command beside another process's; a stopped QEMU
python -m benchmarks resets     mapped booted states beside streams: isolation, resets, starts, PSS
python -m benchmarks arches     arm64 beside x86_64: cold boots, starts, resets, run(true)
python -m benchmarks networks   private networks: VM to VM beside VM to host; a second NIC's cost
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import (
    arches,
    chaos,
    deadlines,
    faults,
    guests,
    libvirt,
    networks,
    reap,
    resets,
    rootless,
    spine,
    startup,
    suite,
    trims,
)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "which",
        nargs="*",
        metavar="spine|reap|suite|faults|startup|chaos|guests|trims|libvirt|rootless|deadlines"
        "|resets|arches|networks",
        help="default: all",
    )
    parser.add_argument("--runs", type=int, default=7, help="boots per P1 variant (at least 5)")
    parser.add_argument("--round-trips", type=int, default=200, help="P4 samples")
    parser.add_argument("--trials", type=int, default=50, help="SIGKILL trials")
    parser.add_argument("--tests", type=int, default=200, help="model tests per suite mode")
    parser.add_argument(
        "--trivial-tests", type=int, default=40, help="resets: trivial tests per suite"
    )
    parser.add_argument("--fault-runs", type=int, default=5, help="example runs with faults")
    parser.add_argument("--startup-runs", type=int, default=15, help="start-up samples per tree")
    parser.add_argument("--chaos-trials", type=int, default=5, help="trials of each fault")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help="startup: another checkout's src directory, measured side by side",
    )
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5 (the figures are medians of at least 5)")
    names = [
        "spine",
        "reap",
        "suite",
        "faults",
        "startup",
        "chaos",
        "guests",
        "trims",
        "libvirt",
        "rootless",
        "deadlines",
        "resets",
        "arches",
        "networks",
    ]
    unknown = set(args.which) - set(names)
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)[0]!r}; choose {', '.join(names)}")
    which = args.which or names
    code = 0
    if "spine" in which:
        code |= spine.main(runs=args.runs, round_trips=args.round_trips)
    if "reap" in which:
        code |= reap.main(trials=args.trials)
    if "suite" in which:
        code |= suite.main(tests=args.tests)
    if "faults" in which:
        code |= faults.main(runs=args.fault_runs)
    if "guests" in which:
        code |= guests.main(runs=args.runs)
    if "trims" in which:
        code |= trims.main(runs=args.runs)
    if "libvirt" in which:
        code |= libvirt.main(runs=args.runs, trials=max(10, args.chaos_trials))
    if "rootless" in which:
        code |= rootless.main(runs=max(3, args.runs // 2))
    if "deadlines" in which:
        code |= deadlines.main(runs=max(3, args.runs // 2))
    if "resets" in which:
        code |= resets.main(runs=args.runs, tests=args.trivial_tests)
    if "arches" in which:
        code |= arches.main(runs=args.runs)
    if "networks" in which:
        code |= networks.main(runs=args.runs)
    if "chaos" in which:
        code |= chaos.main(trials=args.chaos_trials)
    if "startup" in which:
        code |= startup.main(runs=args.startup_runs, baseline=args.baseline)
    return code


sys.exit(main())
