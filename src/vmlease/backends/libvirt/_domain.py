"""A libvirt domain's XML for a VM of a vmlease image: the guest layer's machine
description (``guest/_machine.py``) rendered as libvirt XML, so VMs boot as
under the QEMU backend. The agent's virtio-serial ports are ``unix``
channels and the serial console a ``pty`` logged to a file in the pool, so
both are reachable through libvirt streams from any client, remote ones
included. A second ``unix`` channel, ``org.vmlease.state``, is how a VM
started from a booted state receives its memory (``_states.py``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from vmlease._errors import InvalidSpec
from vmlease._spec import Network, VMSpec
from vmlease.backends.guest._machine import (
    MAC,
    TB_CACHE_MIB,
    UEFI_ROMS,
    Lan,
    Machine,
    Slot,
    describe,
)
from vmlease.backends.guest.images import Image
from vmlease.backends.libvirt._lease import Lease

__all__ = ["QBOOT", "QEMU_NAMESPACE", "STATE_PORT", "DomainFiles", "domain_xml", "lan_alias"]

#: Where Debian's QEMU keeps qboot, on every host until one says otherwise.
QBOOT = "/usr/share/qemu/qboot.rom"

#: libvirt's namespace for QEMU command-line additions.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
#: The channel a VM started from a booted state receives its memory through.
STATE_PORT = "org.vmlease.state"
#: The state channel's chardev connects once at start (to nothing) and then
#: waits this long, in seconds, before trying again: in effect never.
_NEVER_S = 10**8

ET.register_namespace("qemu", QEMU_NAMESPACE)


@dataclass(frozen=True, slots=True)
class DomainFiles:
    """Paths on the host (the pool's), as libvirt gives them for its volumes."""

    disk: str
    console: str
    kernel: str = ""
    initrd: str = ""
    #: The socket path of the state channel (QEMU's migration listener when loading).
    state: str = ""


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(
        parent, tag, {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
    )
    if text is not None:
        child.text = text
    return child


def domain_xml(
    name: str,
    spec: VMSpec,
    image: Image,
    files: DomainFiles,
    lease: Lease,
    *,
    kvm: bool = False,
    emulator: str | None = None,
    tsc_khz: int | None = None,
    tcg_cpu: str | None = None,
    incoming: bool = False,
    qboot: str | None = None,
    lans: tuple[Lan, ...] = (),
) -> str:
    """The XML of VM ``name``'s domain, its lease in its metadata.

    ``lans``: its interfaces on private networks, each a ``client`` interface to
    its switch's TCP port on 127.0.0.1 (``guest/_segments.py``).

    ``qboot``: the host's qboot ROM, which a built image boots through on
    microvm (QEMU 8 and later default to SeaBIOS there, whose guests under
    libvirt 11 powered off at once in most starts); None for QEMU's default.

    ``incoming``: QEMU starts waiting for a migration stream (a booted state)
    instead of running the guest.
    """
    if (spec.network or image.network) is Network.RESTRICTED:
        raise InvalidSpec(
            "the libvirt backend offers network='user' and network='none'; "
            "'restricted' (no traffic out) needs the qemu backend"
        )
    machine = describe(
        name, spec, image, kvm=kvm, tsc_khz=tsc_khz, tcg_cpu=tcg_cpu, qboot=qboot, lans=lans
    )
    return render(
        replace(machine, kernel=files.kernel, initrd=files.initrd),
        files,
        lease,
        emulator=emulator,
        incoming=incoming,
    )


def render(
    machine: Machine,
    files: DomainFiles,
    lease: Lease,
    *,
    emulator: str | None = None,
    incoming: bool = False,
) -> str:
    """``machine`` as a libvirt domain, its kernel and disks at ``files``."""
    root = ET.Element("domain", {"type": "kvm" if machine.kvm else "qemu"})
    _sub(root, "name", machine.name)
    metadata = _sub(root, "metadata")
    metadata.append(ET.fromstring(lease.to_domain_xml()))  # noqa: S314 - made here
    _sub(root, "memory", str(machine.memory_mb), unit="MiB")
    _sub(root, "vcpu", str(machine.cpus))
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch=machine.arch, machine=machine.machine_type)
    if machine.firmware:
        if machine.uefi:
            # Like the qemu backend's -bios: the firmware from ROM, no NVRAM file.
            _sub(os_, "loader", UEFI_ROMS[machine.arch][0], readonly="yes", type="rom")
        _sub(os_, "boot", dev="hd")
    else:
        if machine.qboot:
            _sub(os_, "loader", machine.qboot, readonly="yes", type="rom")
        _sub(os_, "kernel", machine.kernel)
        _sub(os_, "initrd", machine.initrd)
        _sub(os_, "cmdline", machine.cmdline)
    features = _sub(root, "features")
    if machine.arch == "aarch64":
        # QEMU's -M virt,gic-version=3; ACPI on arm64 needs UEFI, which a built image
        # does without (its kernel reads the device tree).
        _sub(features, "gic", version="3")
    if machine.arch != "aarch64" or machine.uefi:
        _sub(features, "acpi")
    if machine.kvm:
        _sub(root, "cpu", mode="host-passthrough")
    else:
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(TB_CACHE_MIB), unit="MiB")
        if machine.cpu == "max":
            _sub(root, "cpu", mode="maximum")  # QEMU's -cpu max, which libvirt names so
        else:
            cpu = _sub(root, "cpu", mode="custom", match="exact")
            _sub(cpu, "model", machine.cpu, fallback="allow")
    # A guest that reboots or crashes ends, as under the qemu backend (-no-reboot).
    for event in ("on_reboot", "on_crash"):
        _sub(root, event, "destroy")
    devices = _sub(root, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)

    def place(device: ET.Element, at: Slot, after: int = 0) -> None:
        slot = machine.slot(at)
        if slot is None:
            _sub(device, "address", type="virtio-mmio")
        else:
            pci = {"domain": "0x0000", "bus": "0x00", "slot": f"{slot + after:#04x}"}
            _sub(device, "address", type="pci", function="0x0", **pci)

    disk = _sub(devices, "disk", type="file", device="disk")
    # Disposable disks: a host crash loses nothing anyone needs, so skip flushes.
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe")
    _sub(disk, "source", file=files.disk)
    _sub(disk, "target", dev="vda", bus="virtio")
    place(disk, Slot.DISK)
    if machine.network is not Network.NONE:
        nic = _sub(devices, "interface", type="user")
        _sub(nic, "mac", address=MAC)
        _sub(nic, "model", type="virtio")
        place(nic, Slot.NETWORK)
    for index, lan in enumerate(machine.lans):
        link = _sub(devices, "interface", type="client")
        _sub(link, "mac", address=lan.mac)
        _sub(link, "source", address="127.0.0.1", port=str(lan.port))
        _sub(link, "model", type="virtio")
        _sub(link, "alias", name=lan_alias(index))
        place(link, Slot.LAN, index)
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    place(rng, Slot.RNG)
    serial_bus = _sub(devices, "controller", type="virtio-serial", index="0")
    place(serial_bus, Slot.SERIAL)
    for port in machine.ports:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=port)
    if files.state:
        state = _sub(devices, "channel", type="unix")
        source = _sub(state, "source", mode="connect", path=files.state)
        _sub(source, "reconnect", enabled="yes", timeout=str(_NEVER_S))
        _sub(state, "target", type="virtio", name=STATE_PORT)
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=files.console, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    if incoming:
        commandline = _sub(root, f"{{{QEMU_NAMESPACE}}}commandline")
        for arg in ("-incoming", "defer"):
            _sub(commandline, f"{{{QEMU_NAMESPACE}}}arg", value=arg)
    return ET.tostring(root, encoding="unicode")


