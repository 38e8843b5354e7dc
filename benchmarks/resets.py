"""Resets and starts near the machine's limit: mapped booted states beside streams.

Everything is measured side by side in one run, the two ways interleaved,
medians of ``runs`` (JSON in results/resets.json):

- isolation per trivial test on ``tiny``: a pytest suite of ``tests`` tests
  that each run ``true``, with ``vm`` and with ``worker_vm``; isolation is
  the difference of the two wall times per test (goal: at most 100 ms), for
  mapped states (a reset is a new start) and for streams (a snapshot restore);
- ``debian-12`` (1 vCPU, 512 MB): create from the saved state to ready (goal
  0.25 s); reset to the first command's reply (goal 0.15 s), split into the
  reset itself, by phase (where the time goes), and the first command, against
  the same command a second later (what TCG's retranslation costs);
- the same reset on ``tiny``;
- memory: the summed PSS of 8 Debian VMs started from one state, against one
  VM's alone (goal: at most 2x);
- cold boots of ``tiny`` (warm starts off): how many came up, and how many
  consoles show the TSC calibration failure that hangs some microvm boots
  without ``tsc_early_khz`` (which vmlease sets).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vmlease
from vmlease._paths import image_dir
from vmlease.backends.guest.images import build_debian, find_image
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"
MODES = ("mapped", "stream")
DEBIAN_MB = 512
TRIVIAL = """
import pytest


@pytest.mark.parametrize("n", range(TESTS))
def test_trivial(FIXTURE, n):
    assert FIXTURE.run(["true"]).exit_code == 0
"""


def _backend(state: Path, mode: str, images: Path | None = None) -> QemuBackend:
    env = {**os.environ, "VMLEASE_QEMU_MEMORY": mode}
    return QemuBackend(state_dir=state, image_dir=images, env=env)


def own_images(tmp: Path) -> Path:
    """An image directory of its own (the builds linked in), so that its booted
    states are saved by this benchmark's state directory, with its SSH login, as a
    user's states are saved by the state directory they then use."""
    images = tmp / "images"
    images.mkdir()
    for name in ("tiny", "debian-12"):
        (images / name).symlink_to(find_image(image_dir(), name).path.parent)
    return images


def _pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no PSS for {pid}")


def _pid(state: Path, vm: vmlease.VM) -> int:
    return int((state / "qemu" / vm.name / "qemu.pid").read_text())


def suite_wall(work: Path, fixture: str, mode: str, tests: int) -> float:
    """Wall time of the trivial suite with ``fixture``, states held as ``mode``."""
    project = work / f"{fixture}-{mode}"
    project.mkdir()
    (project / "test_trivial.py").write_text(
        TRIVIAL.replace("FIXTURE", fixture).replace("TESTS", str(tests))
    )
    env = {
        **os.environ,
        "VMLEASE_STATE_DIR": str(work / "state"),
        "VMLEASE_QEMU_MEMORY": mode,
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the trivial suite failed:\n{done.stdout[-3000:]}")
    return wall


def isolation(tests: int, runs: int) -> dict[str, Any]:
    """Per-test cost of ``vm`` over ``worker_vm`` on tiny, for each memory mode."""
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
        for run in range(runs):
            for mode in MODES:
                for fixture in ("vm", "worker_vm"):
                    work = Path(tmp) / f"{run}"
                    work.mkdir(exist_ok=True)
                    walls.setdefault(f"{fixture}_{mode}", []).append(
                        suite_wall(work, fixture, mode, tests)
                    )
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "tests": tests,
        "wall_s": med,
        "per_test_s": {m: (med[f"vm_{m}"] - med[f"worker_vm_{m}"]) / tests for m in MODES},
    }


