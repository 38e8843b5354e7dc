"""A model test suite in several modes: fresh VM per test, worker_vm, vm (a reset by a new
start from a mapped booted state, and by a snapshot restore where states are streams).

Each model test does what the seeds' tests do, on a small scale: copy a
config file into the VM, run a "deployment step" (a shell loop of about
0.25 s), read the file back and check it. The suite runs in a pytest
subprocess per mode, timed from start to exit (so pytest's start-up and the
first boot count against every mode), and reports:

- wall time, seconds in VM operations (create, boot, snapshot, restore,
  delete, from the plugin's --vm-report) and in test bodies (call phases);
- efficiency: test-body seconds / (wall seconds x workers);
- per-test overhead of the plugin with a reused VM: the setup + teardown
  of worker_vm tests after the first, against tests that use no fixture;
- restore to first command reply, measured directly through the API.

Targets: worker_vm efficiency >= 95%; vm >= 97% (mapped states) and >= 5x
faster than fresh per test; restore <= 0.25 s; overhead <= 1 ms.

The baseline, a fresh VM per test, boots every VM as the seeds' suites did
(``VMLEASE_QEMU_WARM=off``). VMs otherwise start from the image's saved
booted state, which is made before the modes run; ``worker_vm`` also runs
once with no saved state (an image directory of its own), the first run
after an image is built.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import vmlease
from vmlease._paths import image_dir
from vmlease.backends.guest.images import find_image
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"

CONFTEST = """
import json, os


def pytest_runtest_logreport(report):
    with open(os.environ["MODEL_PHASES"], "a") as f:
        f.write(json.dumps([report.nodeid, report.when, report.duration]) + "\\n")
"""

# FIXTURE and MARK are filled in per mode; the control tests use tmp_path like
# the model tests, so the difference in setup + teardown is the plugin's.
TESTS = """
import pytest

STEP = "i=0; while [ $i -lt 15000 ]; do i=$((i+1)); done; echo deployed > /root/deployed"


@pytest.mark.parametrize("n", range(TESTS))
MARK
def test_deploy_step(FIXTURE, tmp_path, n):
    vm = FIXTURE
    conf = tmp_path / "app.conf"
    conf.write_text(f"instance={n}\\n")
    vm.put(conf, "/etc/app.conf")
    vm.run(["sh", "-c", STEP], check=True)
    assert vm.run(["cat", "/etc/app.conf"], check=True).stdout == f"instance={n}\\n"
    assert vm.run(["cat", "/root/deployed"], check=True).stdout == "deployed\\n"


@pytest.mark.parametrize("n", range(20))
def test_control(tmp_path, n):
    pass
