"""P1 (cold create to first reply vs a bare QEMU boot) and P4 (``true`` round trip).

Also a create from a saved booted state (the default) against the same bare boot.

P1 runs the two variants in pairs, in a random order within each pair, so
a slow spell on the machine hits both alike. The bare boot is the very
command vmlease builds for a VM (same kernel, initramfs, disk overlay,
devices and accelerator), run in the foreground with its serial console on a
pipe, timed from process start to the guest's "up" marker; nothing of
vmlease (ledger, overlay creation, daemonizing, channel handshake) is in it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import vmlease
from vmlease._paths import image_dir
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image, find_image
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._launch import qemu_argv

RESULTS = Path(__file__).parent / "results"
MARKER = b"vmlease: guest "
SETTLE_S = 0.5


def bare_disk(image: Image, vm_dir: Path) -> None:
    """A qcow2 overlay on the image's disk, for a VM run without vmlease."""
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image.disk),
            "-F",
            "qcow2",
            str(vm_dir / "disk.qcow2"),
        ],
        check=True,
    )


def bare_boot(backend: QemuBackend, work: Path, index: int) -> float:
    """Seconds from starting QEMU to the guest's marker on the serial console."""
    image = find_image(image_dir(), "tiny")
    vm_dir = work / f"bare{index}"
    vm_dir.mkdir()
    bare_disk(image, vm_dir)
    argv = qemu_argv(backend.launch_config(), vm_dir, f"bare{index}", VMSpec(), image)
    # Same VM, in the foreground, console on stdout instead of a file.
    argv = [a for a in argv if a != "-daemonize"]
    argv[argv.index("-serial") + 1] = "stdio"
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=vm_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while MARKER not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("bare QEMU exited before the marker")
            seen += chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def vmlease_create(session: vmlease.Session) -> float:
    """Seconds from session.create() to the first command's reply."""
    start = time.perf_counter()
    vm = session.create(image="tiny")
    vm.run(["true"])
    took = time.perf_counter() - start
    vm.delete()
    return took


def main(*, runs: int, round_trips: int) -> int:
    with tempfile.TemporaryDirectory(prefix="vmlease-bench-") as tmp:
        work = Path(tmp)
        # P1 is about booting: its session has starts from booted states off.
        cold_backend = QemuBackend(state_dir=work / "state", warm_start=False)
        with (
            vmlease.Session(state_dir=work / "state") as session,
            vmlease.Session(backend=cold_backend, state_dir=work / "state") as cold,
        ):
            backend = session.backend
            assert isinstance(backend, QemuBackend)
            backend.launch_config()
            vmlease_create(session)  # saves the booted state if there is none yet
            vmlease_create(cold)  # warms the page cache for the boots
            bare: list[float] = []
            ours: list[float] = []
            warm: list[float] = []
            order = random.Random(runs)
            for i in range(runs):
                # Boot times on this kind of host swing by about 0.2 s from one
                # boot to the next; a fixed order could hand one variant every
                # slow turn. So each round runs in a random order, after a pause.
                variants = ["bare", "ours", "warm"]
                order.shuffle(variants)
                for variant in variants:
                    time.sleep(SETTLE_S)
                    if variant == "bare":
                        bare.append(bare_boot(backend, work, i))
                    elif variant == "ours":
                        ours.append(vmlease_create(cold))
                    else:
                        warm.append(vmlease_create(session))

            vm = session.create(image="tiny")
            for _ in range(20):
                vm.run(["true"])
            trips = []
            for _ in range(round_trips):
                start = time.perf_counter()
                vm.run(["true"])
                trips.append(time.perf_counter() - start)
            vm.delete()
            accel = backend.launch_config().accel

    p1_bare = statistics.median(bare)
    p1_ours = statistics.median(ours)
    p1_warm = statistics.median(warm)
    p4 = statistics.median(trips)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "accel": accel},
        "P1": {
            "runs": runs,
            "bare_qemu_boot_to_marker_s": {"median": p1_bare, "samples": bare},
            "vmlease_create_to_first_reply_s": {"median": p1_ours, "samples": ours},
            "ratio": p1_ours / p1_bare,
            "target_ratio": 1.1,
            "vmlease_create_from_booted_state_to_first_reply_s": {
                "median": p1_warm,
                "samples": warm,
            },
        },
        "P4": {
            "round_trips": round_trips,
            "true_round_trip_ms": {
                "median": p4 * 1000,
                "p90": statistics.quantiles(trips, n=10)[-1] * 1000,
                "max": max(trips) * 1000,
            },
            "target_ms": 5.0,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spine.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"vmlease spine benchmarks ({accel}, medians; JSON in {RESULTS / 'spine.json'})")
    print(f"{'figure':<48}{'vmlease':>12}{'baseline':>12}{'ratio':>8}{'target':>10}")
    print(
        f"{'P1 cold create to first reply (s), n=' + str(runs):<48}"
        f"{p1_ours:>12.3f}{p1_bare:>12.3f}{p1_ours / p1_bare:>8.2f}{'<= 1.10x':>10}"
    )
    print(
        f"{'create from a booted state to first reply (s)':<48}"
        f"{p1_warm:>12.3f}{p1_bare:>12.3f}{p1_warm / p1_bare:>8.2f}{'':>10}"
    )
    p4_label = 'P4 run(["true"]) round trip (ms), n=' + str(round_trips)
    print(f"{p4_label:<48}{p4 * 1000:>12.2f}{'':>12}{'':>8}{'<= 5 ms':>10}")
    return 0