def _timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def resets(image: str, memory_mb: int, runs: int) -> dict[str, Any]:
    """Reset to the first command: a new start (mapped) against loadvm (stream); and
    a new start in another state directory (another SSH login to set)."""
    out: dict[str, Any] = {}
    phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
        state, other = Path(tmp) / "state", Path(tmp) / "other"
        images = own_images(Path(tmp))
        backends = {m: _backend(state, m, images) for m in MODES}
        backends["other"] = _backend(other, "mapped", images)
        sessions = {
            m: vmlease.Session(backend=b, state_dir=other if m == "other" else state)
            for m, b in backends.items()
        }
        try:
            vms = {m: sessions[m].create(image=image, memory_mb=memory_mb) for m in MODES}
            vms["other"] = sessions["other"].create(image=image, memory_mb=memory_mb)
            vms["stream"].snapshot("clean")
            ways: dict[str, Callable[[], None]] = {
                "mapped": vms["mapped"].reset,
                "stream": lambda: vms["stream"].restore("clean"),
                "other": vms["other"].reset,
            }
            samples: dict[str, list[float]] = {}
            for _ in range(runs):
                for mode in ways:
                    vm = vms[mode]
                    vm.run(["sh", "-c", "echo dirt > /root/dirt"], check=True)
                    reset = _timed(ways[mode])
                    if mode == "mapped":
                        phases.append(backends[mode].start_timings(vm.name))
                    first = _timed(vm.run, ["true"])
                    time.sleep(1.0)
                    later = _timed(vm.run, ["true"])
                    for label, value in (("reset", reset), ("first", first), ("later", later)):
                        samples.setdefault(f"{mode}_{label}", []).append(value)
                    samples.setdefault(f"{mode}_to_first", []).append(reset + first)
            out = {k: statistics.median(v) for k, v in samples.items()}
            out["phases"] = {p: statistics.median(t.get(p, 0.0) for t in phases) for p in phases[0]}
        finally:
            for session in sessions.values():
                session.close()
    return out


def starts(runs: int) -> dict[str, float]:
    """Debian create from the saved state to ready, mapped and stream."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
        state = Path(tmp)
        sessions = {m: vmlease.Session(backend=_backend(state, m), state_dir=state) for m in MODES}
        try:
            for _ in range(runs):
                for mode in MODES:
                    started = time.perf_counter()
                    vm = sessions[mode].create(image="debian-12", memory_mb=DEBIAN_MB)
                    samples.setdefault(mode, []).append(time.perf_counter() - started)
                    vm.delete()
        finally:
            for session in sessions.values():
                session.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def memory(count: int) -> dict[str, Any]:
    """Summed PSS of ``count`` idle Debian VMs of one state, and one VM's alone."""
    out: dict[str, Any] = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
            state = Path(tmp)
            with vmlease.Session(backend=_backend(state, mode), state_dir=state) as session:
                one = session.create(image="debian-12", memory_mb=DEBIAN_MB)
                time.sleep(2)
                alone = _pss_bytes(_pid(state, one))
                more = [
                    session.create(image="debian-12", memory_mb=DEBIAN_MB) for _ in range(count - 1)
                ]
                vms = [one, *more]
                for vm in vms:
                    vm.run(["true"], check=True)
                time.sleep(2)
                total = sum(_pss_bytes(_pid(state, vm)) for vm in vms)
        out[mode] = {"one_mb": alone / 2**20, "total_mb": total / 2**20, "ratio": total / alone}
    return out


def cold_boots(count: int) -> dict[str, Any]:
    """``count`` cold boots of tiny: how many were ready, how long, what their consoles said."""
    ready, times, calibration = 0, [], 0
    with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
        state = Path(tmp)
        backend = QemuBackend(state_dir=state, env={**os.environ, "VMLEASE_QEMU_WARM": "off"})
        with vmlease.Session(backend=backend, state_dir=state, boot_timeout_s=60) as session:
            for _ in range(count):
                started = time.perf_counter()
                try:
                    vm = session.create()
                except vmlease.VMLeaseError:
                    continue
                times.append(time.perf_counter() - started)
                ready += 1
                console = backend.console_tail(vm.name, 400)
                calibration += "Unable to calibrate against PIT" in console
                vm.delete()
    return {
        "boots": count,
        "ready": ready,
        "median_s": statistics.median(times) if times else None,
        "max_s": max(times) if times else None,
        "pit_calibration_failures": calibration,
    }


