"""The machine a VM of a vmlease image runs on, described once for both
QEMU-based backends: the QEMU backend renders it to a command line
(``qemu/_launch.py``), the libvirt backend to domain XML (``libvirt/_domain.py``).

Two layouts:

- a built image (``tiny``, Debian) boots on ``microvm`` with vmlease's
  kernel and initramfs and virtio-mmio devices (1.5 s under TCG, against
  2.2 s on ``pc``); ``tsc_early_khz`` avoids a boot hang on microvm
  ("Unable to calibrate against PIT"). An arm64 one boots the same way on
  ``virt``, whose virtio-mmio slots the kernel finds in the device tree, with
  its console on the PL011 UART (``ttyAMA0``, in the image's command line);
- an imported image boots as it would anywhere, through firmware and its
  own boot loader: on ``q35`` through the BIOS or UEFI (OVMF) on x86_64, on
  ``virt`` through UEFI on arm64; its PCI devices sit in fixed slots, since
  the guest names its network interface by slot (``enp0s4``) and the first
  boot's seed disk must not move it. The UEFI firmware runs from ROM, with
  its variables in memory: nothing of a VM lives outside its directory, and
  a saved state holds the firmware with the rest of the machine.

Either way: one disk, a random-number device, a user-mode network unless
the VM asks for none, a second network interface for each private network
it joins (``lans``), and a virtio-serial bus with the agent's ports (the
owner's, and the visitors' where the image's agent serves it).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from vmlease._spec import Network, VMSpec
from vmlease.backends.guest._agent import AGENT_PORT, VISITOR_PORT
from vmlease.backends.guest.images import Image

__all__ = [
    "MAC",
    "TB_CACHE_MIB",
    "UEFI_PACKAGES",
    "UEFI_ROMS",
    "Lan",
    "Machine",
    "Slot",
    "describe",
    "lan_mac",
    "placeholder_mac",
]

#: QEMU's own default address for a first network card. An imported image's
#: network configuration names the address it was first booted with, and
#: user-mode networks are each VM's own, so every VM may have it.
MAC = "52:54:00:12:34:56"

#: TCG's translation cache grows to 1 GiB unless capped: 64 MiB keeps an idle
#: 512 MB Debian guest's QEMU near 280 MB, against over 1 GB.
TB_CACHE_MIB = 64

#: UEFI firmware that QEMU runs from ROM (``-bios``), by guest architecture:
#: Debian's ``ovmf`` and ``qemu-efi-aarch64``, Arch's and Fedora's edk2 builds,
#: and the edk2 images QEMU's own ``make install`` puts beside its binaries.
UEFI_ROMS = {
    "x86_64": (
        "/usr/share/ovmf/OVMF.fd",
        "/usr/share/qemu/OVMF.fd",
        "/usr/share/edk2/x64/OVMF.fd",
        "/usr/share/edk2-ovmf/x64/OVMF.fd",
    ),
    "aarch64": (
        "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
        "/usr/share/AAVMF/AAVMF_CODE.fd",
        "/usr/share/edk2/aarch64/QEMU_EFI.fd",
        "/usr/share/edk2/aarch64/QEMU_CODE.fd",
        "edk2-aarch64-code.fd",
    ),
}
#: Where each architecture's UEFI firmware comes from on Debian.
UEFI_PACKAGES = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64"}


def lan_mac(address: str) -> str:
    """The MAC of the private interface whose IPv4 address is ``address``: locally
    administered, and made from the address alone (as Docker's are), so that a VM
    taking an address another VM left never finds a different MAC for it in its
    peers' ARP caches, and needs not announce itself."""
    return ":".join(f"{b:02x}" for b in (0x02, 0x76, *ipaddress.IPv4Address(address).packed))


def placeholder_mac(index: int) -> str:
    """The MAC of a private interface in a saved state's key: any VM's differs."""
    return lan_mac(f"0.0.0.{index}")


@dataclass(frozen=True, slots=True)
class Lan:
    """An interface on a private network.

    Attributes:
        socket: where the network's switch takes this VM's link (a Unix socket,
            relative to the VM's directory; the qemu backend's).
        mac: the interface's address.
        port: the switch's TCP port on 127.0.0.1 for the link (libvirt's).
    """

    socket: str
    mac: str
    port: int = 0


class Slot(enum.IntEnum):
    """PCI slots of an imported image's devices (``q35``, or ``virt`` on arm64)."""

    DISK = 3
    NETWORK = 4
    RNG = 5
    SERIAL = 6
    SEED = 8
    LAN = 9  # and the slots after it, one per private network


@dataclass(frozen=True, slots=True)
class Machine:
    """What a VM runs on, whichever backend starts it.

    Attributes:
        name: the VM's name (its hostname too).
        arch: the guest's architecture (``x86_64``, ``aarch64``).
        cpus, memory_mb: its shape.
        firmware: booted through firmware and the image's boot loader (an
            imported image); else booted from ``kernel``/``initrd`` with ``cmdline``.
        uefi: that firmware is UEFI (else the BIOS).
        kvm: hardware virtualisation (``cpu`` is then the host's).
        cpu: the CPU model under TCG (``max`` is QEMU's everything-on model).
        qboot: the ROM a built image boots through on microvm; None for QEMU's default.
        network: the VM's network (``none``, ``user`` or ``restricted``).
        ports: the agent's virtio-serial ports, by name.
        arch: the guest's architecture.
        uefi: a firmware machine boots through UEFI (else the BIOS).
        lans: its interfaces on private networks, in the order the spec names them.
    """

    name: str
    cpus: int
    memory_mb: int
    firmware: bool
    kvm: bool
    cpu: str
    network: Network
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    qboot: str | None = None
    ports: tuple[str, ...] = field(default=(AGENT_PORT,))
    arch: str = "x86_64"
    uefi: bool = False
    lans: tuple[Lan, ...] = ()

    @property
    def machine_type(self) -> str:
        if self.arch == "aarch64":
            return "virt"
        return "q35" if self.firmware else "microvm"

    def slot(self, device: Slot) -> int | None:
        """Where ``device`` goes on the PCI bus; None on microvm (virtio-mmio)."""
        return int(device) if self.firmware else None


def describe(
    name: str,
    spec: VMSpec,
    image: Image,
    *,
    kvm: bool,
    tsc_khz: int | None = None,
    tcg_cpu: str | None = None,
    qboot: str | None = None,
    aslr: bool = False,
    lans: tuple[Lan, ...] = (),
) -> Machine:
    """The machine of VM ``name`` of ``spec`` on ``image``.

    ``tsc_khz``: the host's TSC frequency, given to a microvm guest's kernel;
    ``tcg_cpu`` overrides the image's CPU model under TCG; ``qboot`` is the
    host's qboot ROM (built images boot through it on microvm).

    Under TCG a built image's kernel lays out every process at the same
    addresses (``norandmaps``) unless ``aslr``: TCG finds code it translated
    before by its virtual address, so with randomised layouts every process
    translates the dynamic loader and libc again (measured on QEMU 7.2, Debian
    12: ``true`` 21 ms against 5 ms, a short pipeline 155 to 200 ms against 34,
    and the translation buffer full after 20 commands against a quarter of it).
    """
    firmware = image.boot == "firmware"
    cmdline = ""
    if not firmware:
        # The tiny image's init reads vmlease.name; systemd reads systemd.hostname.
        cmdline = f"{image.cmdline} vmlease.name={name} systemd.hostname={name}"
        if tsc_khz and image.arch == "x86_64":
            cmdline += f" tsc_early_khz={tsc_khz}"
        if not kvm and not aslr:
            cmdline += " norandmaps"
    return Machine(
        name=name,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        firmware=firmware,
        kvm=kvm,
        cpu="host" if kvm else (tcg_cpu or image.tcg_cpu),
        network=spec.network or image.network,
        kernel="" if firmware else str(image.kernel),
        initrd="" if firmware else str(image.initrd),
        cmdline=cmdline,
        qboot=None if firmware or image.arch != "x86_64" else qboot,
        ports=(AGENT_PORT, VISITOR_PORT) if image.serves_visitors else (AGENT_PORT,),
        arch=image.arch,
        uefi=firmware and (image.firmware == "uefi" or image.arch != "x86_64"),
        lans=lans,
    )
