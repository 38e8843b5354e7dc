"""Choosing the accelerator: KVM where it really works, TCG otherwise.

``/dev/kvm`` being there proves little: on some hosts (nested virtualisation
without support) QEMU aborts when it sets up the CPU, or the guest hangs. So
the probe runs a few instructions under KVM with the CPU model VMs will use
and requires QEMU to exit as they ask within a short deadline: on x86_64 a
512-byte boot sector writing to ``isa-debug-exit``, on arm64 a kernel of four
instructions asking the firmware interface (PSCI) to power off. The answer is
cached per boot, QEMU version and architecture, so the probe runs once per
host boot. ``VMLEASE_QEMU_ACCEL=kvm|tcg`` overrides it.

KVM runs only the host's own architecture: a guest of another is emulated,
without a probe.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from vmlease._errors import BackendUnavailable, ConfigError
from vmlease._procfs import boot_id, host_tsc_khz
from vmlease._runner import Completed, Runner, find_program
from vmlease._spec import host_arch
from vmlease.backends.qemu._launch import Accel, LaunchConfig, find_qboot, find_uefi

__all__ = [
    "EMULATOR_PACKAGES",
    "LaunchConfigs",
    "choose_accel",
    "emulator",
    "probe_config",
    "probe_kvm",
    "require_program",
]

PROBE_TIMEOUT_S = 2.0
#: KVM slower than this many times TCG on the probe (and over the floor) is not used.
SLOW_FACTOR = 5.0
SLOW_FLOOR_S = 0.5
#: Part of the cached answer's key: a changed probe asks again.
_PROBE_VERSION = 3
# mov al, 0x41; out 0xf4, al; hlt; jmp $-1 -- QEMU exits with (0x41 << 1) | 1.
_BOOT_SECTOR = bytes([0xB0, 0x41, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
# mov w0, #8; movk w0, #0x8400, lsl #16 (PSCI SYSTEM_OFF); hvc #0; b . -- QEMU exits 0.
_ARM64_OFF = struct.pack("<4I", 0x52800100, 0x72B08000, 0xD4000002, 0x14000000)
#: How QEMU exits once the probe's guest has run, by architecture.
_EXPECTED_EXIT = {"x86_64": 131, "aarch64": 0}


def _run_boot_sector(
    qemu: str, runner: Runner, accel: str, timeout_s: float, arch: str = "x86_64"
) -> Completed:
    with tempfile.TemporaryDirectory(prefix="vmlease-kvm-probe-") as tmp:
        if arch == "aarch64":
            kernel = Path(tmp) / "probe.bin"
            kernel.write_bytes(_ARM64_OFF)
            cpu = "host" if accel == "kvm" else "cortex-a57"
            machine = ["-M", "virt", "-m", "16", "-display", "none", "-nodefaults"]
            argv = [qemu, "-accel", accel, "-cpu", cpu, *machine, "-no-user-config"]
            return runner([*argv, "-kernel", str(kernel)], timeout_s=timeout_s)
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_BOOT_SECTOR.ljust(510, b"\0") + b"\x55\xaa")
        return runner(
            [
                qemu,
                "-accel",
                accel,
                "-cpu",
                "host" if accel == "kvm" else "qemu64",
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


def probe_kvm(
    qemu: str,
    runner: Runner,
    timeout_s: float = PROBE_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    device: Path = Path("/dev/kvm"),
    arch: str = "x86_64",
) -> tuple[bool, str]:
    """Boot a boot sector under KVM, and under TCG to compare; returns (works, reason).

    KVM must run it, and not far slower than emulation does: under some nested
    hypervisors a KVM guest runs, but every VM exit costs so much that a Linux
    guest takes minutes to boot where TCG takes seconds. Such a host starts even
    this guest more than ``SLOW_FACTOR`` times slower than TCG does.
    """
    if not device.exists():
        return False, f"{device} is missing (no KVM module, or virtualisation is off)"
    if not os.access(device, os.R_OK | os.W_OK):
        return False, (
            f"{device} is not accessible to you; to use KVM, open it to group kvm "
            f"(`sudo chgrp kvm {device} && sudo chmod 660 {device}`, or a udev rule) "
            "and join the group: `sudo usermod -aG kvm $USER`, then log in again"
        )
    started = clock()
    done = _run_boot_sector(qemu, runner, "kvm", timeout_s, arch)
    kvm_s = clock() - started
    if done.returncode is None:
        return False, f"a KVM guest did not finish within {timeout_s:g} s"
    if done.returncode != _EXPECTED_EXIT[arch]:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return False, f"QEMU could not run a KVM guest: {last[0]}"
    started = clock()
    emulated = _run_boot_sector(qemu, runner, "tcg", timeout_s, arch)
    tcg_s = clock() - started
    if emulated.returncode == _EXPECTED_EXIT[arch] and kvm_s > max(
        SLOW_FLOOR_S, SLOW_FACTOR * tcg_s
    ):
        return False, (
            f"a KVM guest ran, but took {kvm_s:.2f} s where emulation took {tcg_s:.2f} s "
            "(nested virtualisation without hardware support?)"
        )
    return True, "a KVM guest ran"


def choose_accel(
    qemu: str,
    qemu_version: str,
    runner: Runner,
    cache_dir: Path,
    env: Mapping[str, str],
    arch: str = "x86_64",
) -> tuple[Accel, str]:
    """The accelerator to use for ``arch`` guests, and why."""
    if arch != host_arch():
        return Accel.TCG, f"emulated: KVM runs only this machine's architecture ({host_arch()})"
    forced = env.get("VMLEASE_QEMU_ACCEL", "").strip().lower()
    if forced:
        if forced not in tuple(Accel):
            raise ConfigError(f"VMLEASE_QEMU_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return Accel(forced), "set by VMLEASE_QEMU_ACCEL"
    if arch not in _EXPECTED_EXIT:
        return Accel.TCG, f"vmlease has no KVM probe for {arch}"
    cache = cache_dir / f".accel-{os.getuid()}.json"  # KVM access differs by user
    key = f"{boot_id()}|{qemu_version}|{arch}|{_PROBE_VERSION}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return Accel(cached["accel"]), str(cached["reason"]) + " (probed earlier this boot)"
    except (OSError, ValueError, KeyError):
        pass
    works, reason = probe_kvm(qemu, runner, arch=arch)
    accel = Accel.KVM if works else Accel.TCG
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "accel": accel, "reason": reason}))
        tmp.replace(cache)
    except OSError:
        pass  # the probe will simply run again
    return accel, reason


_INSTALL = {
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-system-aarch64": "apt-get install qemu-system-arm",
    "qemu-img": "apt-get install qemu-utils",
}


#: The Debian package of each architecture's system emulator.
EMULATOR_PACKAGES = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}


def emulator(arch: str, env: Mapping[str, str]) -> str:
    """The system emulator for ``arch`` guests: ``$VMLEASE_QEMU_<ARCH>``
    (``VMLEASE_QEMU_AARCH64``), else ``$VMLEASE_QEMU`` for this machine's own
    architecture, else ``qemu-system-<arch>``."""
    named = env.get(f"VMLEASE_QEMU_{arch.upper()}")
    if not named and arch == host_arch():
        named = env.get("VMLEASE_QEMU")
    return named or f"qemu-system-{arch}"


def require_program(program: str, env: Mapping[str, str]) -> str:
    """Where QEMU's ``program`` is, or BackendUnavailable saying how to install it."""
    path = find_program(program, env)
    if path is None:
        name = Path(program).name
        default = next((p for p in _INSTALL if p == name), None) or (
            "qemu-img" if "img" in name else "qemu-system-x86_64"
        )
        how = _INSTALL[default]
        hint = "" if program == default else f" (or correct the name {program!r} you gave)"
        raise BackendUnavailable(f"{program} not found: install it with `{how}`{hint}")
    return path


