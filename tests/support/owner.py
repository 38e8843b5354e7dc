"""A VM owner for kill and signal tests, run as its own process.

It creates VMs in a session and reports each step on stdout (``SESSION id``,
``CREATING name``, ``LAUNCHED name``, ``READY names...``, ``DELETING name``),
then waits for the test to signal it. The markers come from a QEMU backend
that only adds the printing, so the reaper deletes with the real backend.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vmlease
from vmlease._spec import VMSpec
from vmlease.backends.qemu import QemuBackend


def say(*words: str) -> None:
    print(*words, flush=True)


class MarkingBackend(QemuBackend):
    delete_pause_s = 0.0

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        say("CREATING", name)
        super().create(name, spec, timeout_s=timeout_s)
        say("LAUNCHED", name)

    def delete(self, name: str, *, timeout_s: float = 60.0) -> None:
        say("DELETING", name)
        time.sleep(self.delete_pause_s)  # widens the window for a second signal
        super().delete(name, timeout_s=timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--max-age", type=float, default=6 * 3600.0)
    parser.add_argument("--delete-pause", type=float, default=0.0)
    args = parser.parse_args()
    backend = MarkingBackend(state_dir=args.state_dir)
    backend.delete_pause_s = args.delete_pause
    with vmlease.Session(backend=backend, state_dir=args.state_dir, max_age_s=args.max_age) as s:
        say("SESSION", s.id)
        vms = [s.create() for _ in range(args.count)]
        say("READY", *[vm.name for vm in vms])
        while True:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
