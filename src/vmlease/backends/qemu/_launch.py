"""The QEMU command line for a VM: the guest layer's machine description
(``guest/_machine.py``) rendered as QEMU's arguments. The agent's ports are
Unix sockets of QEMU's (1 ms round trips).

Sockets are given as names relative to the VM directory (QEMU runs there),
since a Unix socket path may not exceed 107 bytes; every other path is
absolute, because ``-daemonize`` moves QEMU to ``/`` once it is up.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import ConfigError
from vmlease._spec import Network, VMSpec
from vmlease.backends.guest._agent import AGENT_PORT, VISITOR_PORT
from vmlease.backends.guest._machine import (
    MAC,
    TB_CACHE_MIB,
    UEFI_PACKAGES,
    UEFI_ROMS,
    Lan,
    Machine,
    Slot,
    describe,
    placeholder_mac,
)
from vmlease.backends.guest.images import Image

__all__ = [
    "AGENT_SOCKET",
    "CONSOLE_LOG",
    "DISK",
    "PIDFILE",
    "PORT_SOCKETS",
    "QMP_SOCKET",
    "RAM_ID",
    "VISITOR_SOCKET",
    "Accel",
    "RamFile",
    "console_tail",
    "find_qboot",
    "find_uefi",
    "lan_dir",
    "qemu_argv",
    "render",
    "require_firmware",
    "with_ram",
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


def find_uefi(qemu: str, arch: str, env: Mapping[str, str]) -> str | None:
    """The UEFI firmware ``arch`` guests boot through: ``$VMLEASE_UEFI_<ARCH>``
    (``VMLEASE_UEFI_X86_64``), else the first of ``UEFI_ROMS`` installed (a bare
    name is looked for beside ``qemu``'s own firmware); None if there is none."""
    named = env.get(f"VMLEASE_UEFI_{arch.upper()}")
    if named:
        return named
    beside = Path(qemu).resolve().parent.parent / "share/qemu"
    for rom in UEFI_ROMS.get(arch, ()):
        path = Path(rom) if rom.startswith("/") else beside / rom
        if path.is_file():
            return str(path)
    return None


DISK = "disk.qcow2"
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
VISITOR_SOCKET = "visitor.sock"
#: The socket of each agent port, by the port's name.
PORT_SOCKETS = {AGENT_PORT: AGENT_SOCKET, VISITOR_PORT: VISITOR_SOCKET}
CONSOLE_LOG = "console.log"
PIDFILE = "qemu.pid"
#: The id of the guest's memory backend. Every VM names its memory so (in an
#: anonymous backend unless it is in a file), so a state or snapshot saved by one
#: way of holding memory loads into the other.
RAM_ID = "ram0"


@dataclass(frozen=True, slots=True)
class RamFile:
    """Guest memory held in a file instead of anonymous memory.

    Attributes:
        path: the file, exactly the guest's memory size.
        shared: True while a booted state is being made (the guest writes into
            the file, which becomes the state's memory); False when a VM starts
            from a state: the file is mapped copy-on-write, so the guest's
            writes stay its own and the file is shared, unchanged, by every VM
            started from it.
    """

    path: Path
    shared: bool


def with_ram(argv: list[str], ram: RamFile | None) -> list[str]:
    """``argv`` (as ``render`` made it) with the guest's memory in ``ram``, or as it is."""
    if ram is None:
        return list(argv)
    prefix = f"memory-backend-ram,id={RAM_ID},"
    out = []
    for arg in argv:
        if arg.startswith(prefix):
            share = "on" if ram.shared else "off"
            size = arg[len(prefix) :]
            arg = f"memory-backend-file,id={RAM_ID},{size},mem-path={ram.path},share={share}"
        out.append(arg)
    return out


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
        aslr: keep address-space randomisation in built images' guests under
            TCG (``$VMLEASE_TCG_ASLR=on``); off by default there, since it makes
            TCG translate every process's libraries again (``guest/_machine.py``).
        arch: the guests' architecture, which ``qemu`` emulates or runs.
        uefi: the UEFI firmware imported images of ``arch`` boot through
            (``find_uefi``), or None if the host has none.
    """

    qemu: str
    accel: Accel
    tsc_khz: int | None
    tcg_cpu: str | None = None
    version: str = ""
    qboot: str | None = None
    aslr: bool = False
    arch: str = "x86_64"
    uefi: str | None = None

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
    macs: Sequence[str] = (),
) -> list[str]:
    """The full QEMU command for VM ``name`` in ``vm_dir``.

    ``seed`` is a read-only disk to attach as well (an imported image's
    cloud-init seed, on its first boot). Each private network the spec names is
    an interface whose link is the Unix socket ``lanN/NAME.sock`` (``lanN`` is
    the VM directory's link to the network's directory), with the MAC of the
    same place in ``macs`` (a placeholder where there is none, as in a saved
    state's key).
    """
    lans = tuple(
        Lan(
            f"{lan_dir(index)}/{name}.sock",
            macs[index] if index < len(macs) else placeholder_mac(index),
        )
        for index in range(len(spec.networks))
    )
    machine = describe(
        name,
        spec,
        image,
        kvm=config.accel is Accel.KVM,
        tsc_khz=config.tsc_khz,
        tcg_cpu=config.tcg_cpu,
        qboot=config.qboot,
        aslr=config.aslr,
        lans=lans,
    )
    require_firmware(config, image)
    return render(machine, config.qemu, vm_dir, seed=seed, uefi=config.uefi)


def lan_dir(index: int) -> str:
    """The VM directory's link to the directory of its ``index``-th private network."""
    return f"lan{index}"


def require_firmware(config: LaunchConfig, image: Image) -> None:
    """ConfigError if ``image`` boots through UEFI and this machine has no UEFI
    firmware for it."""
    uefi = image.firmware == "uefi" or image.arch != "x86_64"
    if image.boot == "firmware" and uefi and config.uefi is None:
        raise ConfigError(
            f"{image.name} boots through UEFI, and this machine has no UEFI firmware "
            f"for {image.arch} guests: install it with `apt-get install "
            f"{UEFI_PACKAGES.get(image.arch, 'ovmf')}` (or name its file in "
            f"VMLEASE_UEFI_{image.arch.upper()})"
        )


def console_tail(vm_dir: Path, lines: int) -> str:
    """The last ``lines`` of the VM's console ("" if it has none)."""
    try:
        text = (vm_dir / CONSOLE_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def render(
    machine: Machine, qemu: str, vm_dir: Path, *, seed: Path | None = None, uefi: str | None = None
) -> list[str]:
    """``machine`` as a QEMU command line, run by ``qemu`` in ``vm_dir``; ``uefi`` is
    the firmware a UEFI machine boots through."""
    if machine.kvm:
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        tcg = f"tcg,thread=multi,tb-size={TB_CACHE_MIB}"
        accel = ["-accel", tcg, "-cpu", machine.cpu]
    bus = "pci" if machine.firmware else "device"

    def at(device: Slot) -> str:
        slot = machine.slot(device)
        return "" if slot is None else f",addr={slot:#x}"

    boot: list[str] = []
    if machine.uefi:
        # From ROM, its variables in memory: the firmware keeps nothing outside the
        # VM, and a saved state holds it like the rest of the machine.
        boot = ["-bios", uefi or ""]
    if machine.arch == "aarch64":
        # GICv3 takes more than 8 vCPUs, and is what KVM on arm64 hosts offers.
        platform = ["-M", f"virt,gic-version=3,memory-backend={RAM_ID}"]
        if machine.firmware:
            disk_device = f"virtio-blk-pci,drive=disk0,bootindex=0{at(Slot.DISK)}"
        else:
            boot = ["-kernel", machine.kernel, "-initrd", machine.initrd]
            boot += ["-append", machine.cmdline]
            disk_device = "virtio-blk-device,drive=disk0"
    elif machine.firmware:
        platform = ["-M", f"q35,memory-backend={RAM_ID}"]
        disk_device = f"virtio-blk-pci,drive=disk0,bootindex=0{at(Slot.DISK)}"
    else:
        if machine.qboot:
            # qboot jumps to the PVH entry itself, with no option ROM to load.
            platform = [
                "-M",
                f"microvm,acpi=on,x-option-roms=off,memory-backend={RAM_ID}",
                "-bios",
                machine.qboot,
            ]
        else:
            # SeaBIOS (QEMU 8's default for microvm) boots PVH through pvh.bin,
            # an option ROM: they stay on.
            platform = ["-M", f"microvm,acpi=on,memory-backend={RAM_ID}"]
        boot = ["-kernel", machine.kernel, "-initrd", machine.initrd, "-append", machine.cmdline]
        disk_device = "virtio-blk-device,drive=disk0"
    net: list[str] = []
    if machine.network is not Network.NONE:
        # User-mode networking: no root, no bridges; "restricted" lets nothing out.
        restrict = ",restrict=on" if machine.network is Network.RESTRICTED else ""
        net = [
            "-netdev",
            f"user,id=net0{restrict}",
            "-device",
            f"virtio-net-{bus},netdev=net0,mac={MAC}{at(Slot.NETWORK)}",
        ]
    for index, lan in enumerate(machine.lans):
        slot = machine.slot(Slot.LAN)
        where = "" if slot is None else f",addr={slot + index:#x}"
        net += [
            "-netdev",
            f"stream,id=lan{index},server=off,addr.type=unix,addr.path={lan.socket}",
            "-device",
            f"virtio-net-{bus},netdev=lan{index},mac={lan.mac}{where}",
        ]
    extra: list[str] = []
    if seed is not None:
        extra = [
            "-drive",
            f"id=seed,file={seed},if=none,format=raw,readonly=on",
            "-device",
            f"virtio-blk-{bus},drive=seed{at(Slot.SEED)}",
        ]
    ports: list[str] = []
    for index, port in enumerate(machine.ports):
        ports += [
            "-chardev",
            f"socket,id=agent{index},path={PORT_SOCKETS[port]},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent{index},name={port}",
        ]
    return [
        qemu,
        "-name",
        machine.name,
        *platform,
        *accel,
        "-smp",
        str(machine.cpus),
        "-m",
        str(machine.memory_mb),
        "-object",
        f"memory-backend-ram,id={RAM_ID},size={machine.memory_mb}M",
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
        f"virtio-rng-{bus}{at(Slot.RNG)}",
        *net,
        "-device",
        f"virtio-serial-{bus}{at(Slot.SERIAL)}",
        *ports,
        "-qmp",
        f"unix:{QMP_SOCKET},server=on,wait=off",
        "-pidfile",
        str(vm_dir / PIDFILE),
        "-daemonize",
    ]
