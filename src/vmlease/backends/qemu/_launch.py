"""The QEMU command line for a VM: microvm, PVH kernel, virtio-mmio devices.

Figures behind the choices are in docs/architecture.md: ``-M microvm`` with a
PVH ``vmlinux`` boots in about 1.5 s under TCG, against 2.2 s for ``-M pc``;
``tsc_early_khz`` avoids a boot hang on microvm ("Unable to calibrate against
PIT"); the command channel is a virtio-serial port (1 ms round trips).

Sockets are given as names relative to the VM directory (QEMU runs there),
since a Unix socket path may not exceed 107 bytes; every other path is
absolute, because ``-daemonize`` moves QEMU to ``/`` once it is up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from vmlease._spec import Network, VMSpec
from vmlease.backends.guest._agent import AGENT_PORT
from vmlease.backends.guest.images import Image

__all__ = [
    "AGENT_SOCKET",
    "CONSOLE_LOG",
    "DISK",
    "PIDFILE",
    "QMP_SOCKET",
    "Accel",
    "find_qboot",
    "qemu_argv",
]

#: Where distributions put QEMU's firmware, after the folder beside the binary's own.
_FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/local/share/qemu")


def find_qboot(qemu: str) -> str | None:
    """qboot's ROM for ``qemu``, if installed. Debian's QEMU 7.2 boots microvm
    through it by default; from QEMU 8 the default is SeaBIOS, which is slower
    and needs option ROMs, so built images ask for qboot by name."""
    beside = Path(qemu).resolve().parent.parent / "share/qemu"
    for folder in (str(beside), *_FIRMWARE_DIRS):
        rom = Path(folder) / "qboot.rom"
        if rom.is_file():
            return str(rom)
    return None


DISK = "disk.qcow2"
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
CONSOLE_LOG = "console.log"
PIDFILE = "qemu.pid"


class Accel(enum.StrEnum):
    """How QEMU runs guest code."""

    KVM = "kvm"  # hardware virtualisation
    TCG = "tcg"  # software emulation


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Host-wide launch settings.

    Attributes:
        qemu: the emulator binary.
        accel: ``kvm`` or ``tcg``.
        tsc_khz: host TSC frequency for ``tsc_early_khz``, if known.
        tcg_cpu: a CPU model that overrides the image's choice under TCG
            (``$VMLEASE_QEMU_CPU``), or None.
        version: the first line of ``qemu --version``.
        qboot: qboot's ROM, the firmware built images boot through on microvm
            (``find_qboot``); None to let QEMU pick its own.
    """

    qemu: str
    accel: Accel
    tsc_khz: int | None
    tcg_cpu: str | None = None
    version: str = ""
    qboot: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "accel", Accel(self.accel))  # "kvm" or "tcg" given as text


def qemu_argv(
    config: LaunchConfig,
    vm_dir: Path,
    name: str,
    spec: VMSpec,
    image: Image,
    *,
    seed: Path | None = None,
) -> list[str]:
    """The full QEMU command for VM ``name`` in ``vm_dir``.

    ``seed`` is a read-only disk to attach as well (an imported image's
    cloud-init seed, on its first boot).
    """
    if config.accel is Accel.KVM:
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        # The translation cache grows to 1 GiB unless capped: 64 MiB keeps an idle
        # 512 MB Debian guest's QEMU near 280 MB, against over 1 GB.
        accel = ["-accel", "tcg,thread=multi,tb-size=64", "-cpu", config.tcg_cpu or image.tcg_cpu]
    if image.boot == "firmware":
        # An imported image boots as it would anywhere: the BIOS, its boot loader,
        # its kernel and initramfs, on a PC with PCI devices.
        bus = "pci"
        # Fixed slots: the guest names its network interface by slot (enp0s4), and
        # the first boot's extra seed disk must not move it.
        at = ["", ",addr=0x4", ",addr=0x5", ",addr=0x6", ",addr=0x8"]
        machine = ["-M", "q35"]
        boot: list[str] = []
        disk_device = "virtio-blk-pci,drive=disk0,bootindex=0,addr=0x3"
    else:
        # The tiny image's init reads vmlease.name; systemd reads systemd.hostname.
        cmdline = f"{image.cmdline} vmlease.name={name} systemd.hostname={name}"
        if config.tsc_khz:
            cmdline += f" tsc_early_khz={config.tsc_khz}"
        bus = "device"
        at = [""] * 5
        if config.qboot:
            # qboot jumps to the PVH entry itself, with no option ROM to load.
            machine = ["-M", "microvm,acpi=on,x-option-roms=off", "-bios", config.qboot]
        else:
            # SeaBIOS (QEMU 8's default for microvm) boots PVH through pvh.bin,
            # an option ROM: they stay on.
            machine = ["-M", "microvm,acpi=on"]
        boot = ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline]
        disk_device = "virtio-blk-device,drive=disk0"
    network = spec.network or image.network
    net: list[str] = []
    if network is not Network.NONE:
        # User-mode networking: no root, no bridges; "restricted" lets nothing out.
        restrict = ",restrict=on" if network is Network.RESTRICTED else ""
        net = [
            "-netdev",
            f"user,id=net0{restrict}",
            "-device",
            f"virtio-net-{bus},netdev=net0{at[1]}",
        ]
    extra: list[str] = []
    if seed is not None:
        extra = [
            "-drive",
            f"id=seed,file={seed},if=none,format=raw,readonly=on",
            "-device",
            f"virtio-blk-{bus},drive=seed{at[4]}",
        ]
    return [
        config.qemu,
        "-name",
        name,
        *machine,
        *accel,
        "-smp",
        str(spec.cpus),
        "-m",
        str(spec.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *boot,
        "-chardev",
        # Appended to: a restart keeps the earlier boots' messages, and a VM
        # started from a booted state keeps the boot log it was saved with.
        f"file,id=console,path={vm_dir / CONSOLE_LOG},append=on",
        "-serial",
        "chardev:console",
        # Disposable disks: a host crash loses nothing anyone needs, so skip flushes.
        "-drive",
        f"id=disk0,file={vm_dir / DISK},if=none,format=qcow2,cache=unsafe",
        "-device",
        disk_device,
        *extra,
        "-device",
        f"virtio-rng-{bus}{at[2]}",
        *net,
        "-device",
        f"virtio-serial-{bus}{at[3]}",
        "-chardev",
        f"socket,id=agent,path={AGENT_SOCKET},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-qmp",
        f"unix:{QMP_SOCKET},server=on,wait=off",
        "-pidfile",
        str(vm_dir / PIDFILE),
        "-daemonize",
    ]
