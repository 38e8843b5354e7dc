"""The libvirt backend beside direct QEMU, in one run on one machine.

A private libvirtd (tests/support/libvirtd.py) is the host, reached over its
Unix socket and over ``qemu+ssh://`` through a throwaway sshd on 127.0.0.1.
Figures, medians of ``runs`` with variants alternating so drift falls on all
alike:

- create to first reply (``create``, ``wait_ready``, one command), tiny image,
  1 vCPU, 256 MB: libvirt from the host's booted state (its default) over the
  Unix socket (QEMU reads the state from a passed descriptor) and over
  ``qemu+tcp://`` (the state goes through a stream), libvirt booting, direct
  QEMU booting, direct QEMU from its saved booted state (its default);
- reset (restore a snapshot, then one command): libvirt vs direct QEMU;
- delete: libvirt vs direct QEMU;
- a runner's SIGKILL to its VMs gone (``trials``, median and max), through the
  Unix socket and through ``qemu+ssh://``.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.libvirtd import LibvirtDaemon, SSHGate

from vmlease._paths import image_dir
from vmlease._spec import VMSpec
from vmlease.backends import Backend
from vmlease.backends.guest.images import build_tiny
from vmlease.backends.libvirt import LibvirtBackend
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"
RUNNER = Path(__file__).parents[1] / "tests" / "support" / "libvirt_runner.py"


def _first_reply(backend: Backend, name: str) -> float:
    """Seconds from create to the first command's answer; the VM is left running."""
    start = time.monotonic()
    backend.create(name, VMSpec())
    backend.wait_ready(name, 120)
    backend.exec(name, ["true"], stdin=None, env=None, cwd=None, timeout_s=30)
    return time.monotonic() - start


def _timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def _domains(uri: str) -> set[str]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


def _kill_trial(state: Path, runner_uri: str, watch_uri: str) -> float:
    """Start a runner with one VM, SIGKILL it, and time until its domain is gone."""
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), str(state), "--uri", runner_uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"runner failed: {line!r}")
    names = set(line.split()[1:])
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    proc.stdout.close()
    while names & _domains(watch_uri):
        if time.monotonic() - killed > 60:
            raise RuntimeError(f"{names} still there 60 s after SIGKILL")
        time.sleep(0.02)
    return time.monotonic() - killed


def _stats(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "max_s": max(values), "n": len(values)}


def main(runs: int = 7, trials: int = 10) -> int:
    build_tiny(image_dir())
    daemon = LibvirtDaemon(cache=image_dir().parent / "test-data" / "libvirt-cache").start()
    gate = SSHGate(daemon).start()
    work = Path(tempfile.mkdtemp(prefix="vmlease-bench-libvirt-"))
    figures: dict[str, object] = {"runs": runs, "trials": trials}
    try:
        lv = LibvirtBackend(uris=[daemon.unix_uri], state_dir=work / "lv")
        lv_tcp = LibvirtBackend(uris=[daemon.tcp_uri], state_dir=work / "lv-tcp")
        lv_cold = LibvirtBackend(uris=[daemon.unix_uri], state_dir=work / "lvc", warm_start=False)
        cold = QemuBackend(state_dir=work / "cold", warm_start=False)
        warm = QemuBackend(state_dir=work / "warm")
        variants: dict[str, Backend] = {
            "libvirt, warm (unix)": lv,
            "libvirt, warm (tcp)": lv_tcp,
            "libvirt, booting": lv_cold,
            "qemu, booting": cold,
            "qemu, warm": warm,
        }
        # Warm-up: libvirt uploads the image and saves the host's booted state (the
        # tcp runner fetches its copy), QEMU saves its booted state.
        for i, backend in enumerate(variants.values()):
            _first_reply(backend, f"warmup-{i}")
            backend.delete(f"warmup-{i}")
        create: dict[str, list[float]] = {k: [] for k in variants}
        delete: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(runs):
            for j, (label, backend) in enumerate(variants.items()):
                name = f"b{i}-{j}"
                create[label].append(_first_reply(backend, name))
                start = time.monotonic()
                backend.delete(name)
                delete[label].append(time.monotonic() - start)
        reset: dict[str, list[float]] = {"libvirt": [], "qemu": []}
        for label, backend in (("libvirt", lv), ("qemu", warm)):
            _first_reply(backend, f"reset-{label}")
            backend.snapshot(f"reset-{label}", "clean")
        for _ in range(runs):
            for label, backend in (("libvirt", lv), ("qemu", warm)):
                name = f"reset-{label}"

                def once(b: Backend = backend, n: str = name) -> None:
                    b.restore(n, "clean")
                    b.exec(n, ["true"], stdin=None, env=None, cwd=None, timeout_s=30)

                reset[label].append(_timed(once))
        for label, backend in (("libvirt", lv), ("qemu", warm)):
            backend.delete(f"reset-{label}")
        for backend in variants.values():
            backend.close()
        assert not lv_tcp.hosts.hosts[0].passes_files
        kills: dict[str, list[float]] = {"unix": [], "ssh": []}
        for i in range(trials):
            kills["unix"].append(_kill_trial(work / f"k{i}", daemon.unix_uri, daemon.unix_uri))
            kills["ssh"].append(_kill_trial(work / f"s{i}", gate.uri, daemon.unix_uri))
    finally:
        gate.stop()
        daemon.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    med = {k: statistics.median(v) for k, v in create.items()}
    print(f"== libvirt: tiny, 1 vCPU, 256 MB, TCG; medians of {runs}, variants alternating")
    print(f"{'create to first reply':28}{'median':>9}{'vs qemu booting':>17}{'vs qemu warm':>14}")
    for label, value in med.items():
        print(
            f"  {label:26}{value:>8.2f}s{value / med['qemu, booting']:>16.2f}x"
            f"{value / med['qemu, warm']:>13.2f}x"
        )
    print("  (target: libvirt at most 1.3x direct QEMU, each started its default way)")
    rmed = {k: statistics.median(v) for k, v in reset.items()}
    print(f"{'reset (restore + command)':28}")
    for label, value in rmed.items():
        print(f"  {label:26}{value:>8.3f}s{value / rmed['qemu']:>16.2f}x (vs qemu)")
    dmed = {k: statistics.median(v) for k, v in delete.items()}
    print(f"{'delete':28}")
    for label, value in dmed.items():
        print(f"  {label:26}{value:>8.2f}s")
    print(f"runner SIGKILL to its VM gone ({trials} trials; target: max 10 s)")
    for label, values in kills.items():
        print(f"  {label:26}median {statistics.median(values):.2f} s, max {max(values):.2f} s")
    figures.update(
        create_to_first_reply={k: _stats(v) for k, v in create.items()},
        ratio_libvirt_warm_vs_qemu_warm=med["libvirt, warm (unix)"] / med["qemu, warm"],
        ratio_libvirt_tcp_warm_vs_qemu_warm=med["libvirt, warm (tcp)"] / med["qemu, warm"],
        ratio_libvirt_booting_vs_qemu_booting=med["libvirt, booting"] / med["qemu, booting"],
        reset={k: _stats(v) for k, v in reset.items()},
        delete={k: _stats(v) for k, v in delete.items()},
        sigkill_to_gone={k: _stats(v) for k, v in kills.items()},
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "libvirt.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(max(v) <= 10.0 for v in kills.values()) else 1
