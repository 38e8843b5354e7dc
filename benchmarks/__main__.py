"""Run the benchmarks and print their figures; JSON goes to benchmarks/results/."""

from __future__ import annotations

import argparse
import sys

from benchmarks import spine


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--runs", type=int, default=7, help="boots per P1 variant (at least 5)")
    parser.add_argument("--round-trips", type=int, default=200, help="P4 samples")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5 (the figures are medians of at least 5)")
    return spine.main(runs=args.runs, round_trips=args.round_trips)


sys.exit(main())
