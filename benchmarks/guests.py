"""Real guests (debian-12): boots, starts from saved states, resets, commands, memory.

Printed side by side in one run, medians of ``runs`` unless said (JSON in
results/guests.json). "Ready" is what a VM's create waits for: the agent
answers and, inside the guest, systemd is up and sshd is active. The bare
baseline runs the very same QEMU command line without vmlease and waits for
the console's login prompt, which the serial getty prints once boot is done.

- image build from an empty cache (once: it downloads from the archive), and
  a rebuild that finds it up to date (median);
- cold create to ready, against the bare boot (target at most 1.1x);
- create from the saved state to ready (target at most 1/15 of cold), and to
  the first successful ``ssh true``;
- reset by snapshot to the first command's reply, at 512 MB (target 0.5 s);
- ``vm.run(["true"])`` against ``ssh true`` with a fresh connection (target
  10x) and over a persistent one (ControlMaster);
- QEMU's RSS per idle guest, booted and started from a saved state (target
  at most 350 MB for a 512 MB guest started from a saved state);
- ``apt-get install`` of a small package (after ``apt-get update``), once.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import vmlease
from benchmarks.spine import bare_disk
from vmlease._paths import image_dir
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import build_debian, find_image
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._launch import qemu_argv

RESULTS = Path(__file__).parent / "results"
IMAGE = "debian-12"
MEMORY_MB = 512


def _rss_mb(state: Path, name: str) -> float:
    pid = int((state / "qemu" / name / "qemu.pid").read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _bare_boot(tmp: Path) -> float:
    """The same QEMU command, run directly: seconds to the console's login prompt."""
    image = find_image(image_dir(), IMAGE)
    backend = QemuBackend(state_dir=tmp)
    config = backend.launch_config()
    backend.close()
    vm_dir = tmp / "bare"
    shutil.rmtree(vm_dir, ignore_errors=True)
    vm_dir.mkdir(parents=True)
    bare_disk(image, vm_dir)
    argv = [
        a
        for a in qemu_argv(config, vm_dir, "bare", VMSpec(IMAGE, 1, MEMORY_MB), image)
        if a != "-daemonize"
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=vm_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        console = vm_dir / "console.log"
        while time.monotonic() - started < 300:
            if console.exists() and b"login:" in console.read_bytes():
                return time.monotonic() - started
            time.sleep(0.05)
        raise TimeoutError("the bare boot never reached the login prompt")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(vm_dir, ignore_errors=True)


def _ssh_true(info: vmlease.VM) -> float:
    argv = info.ssh.argv(["true"])
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return time.monotonic() - started


def main(*, runs: int) -> int:
    figures: dict[str, Any] = {}
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "cold_s",
            "bare_s",
            "warm_s",
            "warm_to_ssh_s",
            "reset_s",
            "run_true_s",
            "ssh_fresh_s",
            "ssh_persistent_s",
            "rss_cold_mb",
            "rss_warm_mb",
            "rebuild_s",
        )
    }
    with tempfile.TemporaryDirectory(prefix="vmlease-guests-") as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        images.mkdir()
        started = time.monotonic()
        build_debian(images, IMAGE)
        figures["build_s"] = time.monotonic() - started
        for _ in range(runs):
            started = time.monotonic()
            build_debian(images, IMAGE)
            samples["rebuild_s"].append(time.monotonic() - started)
        build_debian(image_dir(), IMAGE)
        state = tmp / "state"
        cold_backend = QemuBackend(state_dir=state, warm_start=False)
        with vmlease.Session(backend=cold_backend, state_dir=state, boot_timeout_s=300) as cold:
            for i in range(runs):
                if i % 2:
                    samples["bare_s"].append(_bare_boot(tmp))
                started = time.monotonic()
                vm = cold.create(image=IMAGE, memory_mb=MEMORY_MB)
                samples["cold_s"].append(time.monotonic() - started)
                time.sleep(2)
                samples["rss_cold_mb"].append(_rss_mb(state, vm.name))
                vm.delete()
                if not i % 2:
                    samples["bare_s"].append(_bare_boot(tmp))
        with vmlease.Session(state_dir=state, boot_timeout_s=300) as warm:
            warm.create(image=IMAGE, memory_mb=MEMORY_MB).delete()  # a saved state exists
            for _ in range(runs):
                started = time.monotonic()
                vm = warm.create(image=IMAGE, memory_mb=MEMORY_MB)
                samples["warm_s"].append(time.monotonic() - started)
                while True:
                    try:
                        subprocess.run(
                            vm.ssh.argv(["true"]), check=True, capture_output=True, timeout=60
                        )
                        break
                    except subprocess.CalledProcessError:
                        time.sleep(0.05)
                samples["warm_to_ssh_s"].append(time.monotonic() - started)
                time.sleep(2)
                samples["rss_warm_mb"].append(_rss_mb(state, vm.name))
                vm.delete()
            vm = warm.create(image=IMAGE, memory_mb=MEMORY_MB)
            vm.snapshot("clean")
            for _ in range(runs):
                vm.run(["sh", "-c", "echo x > /root/dirt"])
                started = time.monotonic()
                vm.restore("clean")
                vm.run(["true"])
                samples["reset_s"].append(time.monotonic() - started)
            for _ in range(max(runs, 20)):
                started = time.monotonic()
                vm.run(["true"])
                samples["run_true_s"].append(time.monotonic() - started)
            for _ in range(runs):
                samples["ssh_fresh_s"].append(_ssh_true(vm))
            info = vm.ssh
            control = tmp / "cm"
            master = [
                "-o",
                "ControlMaster=auto",
                "-o",
                f"ControlPath={control}",
                "-o",
                "ControlPersist=60",
            ]
            base = info.argv(["true"])
            persistent = [base[0], *master, *base[1:]]
            subprocess.run(persistent, check=True, capture_output=True, timeout=60)
            for _ in range(max(runs, 10)):
                started = time.monotonic()
                subprocess.run(persistent, check=True, capture_output=True, timeout=60)
                samples["ssh_persistent_s"].append(time.monotonic() - started)
            subprocess.run(
                [base[0], *master, "-O", "exit", *base[1:-1]],
                capture_output=True,
                timeout=30,
                check=False,
            )
            started = time.monotonic()
            vm.run(["apt-get", "update", "-q"], check=True, timeout_s=600)
            figures["apt_update_s"] = time.monotonic() - started
            started = time.monotonic()
            vm.run(
                ["apt-get", "install", "-y", "-q", "tree"],
                check=True,
                timeout_s=600,
                env={"DEBIAN_FRONTEND": "noninteractive"},
            )
            figures["apt_install_s"] = time.monotonic() - started
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    figures.update(med)
    figures["cold_vs_bare"] = med["cold_s"] / med["bare_s"]
    figures["warm_vs_cold"] = med["warm_s"] / med["cold_s"]
    figures["run_vs_ssh_fresh"] = med["ssh_fresh_s"] / med["run_true_s"]
    rows = [
        ("image build from an empty cache (once)", f"{figures['build_s']:.1f} s", ""),
        ("rebuild, up to date", f"{med['rebuild_s']:.2f} s", ""),
        (
            "cold create to ready",
            f"{med['cold_s']:.1f} s",
            f"bare QEMU to login prompt {med['bare_s']:.1f} s: {figures['cold_vs_bare']:.2f}x",
        ),
        (
            "create from the saved state to ready",
            f"{med['warm_s']:.2f} s",
            f"1/{1 / figures['warm_vs_cold']:.0f} of cold",
        ),
        ("... to the first ssh true", f"{med['warm_to_ssh_s']:.2f} s", ""),
        (f"reset by snapshot to first command, {MEMORY_MB} MB", f"{med['reset_s']:.3f} s", ""),
        (
            'vm.run(["true"])',
            f"{med['run_true_s'] * 1000:.1f} ms",
            f"{figures['run_vs_ssh_fresh']:.0f}x faster than fresh ssh",
        ),
        ("ssh true, fresh connection", f"{med['ssh_fresh_s'] * 1000:.0f} ms", ""),
        ("ssh true, persistent connection", f"{med['ssh_persistent_s'] * 1000:.0f} ms", ""),
        ("QEMU RSS, idle, booted", f"{med['rss_cold_mb']:.0f} MB", ""),
        ("QEMU RSS, idle, from the saved state", f"{med['rss_warm_mb']:.0f} MB", "target 350 MB"),
        ("apt-get update (once)", f"{figures['apt_update_s']:.1f} s", ""),
        ("apt-get install tree (once)", f"{figures['apt_install_s']:.1f} s", ""),
    ]
    print(f"== guests: {IMAGE}, 1 vCPU, {MEMORY_MB} MB, medians of {runs}")
    for label, value, note in rows:
        print(f"{label:44}{value:>12}  {note}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guests.json").write_text(json.dumps({"runs": runs, **figures}, indent=2) + "\n")
    return 0
