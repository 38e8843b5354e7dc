"""A runner for the libvirt tests, run as its own process: a session on the
given libvirt hosts that creates VMs, says ``READY name...`` and waits to be
killed or frozen (or, with ``--keep``, keeps them and ends)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vmlease


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--uri", action="append", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--max-age", type=float, default=6 * 3600.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with vmlease.Session(
        backend="libvirt",
        state_dir=args.state_dir,
        max_age_s=args.max_age,
        backend_options={"uris": args.uri},
    ) as session:
        vms = [session.create() for _ in range(args.count)]
        for vm in vms:
            vm.run(["true"], check=True)
            if args.keep:
                vm.keep("left for the next runner")
        print("READY", *[vm.name for vm in vms], flush=True)
        if args.keep:
            return 0
        while True:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
