"""One machine description, two renderings: QEMU's arguments and libvirt's XML
must describe the same machine."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmlease._errors import ConfigError
from vmlease._identity import Owner
from vmlease._spec import Network, VMSpec
from vmlease.backends.guest._agent import AGENT_PORT, VISITOR_PORT
from vmlease.backends.guest._machine import MAC, Slot, describe
from vmlease.backends.guest.images import AGENT_PROTOCOL, Image
from vmlease.backends.libvirt._domain import DomainFiles, domain_xml
from vmlease.backends.libvirt._lease import Lease
from vmlease.backends.qemu._accel import tcg_aslr
from vmlease.backends.qemu._launch import Accel, LaunchConfig, find_uefi, qemu_argv

OWNER = Owner(session_id="s", pid=1, start_time=2, boot_id="b", host="h")
FILES = DomainFiles(disk="/pool/d", console="/pool/c", kernel="/pool/k", initrd="/pool/i")


def _image(boot: str, protocol: str | None) -> Image:
    p = Path("/img")
    info = {} if protocol is None else {"agent_protocol": protocol}
    return Image(
        "i", "b", p, p / "k", p / "i", p / "d", "console=ttyS0", 256, "max", 0, info,
        network=Network.USER, boot=boot,
    )  # fmt: skip


def _both(image: Image) -> tuple[list[str], ET.Element]:
    spec = VMSpec(image="i", cpus=2, memory_mb=384)
    argv = qemu_argv(LaunchConfig("qemu", Accel.TCG, 2000000), Path("/vm"), "n", spec, image)
    lease = Lease.new(OWNER, lease_s=60, now=0.0)
    xml = domain_xml("n", spec, image, FILES, lease, tsc_khz=2000000)
    return argv, ET.fromstring(xml)  # noqa: S314 - XML made here


@pytest.mark.parametrize("boot", ["pvh", "firmware"])
def test_qemu_and_libvirt_render_the_same_machine(boot: str) -> None:
    image = _image(boot, AGENT_PROTOCOL)
    argv, dom = _both(image)
    machine = describe("n", VMSpec(image="i"), image, kvm=False, tsc_khz=2000000)
    assert dom.find("os/type").get("machine") == machine.machine_type  # type: ignore[union-attr]
    assert any(a.startswith(machine.machine_type) for a in argv)
    # The same agent ports, by name.
    ports = [a.split("name=")[1] for a in argv if a.startswith("virtserialport,")]
    channels = [c.get("name") for c in dom.iterfind("devices/channel/target")]
    assert ports == channels == [AGENT_PORT, VISITOR_PORT]
    # The same kernel command line, shape and network card.
    if boot == "pvh":
        assert argv[argv.index("-append") + 1] == dom.findtext("os/cmdline")
    assert argv[argv.index("-m") + 1] == dom.findtext("memory") == "384"
    assert argv[argv.index("-smp") + 1] == dom.findtext("vcpu") == "2"
    assert any(f"mac={MAC}" in a for a in argv)
    assert dom.find("devices/interface/mac").get("address") == MAC  # type: ignore[union-attr]
    # The same PCI slots on q35, none on microvm.
    qemu_slots = sorted(int(s, 16) for s in re.findall(r",addr=(0x[0-9a-f]+)", " ".join(argv)))
    xml_slots = sorted(int(a.get("slot", "0"), 16) for a in dom.iter("address") if a.get("slot"))
    if boot == "firmware":
        assert qemu_slots == xml_slots == sorted([Slot.DISK, Slot.NETWORK, Slot.RNG, Slot.SERIAL])
    else:
        assert qemu_slots == xml_slots == []


@pytest.mark.parametrize("protocol", [None, "1", "x"])
def test_an_image_with_an_older_agent_gets_the_owners_port_only(protocol: str | None) -> None:
    argv, dom = _both(_image("pvh", protocol))
    assert [a for a in argv if a.startswith("virtserialport,")] == [
        f"virtserialport,chardev=agent0,name={AGENT_PORT}"
    ]
    assert [c.get("name") for c in dom.iterfind("devices/channel/target")] == [AGENT_PORT]


def test_the_visitors_port_name_is_no_longer_than_the_owners() -> None:
    # libvirt names a channel's socket after its port, under the user's home;
    # a Unix socket path may not exceed 107 bytes.
    assert len(VISITOR_PORT) <= len(AGENT_PORT)


def test_under_tcg_built_images_lay_processes_out_at_fixed_addresses_unless_asked() -> None:
    image = _image("pvh", "3")
    spec = VMSpec(image="i")
    assert "norandmaps" in describe("n", spec, image, kvm=False).cmdline.split()
    assert "norandmaps" not in describe("n", spec, image, kvm=False, aslr=True).cmdline.split()
    assert "norandmaps" not in describe("n", spec, image, kvm=True).cmdline.split()
    with pytest.raises(ConfigError, match="VMLEASE_TCG_ASLR must be 'on' or 'off'"):
        tcg_aslr({"VMLEASE_TCG_ASLR": "maybe"})
    assert tcg_aslr({"VMLEASE_TCG_ASLR": " ON "})
    assert not tcg_aslr({})


def test_an_arm64_image_boots_on_virt_with_its_own_console_and_no_x86_settings() -> None:
    p = Path("/img")
    image = Image(
        "tiny", "b", p, p / "Image", p / "i", p / "d", "console=ttyAMA0", 96, "cortex-a57", 0,
        {"agent_protocol": AGENT_PROTOCOL}, arch="aarch64",
    )  # fmt: skip
    config = LaunchConfig("qemu-system-aarch64", Accel.TCG, None, arch="aarch64", qboot="/q.rom")
    spec = VMSpec(image="tiny", arch="arm64")
    argv = qemu_argv(config, Path("/vm"), "n", spec, image)
    assert argv[argv.index("-M") + 1].startswith("virt,")
    assert argv[argv.index("-cpu") + 1] == "cortex-a57"
    assert "-bios" not in argv
    assert "virtio-blk-device,drive=disk0" in argv
    cmdline = argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in cmdline
    assert "tsc_early_khz" not in describe("n", spec, image, kvm=False, tsc_khz=2000).cmdline


@pytest.mark.parametrize(
    ("arch", "firmware", "machine", "rom"),
    [
        ("x86_64", "uefi", "q35,", "/ovmf.fd"),
        ("aarch64", "uefi", "virt,", "/aavmf.fd"),
        ("x86_64", "bios", "q35,", None),
    ],
)
def test_an_imported_image_boots_through_its_firmware_with_devices_in_fixed_slots(
    arch: str, firmware: str, machine: str, rom: str | None
) -> None:
    p = Path("/img")
    image = Image(
        "cloud", "b", p, p, p, p / "d", "", 256, "max", 0, {"agent_protocol": AGENT_PROTOCOL},
        network=Network.USER, boot="firmware", arch=arch, firmware=firmware,
    )  # fmt: skip
    config = LaunchConfig(f"qemu-system-{arch}", Accel.TCG, None, arch=arch, uefi=rom)
    spec = VMSpec(image="cloud", arch=arch)
    argv = qemu_argv(config, Path("/vm"), "n", spec, image)
    assert argv[argv.index("-M") + 1].startswith(machine)
    assert "-kernel" not in argv
    assert (argv[argv.index("-bios") + 1] if "-bios" in argv else None) == rom
    assert f"virtio-blk-pci,drive=disk0,bootindex=0,addr={Slot.DISK:#x}" in argv
    assert any(
        a.startswith("virtio-net-pci,") and a.endswith(f"addr={Slot.NETWORK:#x}") for a in argv
    )
    # libvirt runs the same firmware from ROM, with no NVRAM file to leave behind.
    lease = Lease.new(OWNER, lease_s=60, now=0.0)
    dom = ET.fromstring(domain_xml("n", spec, image, FILES, lease))  # noqa: S314 - XML made here
    loader = dom.find("os/loader")
    assert (loader is not None) == (rom is not None)
    if loader is not None:
        assert loader.get("type") == "rom"
        assert str(loader.text).endswith(".fd")
    assert dom.find("os/nvram") is None
    assert dom.find("features/acpi") is not None


def test_a_uefi_image_on_a_machine_without_uefi_firmware_is_refused_with_the_package() -> None:
    p = Path("/img")
    image = Image(
        "cloud", "b", p, p, p, p / "d", "", 256, "cortex-a57", 0, {}, boot="firmware",
        arch="aarch64", firmware="uefi",
    )  # fmt: skip
    config = LaunchConfig("qemu-system-aarch64", Accel.TCG, None, arch="aarch64")
    with pytest.raises(ConfigError, match="apt-get install qemu-efi-aarch64"):
        qemu_argv(config, Path("/vm"), "n", VMSpec(image="cloud", arch="arm64"), image)


def test_uefi_firmware_is_the_one_named_or_none_for_an_architecture_without_any() -> None:
    assert find_uefi("qemu", "x86_64", {"VMLEASE_UEFI_X86_64": "/mine.fd"}) == "/mine.fd"
    assert find_uefi("qemu", "riscv64", {}) is None