def lan_alias(index: int) -> str:
    """The QEMU id of a VM's interface on its ``index``-th private network."""
    return f"ua-lan{index}"


def volume_xml(name: str, capacity: int, fmt: str, backing: str | None = None) -> str:
    """A storage volume's XML; ``backing`` makes it a qcow2 overlay of that path."""
    root = ET.Element("volume")
    _sub(root, "name", name)
    _sub(root, "capacity", str(capacity), unit="bytes")
    target = _sub(root, "target")
    _sub(target, "format", type=fmt)
    perms = _sub(target, "permissions")
    _sub(perms, "mode", "0600")
    if backing is not None:
        store = _sub(root, "backingStore")
        _sub(store, "path", backing)
        _sub(store, "format", type="qcow2")
    return ET.tostring(root, encoding="unicode")


def pool_xml(name: str, path: Path | str, *, owner: tuple[int, int] | None = None) -> str:
    """A directory pool's XML: its directory 0700, owned by ``owner`` (uid, gid),
    the user the host runs QEMU as, which must reach the volumes and make the
    state channels' sockets there."""
    root = ET.Element("pool", {"type": "dir"})
    _sub(root, "name", name)
    target = _sub(root, "target")
    _sub(target, "path", str(path))
    perms = _sub(target, "permissions")
    _sub(perms, "mode", "0700")
    if owner is not None:
        _sub(perms, "owner", str(owner[0]))
        _sub(perms, "group", str(owner[1]))
    return ET.tostring(root, encoding="unicode")