def _ready_states() -> None:
    """Saved states of both modes for tiny and Debian, as after any earlier run."""
    build_debian(image_dir(), "debian-12")
    with tempfile.TemporaryDirectory(prefix="vmlease-resets-") as tmp:
        for mode in MODES:
            with vmlease.Session(backend=_backend(Path(tmp), mode), state_dir=tmp) as session:
                session.create().delete()
                session.create(image="debian-12", memory_mb=DEBIAN_MB).delete()


def main(*, runs: int, tests: int) -> int:
    _ready_states()
    figures: dict[str, Any] = {"runs": runs}
    figures["isolation"] = isolation(tests, max(1, runs // 3))
    figures["debian_start_s"] = starts(runs)
    figures["debian_reset"] = resets("debian-12", 512, runs)
    figures["tiny_reset"] = resets("tiny", 256, runs)
    figures["memory_8_vms"] = memory(8)
    figures["tiny_cold_boots"] = cold_boots(max(10, runs * 2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resets.json").write_text(json.dumps(figures, indent=2) + "\n")

    iso, start = figures["isolation"], figures["debian_start_s"]
    deb, tiny, mem = figures["debian_reset"], figures["tiny_reset"], figures["memory_8_vms"]
    print(f"== resets: mapped booted states beside streams, medians of {runs}")
    print(f"{'':52}{'mapped':>10}{'stream':>10}{'ratio':>8}  goal")

    def row(label: str, mapped: float, stream: float, goal: str, unit: str = "s") -> None:
        scale, fmt = (1000, ".0f") if unit == "ms" else (1, ".3f")
        print(
            f"{label:52}{mapped * scale:>10{fmt}}{stream * scale:>10{fmt}}"
            f"{mapped / stream:>8.2f}  {goal}"
        )

    per = iso["per_test_s"]
    row(f"tiny: isolation per trivial test, ms ({iso['tests']} tests)", per["mapped"],
        per["stream"], "<= 100 ms", "ms")  # fmt: skip
    row("debian: create from the saved state to ready, s", start["mapped"], start["stream"],
        "<= 0.25 s")  # fmt: skip
    for name, fig in (("debian", deb), ("tiny", tiny)):
        row(f"{name}: reset to the first command's reply, s", fig["mapped_to_first"],
            fig["stream_to_first"], "<= 0.15 s" if name == "debian" else "")  # fmt: skip
        row(f"{name}:   the reset alone, s", fig["mapped_reset"], fig["stream_reset"], "")
        row(f"{name}:   ... from another state directory (its key put), s", fig["other_reset"],
            fig["stream_reset"], "")  # fmt: skip
        row(f"{name}:   its first command, ms", fig["mapped_first"], fig["stream_first"], "",
            "ms")  # fmt: skip
        row(f"{name}:   the same command a second later, ms", fig["mapped_later"],
            fig["stream_later"], "", "ms")  # fmt: skip
        where = ", ".join(f"{p} {t * 1000:.0f}" for p, t in fig["phases"].items())
        print(f"{name}:   the mapped reset by phase, ms: {where}")
    print(
        f"{'debian: 8 VMs of one state, summed PSS, MB':52}{mem['mapped']['total_mb']:>10.0f}"
        f"{mem['stream']['total_mb']:>10.0f}"
        f"{mem['mapped']['total_mb'] / mem['stream']['total_mb']:>8.2f}"
    )
    print(
        f"{'debian:   against one VM alone, x':52}{mem['mapped']['ratio']:>10.2f}"
        f"{mem['stream']['ratio']:>10.2f}{'':8}  <= 2x"
    )
    boots = figures["tiny_cold_boots"]
    print(
        f"tiny cold boots: {boots['ready']} of {boots['boots']} ready (median "
        f"{boots['median_s']:.2f} s, longest {boots['max_s']:.2f} s); consoles showing "
        f"the PIT calibration failure: {boots['pit_calibration_failures']}"
    )
    print(f"(JSON in {RESULTS / 'resets.json'})")
    return 0