def probe_config(
    qemu: str, run: Runner, probes: Path, env: Mapping[str, str], arch: str = "x86_64"
) -> tuple[LaunchConfig, str]:
    """How VMs are launched on this host: the emulator's version, the accelerator
    (KVM when the probe, cached in ``probes``, says it works), the TSC frequency
    and the firmware; and why that accelerator."""
    done = run([qemu, "--version"], timeout_s=10)
    if done.returncode != 0:
        raise BackendUnavailable(f"{qemu} --version failed: {done.stderr.strip()}")
    version = done.stdout.splitlines()[0] if done.stdout else "?"
    accel, reason = choose_accel(qemu, version, run, probes, env, arch)
    x86 = arch == "x86_64"
    config = LaunchConfig(
        qemu=qemu,
        accel=accel,
        tsc_khz=host_tsc_khz() if x86 else None,
        # A CPU model is one architecture's: VMLEASE_QEMU_CPU is for this machine's.
        tcg_cpu=(env.get("VMLEASE_QEMU_CPU") or None) if arch == host_arch() else None,
        version=version,
        qboot=find_qboot(qemu) if x86 else None,
        aslr=tcg_aslr(env),
        arch=arch,
        uefi=find_uefi(qemu, arch, env),
    )
    return config, reason


def tcg_aslr(env: Mapping[str, str]) -> bool:
    """Whether built images' guests keep address-space randomisation under TCG:
    ``$VMLEASE_TCG_ASLR`` (``on`` or ``off``, default ``off``)."""
    setting = env.get("VMLEASE_TCG_ASLR", "off").strip().lower()
    if setting not in ("on", "off"):
        raise ConfigError(f"VMLEASE_TCG_ASLR must be 'on' or 'off', not {setting!r}")
    return setting == "on"


class LaunchConfigs:
    """Each architecture's launch settings, probed when first asked for.

    Args:
        qemu: the emulator for this machine's own architecture.
        run: runs the probes.
        probes: where probe answers are kept (called when first needed: the image
            cache may not exist yet when the backend is made).
        env: settings.
    """

    def __init__(
        self, qemu: str, run: Runner, probes: Callable[[], Path], env: Mapping[str, str]
    ) -> None:
        self._qemu = qemu
        self._run = run
        self._probes = probes
        self._env = env
        self._lock = threading.Lock()
        self._found: dict[str, tuple[LaunchConfig, str]] = {}

    def emulator(self, arch: str) -> str:
        """The emulator ``arch`` guests run in, as the user named it."""
        return self._qemu if arch == host_arch() else emulator(arch, self._env)

    def get(self, arch: str) -> tuple[LaunchConfig, str]:
        """``arch``'s settings, and why its accelerator is the one it is."""
        with self._lock:
            if arch not in self._found:
                qemu = require_program(self.emulator(arch), self._env)
                self._found[arch] = probe_config(qemu, self._run, self._probes(), self._env, arch)
            return self._found[arch]
