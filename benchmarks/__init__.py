"""vmlease benchmarks: `python -m benchmarks` (or scripts/bench) prints the figures."""
