"""Choosing the accelerator: KVM where it really works, TCG otherwise.

``/dev/kvm`` being there proves little: on some hosts (nested virtualisation
without support) QEMU aborts when it sets up the CPU, or the guest hangs. So
the probe boots a 512-byte boot sector under KVM with the CPU model VMs will
use and requires it to exit through ``isa-debug-exit`` within a short
deadline. The answer is cached per boot and QEMU version, so the probe runs
once per host boot. ``VMLEASE_QEMU_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vmlease._errors import ConfigError
from vmlease._procfs import boot_id
from vmlease._runner import Runner
from vmlease.backends.qemu._launch import Accel

__all__ = ["choose_accel", "probe_kvm"]

PROBE_TIMEOUT_S = 2.0
# mov al, 0x41; out 0xf4, al; hlt; jmp $-1 -- QEMU exits with (0x41 << 1) | 1.
_BOOT_SECTOR = bytes([0xB0, 0x41, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_EXPECTED_EXIT = 131


def probe_kvm(qemu: str, runner: Runner, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot a boot sector under KVM; returns (works, reason)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="vmlease-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_BOOT_SECTOR.ljust(510, b"\0") + b"\x55\xaa")
        done = runner(
            [
                qemu,
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-M",
                "pc",
                "-m",
                "16",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive",
                f"file={disk},format=raw,if=ide",
            ],
            timeout_s=timeout_s,
        )
    if done.returncode == _EXPECTED_EXIT:
        return True, "a KVM guest ran"
    if done.returncode is None:
        return False, f"a KVM guest did not finish within {timeout_s:g} s"
    last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return False, f"QEMU could not run a KVM guest: {last[0]}"


def choose_accel(
    qemu: str, qemu_version: str, runner: Runner, cache_dir: Path, env: Mapping[str, str]
) -> tuple[Accel, str]:
    """The accelerator to use and why."""
    forced = env.get("VMLEASE_QEMU_ACCEL", "").strip().lower()
    if forced:
        if forced not in tuple(Accel):
            raise ConfigError(f"VMLEASE_QEMU_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return Accel(forced), "set by VMLEASE_QEMU_ACCEL"
    cache = cache_dir / "accel.json"
    key = f"{boot_id()}|{qemu_version}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return Accel(cached["accel"]), str(cached["reason"]) + " (probed earlier this boot)"
    except (OSError, ValueError, KeyError):
        pass
    works, reason = probe_kvm(qemu, runner)
    accel = Accel.KVM if works else Accel.TCG
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "accel": accel, "reason": reason}))
        tmp.replace(cache)
    except OSError:
        pass  # the probe will simply run again
    return accel, reason
