"""arm64 guests, emulated on this x86_64 host, beside x86_64 ones.

Side by side in one run, the two architectures interleaved, medians (JSON in
results/arches.json):

- cold boot to ready (warm starts off): ``debian-12`` (1 vCPU, 512 MB) and
  ``tiny``;
- ``debian-12`` created from its saved booted state to ready (goal for arm64:
  at most 1/15 of its cold boot), and a reset to the first command's reply;
- ``run(["true"])`` as the host sees it, against what the guest itself
  spends spawning ``true`` (a shell loop of 50, timed inside).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import vmlease
from vmlease._paths import image_dir
from vmlease.backends.guest.images import build_debian, build_tiny, cache_name
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"
ARCHES = ("x86_64", "aarch64")
DEBIAN_MB = 512
#: A shell loop inside the guest: nanoseconds per spawn of /bin/true.
_SPAWN = (
    "i=0; s=$(date +%s%N); while [ $i -lt 50 ]; do /bin/true; i=$((i + 1)); done; "
    "e=$(date +%s%N); echo $(((e - s) / 50))"
)


def _images(tmp: Path) -> Path:
    """An image directory of this benchmark's own, the builds linked in: its saved
    booted states start empty and are its own."""
    images = tmp / "images"
    images.mkdir()
    for name in ("tiny", "debian-12"):
        for arch in ARCHES:
            folder = cache_name(name, arch)
            (images / folder).symlink_to(image_dir() / folder)
    return images


def _session(state: Path, images: Path, *, warm: bool) -> vmlease.Session:
    backend = QemuBackend(state_dir=state, image_dir=images, warm_start=warm, env=os.environ)
    return vmlease.Session(backend=backend, state_dir=state)


def _timed_create(session: vmlease.Session, image: str, arch: str, mb: int) -> float:
    started = time.perf_counter()
    vm = session.create(image=image, arch=arch, memory_mb=mb)
    took = time.perf_counter() - started
    vm.delete()
    return took


def cold(runs: int) -> dict[str, dict[str, float]]:
    """Boots to ready with no saved state, the architectures interleaved."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-arches-") as tmp:
        session = _session(Path(tmp) / "state", _images(Path(tmp)), warm=False)
        try:
            for _ in range(runs):
                for image, mb in (("debian-12", DEBIAN_MB), ("tiny", 256)):
                    for arch in ARCHES:
                        took = _timed_create(session, image, arch, mb)
                        samples.setdefault(f"{image} {arch}", []).append(took)
        finally:
            session.close()
    return _medians(samples)


def warm(runs: int) -> dict[str, dict[str, float]]:
    """Debian from its saved state to ready; a reset to the first reply; run(true)."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-arches-") as tmp:
        session = _session(Path(tmp) / "state", _images(Path(tmp)), warm=True)
        try:
            vms = {}
            for arch in ARCHES:  # the first of each saves its state
                vms[arch] = session.create(image="debian-12", arch=arch, memory_mb=DEBIAN_MB)
            for _ in range(runs):
                for arch in ARCHES:
                    took = _timed_create(session, "debian-12", arch, DEBIAN_MB)
                    samples.setdefault(f"start {arch}", []).append(took)
                    vm = vms[arch]
                    vm.run(["sh", "-c", "echo dirt > /root/dirt"], check=True)
                    started = time.perf_counter()
                    vm.reset()
                    vm.run(["true"], check=True)
                    samples.setdefault(f"reset {arch}", []).append(time.perf_counter() - started)
            for arch in ARCHES:
                vm = vms[arch]
                for _ in range(max(50, runs)):
                    started = time.perf_counter()
                    vm.run(["true"], check=True)
                    samples.setdefault(f"run {arch}", []).append(time.perf_counter() - started)
                for _ in range(runs):
                    ns = int(vm.run(["sh", "-c", _SPAWN], check=True).stdout.strip())
                    samples.setdefault(f"spawn {arch}", []).append(ns / 1e9)
        finally:
            session.close()
    return _medians(samples)


def _medians(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``{"what arch": [...]}`` as ``{what: {arch: median}}``."""
    out: dict[str, dict[str, float]] = {}
    for key, values in samples.items():
        what, arch = key.rsplit(" ", 1)
        out.setdefault(what, {})[arch] = statistics.median(values)
    return out


def main(*, runs: int) -> int:
    for arch in ARCHES:
        build_tiny(image_dir(), arch=arch)
        build_debian(image_dir(), "debian-12", arch=arch)
    cold_runs = max(3, runs // 2)
    figures: dict[str, Any] = {"runs": runs, "cold_runs": cold_runs}
    figures["cold_s"] = cold(cold_runs)
    figures.update(warm(runs))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "arches.json").write_text(json.dumps(figures, indent=2) + "\n")

    print(f"== arm64 beside x86_64 under TCG: medians of {runs} ({cold_runs} for cold boots)")
    print(f"{'':48}{'x86_64':>10}{'arm64':>10}{'ratio':>8}  goal")

    def row(label: str, fig: dict[str, float], goal: str = "", scale: float = 1.0) -> None:
        x86, arm = fig["x86_64"] * scale, fig["aarch64"] * scale
        print(f"{label:48}{x86:>10.3f}{arm:>10.3f}{arm / x86:>8.2f}  {goal}")

    cold_s = figures["cold_s"]
    row("debian-12: cold boot to ready, s", cold_s["debian-12"])
    row("tiny: cold boot to ready, s", cold_s["tiny"])
    row("debian-12: start from the saved state, s", figures["start"])
    share = {a: figures["start"][a] / cold_s["debian-12"][a] for a in ARCHES}
    row("debian-12:   as a share of its cold boot", share, "arm64 <= 1/15 (0.067)")
    row("debian-12: reset to the first command's reply, s", figures["reset"])
    row("debian-12: run(['true']), ms", figures["run"], "", 1000)
    row("debian-12:   the guest's own spawn of true, ms", figures["spawn"], "", 1000)
    print(f"(JSON in {RESULTS / 'arches.json'})")
    return 0