"""

FRESH = "@pytest.mark.vm(fresh=True)"
MODES = {
    # mode: (label, fixture, marker, environment)
    "fresh": ("fresh VM per test, booted", "vm", FRESH, {"VMLEASE_QEMU_WARM": "off"}),
    "fresh_warm": ("fresh VM per test", "vm", FRESH, {}),
    "worker_vm_first": ("worker_vm, no saved state", "worker_vm", "", {"FIRST_RUN": "1"}),
    "worker_vm": ("worker_vm", "worker_vm", "", {}),
    "vm": ("vm (reset by a new start)", "vm", "", {}),
    "vm_stream": ("vm (snapshot restore)", "vm", "", {"VMLEASE_QEMU_MEMORY": "stream"}),
}
TARGETS = {"worker_vm": ">= 95%", "vm": ">= 97%"}


def run_mode(mode: str, tests: int, work: Path) -> dict[str, Any]:
    project = work / mode
    project.mkdir()
    _label, fixture, mark, extra = MODES[mode]
    (project / "conftest.py").write_text(CONFTEST)
    (project / "test_model.py").write_text(
        TESTS.replace("FIXTURE", fixture).replace("MARK", mark).replace("TESTS", str(tests))
    )
    phases = project / "phases.jsonl"
    report = project / "vmlease.json"
    env = {
        **os.environ,
        "MODEL_PHASES": str(phases),
        "VMLEASE_STATE_DIR": str(work / "state"),
    }
    if extra.get("FIRST_RUN"):
        # The built image in an image directory of its own: no saved states there.
        images = project / "images"
        images.mkdir()
        (images / "tiny").symlink_to(find_image(image_dir(), "tiny").path.parent)
        env["VMLEASE_IMAGE_DIR"] = str(images)
    else:
        env.update(extra)
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--vm-report={report}",
            "test_model.py",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} suite failed:\n{done.stdout[-3000:]}")
    rows = [json.loads(line) for line in phases.read_text().splitlines()]
    body = sum(d for node, when, d in rows if when == "call" and "deploy" in node)
    fixture_s: dict[str, float] = {}
    for node, when, d in rows:
        if when in ("setup", "teardown"):
            fixture_s[node] = fixture_s.get(node, 0.0) + d
    model = [v for k, v in fixture_s.items() if "deploy" in k]
    control = [v for k, v in fixture_s.items() if "control" in k]
    figures = json.loads(report.read_text())
    return {
        "tests": tests,
        "wall_s": wall,
        "test_body_s": body,
        "vm_ops_s": figures.get("vm_ops_s", 0.0),
        "efficiency": body / wall,
        "per_test_wall_s": wall / tests,
        "setup_teardown_s_median_after_first": statistics.median(model[1:]),
        "control_setup_teardown_s_median": statistics.median(control),
        "vmlease": figures,
    }


def restore_to_first_reply(samples: int = 15) -> list[float]:
    times = []
    with (
        tempfile.TemporaryDirectory(prefix="vmlease-bench-") as tmp,
        vmlease.Session(state_dir=tmp) as session,
    ):
        vm = session.create()
        vm.snapshot("clean")
        for _ in range(samples):
            vm.run(["sh", "-c", "echo dirty > /root/dirty"], check=True)
            start = time.perf_counter()
            vm.restore("clean")
            vm.run(["true"], check=True)
            times.append(time.perf_counter() - start)
    return times


def save_booted_state() -> None:
    """Make sure the image's booted state exists, as it does after any earlier run."""
    for mode in ("mapped", "stream"):
        with tempfile.TemporaryDirectory(prefix="vmlease-bench-") as tmp:
            env = {**os.environ, "VMLEASE_QEMU_MEMORY": mode}
            backend = QemuBackend(state_dir=Path(tmp), env=env)
            with vmlease.Session(backend=backend, state_dir=tmp) as session:
                session.create().delete()


def main(*, tests: int) -> int:
    save_booted_state()
    with tempfile.TemporaryDirectory(prefix="vmlease-suite-") as tmp:
        work = Path(tmp)
        modes = {m: run_mode(m, tests, work) for m in MODES}
    restores = restore_to_first_reply()
    fresh, worker, clean = modes["fresh"], modes["worker_vm"], modes["vm"]
    overhead = worker["setup_teardown_s_median_after_first"]
    control = worker["control_setup_teardown_s_median"]
    speedup = fresh["wall_s"] / clean["wall_s"]
    result = {
        "modes": modes,
        "vm_speedup_over_fresh": speedup,
        "restore_to_first_reply_s": {"median": statistics.median(restores), "samples": restores},
        "plugin_overhead_per_test_s": {
            "net": overhead - control,
            "worker_vm_setup_teardown": overhead,
            "without_vm_setup_teardown": control,
        },
        "targets": {
            "worker_vm_efficiency": 0.95,
            "vm_efficiency": 0.97,
            "vm_speedup_over_fresh": 5.0,
            "restore_to_first_reply_s": 0.25,
            "plugin_overhead_per_test_s": 0.001,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model suite: {tests} tests per mode, 1 worker (JSON in {RESULTS / 'suite.json'})")
    print(
        f"{'mode':<28}{'wall s':>8}{'VM ops s':>10}{'bodies s':>10}{'efficiency':>12}{'target':>9}"
    )
    for name, m in modes.items():
        print(
            f"{MODES[name][0]:<28}{m['wall_s']:>8.1f}{m['vm_ops_s']:>10.1f}"
            f"{m['test_body_s']:>10.1f}{m['efficiency']:>11.1%}{TARGETS.get(name, ''):>9}"
        )
    print(
        f"vm is {speedup:.1f}x faster than a fresh VM per test booted (target >= 5x), "
        f"{modes['fresh_warm']['wall_s'] / clean['wall_s']:.1f}x faster than one per test "
        "started from the saved state"
    )
    print(
        f"restore to first command reply: median {statistics.median(restores):.3f} s "
        f"of {len(restores)} (target <= 0.25 s)"
    )
    print(
        f"plugin overhead per test, reused VM: {(overhead - control) * 1000:.2f} ms "
        f"(setup+teardown {overhead * 1000:.2f} ms, the same tests without a VM "
        f"{control * 1000:.2f} ms; target <= 1 ms)"
    )
    return 0
