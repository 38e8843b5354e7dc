"""The libvirt backend's policy without a daemon: leases, domain XML, URIs, placement."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from vmlease._errors import BackendUnavailable, ConfigError, InvalidSpec
from vmlease._identity import Owner
from vmlease._procfs import host_tsc_khz
from vmlease._spec import Network, VMSpec
from vmlease.backends.guest.images import Image
from vmlease.backends.libvirt._backend import LibvirtBackend, parse_uris
from vmlease.backends.libvirt._domain import (
    QEMU_NAMESPACE,
    STATE_PORT,
    DomainFiles,
    domain_xml,
    pool_xml,
)
from vmlease.backends.libvirt._domains import tsc_khz
from vmlease.backends.libvirt._hosts import RESERVE_BYTES, Host, Hosts, ImageVolumes, _qemu_user
from vmlease.backends.libvirt._lease import NAMESPACE, Lease, parse_lease
from vmlease.backends.libvirt._states import state_key

OWNER = Owner(session_id="abcdefghij", pid=42, start_time=7, boot_id="b-1", host="ci-7")
MiB = 2**20


def tree(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 - XML this module made


def test_a_lease_survives_the_round_trip_through_libvirt() -> None:
    lease = Lease.new(OWNER, lease_s=120, now=1000.0)
    assert (lease.created, lease.expires, lease.kept, lease.mark) == (1000.0, 1120.0, False, "")
    # libvirt hands the element back without its prefix; a domain's XML has it namespaced.
    assert parse_lease(lease.to_xml()) == lease
    namespaced = tree(lease.to_domain_xml())
    assert namespaced.tag == f"{{{NAMESPACE}}}lease"
    assert parse_lease(lease.to_domain_xml()) == lease
    kept = replace(lease, kept=True, mark="vmlease:abcdefghij:3:ff")
    assert parse_lease(kept.to_xml()) == kept


def test_expiry_and_renewal() -> None:
    lease = Lease.new(OWNER, lease_s=120, now=1000.0)
    assert not lease.expired(1119.9)
    assert lease.expired(1120.0)
    assert lease.renewed(2000.0).expires == 2000.0
    assert lease.renewed(2000.0).created == 1000.0


@pytest.mark.parametrize(
    "text",
    [None, "", "not xml", "<other/>", "<lease><session>x</session></lease>", "<lease><created>x"],
)
def test_anything_but_a_whole_lease_is_no_lease(text: str | None) -> None:
    assert parse_lease(text) is None


def _image(boot: str = "pvh", network: Network = Network.NONE) -> Image:
    return Image(
        name="tiny",
        build_id="b" * 16,
        path=Path("/images/tiny/b"),
        kernel=Path("/images/tiny/b/vmlinux"),
        initrd=Path("/images/tiny/b/initrd.cpio"),
        disk=Path("/images/tiny/b/disk.qcow2"),
        cmdline="console=ttyS0 quiet",
        min_memory_mb=96,
        tcg_cpu="qemu64",
        size_bytes=1,
        info={},
        network=network,
        boot=boot,
    )


FILES = DomainFiles(
    disk="/pool/vm.disk.qcow2", console="/pool/vm.console", kernel="/pool/k", initrd="/pool/i"
)


def test_a_built_image_boots_on_microvm_with_its_lease_in_the_metadata() -> None:
    lease = Lease.new(OWNER, lease_s=120, now=1000.0)
    root = tree(domain_xml("vm-1", VMSpec(memory_mb=300), _image(), FILES, lease, tsc_khz=2000000))
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "microvm"  # type: ignore[union-attr]
    assert "vmlease.name=vm-1" in root.findtext("os/cmdline", "")
    assert "tsc_early_khz=2000000" in root.findtext("os/cmdline", "")
    assert root.find("memory").text == "300"  # type: ignore[union-attr]
    assert parse_lease(ET.tostring(root.find("metadata")[0], encoding="unicode")) == lease  # type: ignore[index]
    assert root.find("features/tcg/tb-cache").text == "64"  # type: ignore[union-attr]
    assert root.find("devices/interface") is None  # the image's network: none
    channel = root.find("devices/channel/target")
    assert channel is not None
    assert channel.get("name") == "org.vmlease.agent"
    assert root.find("devices/disk/source").get("file") == FILES.disk  # type: ignore[union-attr]
    assert {a.get("type") for a in root.iter("address")} == {"virtio-mmio"}


def test_a_built_image_names_qboot_as_its_loader_where_the_host_has_it() -> None:
    lease = Lease.new(OWNER, lease_s=120, now=1000.0)
    with_qboot = tree(domain_xml("vm-1", VMSpec(), _image(), FILES, lease, qboot="/q/qboot.rom"))
    loader = with_qboot.find("os/loader")
    assert loader is not None
    assert (loader.text, loader.get("type"), loader.get("readonly")) == (
        "/q/qboot.rom",
        "rom",
        "yes",
    )
    assert tree(domain_xml("vm-1", VMSpec(), _image(), FILES, lease)).find("os/loader") is None
    firmware = domain_xml(
        "vm-2", VMSpec(), _image("firmware", Network.USER), FILES, lease, qboot="/q"
    )
    assert tree(firmware).find("os/loader") is None  # an imported image boots its own BIOS


def test_an_imported_image_boots_through_the_bios_with_its_devices_in_fixed_slots() -> None:
    lease = Lease.new(OWNER, lease_s=120)
    root = tree(
        domain_xml("vm-2", VMSpec(), _image("firmware", Network.USER), FILES, lease, kvm=True)
    )
    assert root.get("type") == "kvm"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.find("os/kernel") is None
    assert root.find("features/tcg") is None
    nic = root.find("devices/interface/address")
    assert nic is not None
    assert nic.get("slot") == "0x04"


def _state_key(name: str, spec: VMSpec, *, version: int = 7_002_000, kvm: bool = False) -> str:
    class Conn:
        def getVersion(self) -> int:  # noqa: N802 - libvirt's name
            return version

        def getLibVersion(self) -> int:  # noqa: N802 - libvirt's name
            return 9_000_000

        def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
            return "<capabilities><host><cpu><model>Skylake</model></cpu></host></capabilities>"

    files = DomainFiles("@", "@", "/pool/k", "/pool/i", "@")
    lease = Lease.new(replace(OWNER, session_id=name[:10].ljust(10, "x")), lease_s=120)
    xml = domain_xml("@", spec, _image(), files, lease, kvm=kvm)
    return str(state_key(xml, ImageVolumes(disk="/pool/tiny-1.qcow2"), Conn(), kvm=kvm))


def test_a_booted_states_key_is_the_shape_not_the_vm_or_its_session() -> None:
    key = _state_key("one", VMSpec())
    assert _state_key("other", VMSpec()) == key
    assert _state_key("one", VMSpec(memory_mb=512)) != key
    assert _state_key("one", VMSpec(cpus=2)) != key
    assert _state_key("one", VMSpec(), version=8_000_000) != key  # another QEMU
    assert _state_key("one", VMSpec(), kvm=True) != key


def test_every_domain_has_the_state_channel_and_only_a_loading_one_waits_for_it() -> None:
    lease = Lease.new(OWNER, lease_s=120)
    files = replace(FILES, state="/pool/vm-3.sock")
    booting = tree(domain_xml("vm-3", VMSpec(), _image(), files, lease))
    loading = tree(domain_xml("vm-3", VMSpec(), _image(), files, lease, incoming=True))
    for root in (booting, loading):
        [state] = [
            c
            for c in root.iterfind("devices/channel")
            if c.findtext("target", "") == ""
            and c.find(f"target[@name='{STATE_PORT}']") is not None
        ]
        source = state.find("source")
        assert source is not None
        assert (source.get("mode"), source.get("path")) == ("connect", "/pool/vm-3.sock")
    args = [a.get("value") for a in loading.iter(f"{{{QEMU_NAMESPACE}}}arg")]
    assert args == ["-incoming", "defer"]
    assert list(booting.iter(f"{{{QEMU_NAMESPACE}}}arg")) == []


def test_the_pool_belongs_to_the_user_qemu_runs_as() -> None:
    class Conn:
        def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
            return (
                "<capabilities><host><secmodel><model>apparmor</model></secmodel>"
                "<secmodel><model>dac</model><doi>0</doi>"
                "<baselabel type='kvm'>+64055:+107</baselabel>"
                "<baselabel type='qemu'>+64055:+107</baselabel></secmodel></host></capabilities>"
            )

    owner = _qemu_user(Conn())
    assert owner == (64055, 107)
    perms = tree(pool_xml("vmlease", "/var/lib/libvirt/vmlease", owner=owner)).find(
        "target/permissions"
    )
    assert perms is not None
    assert (perms.findtext("mode"), perms.findtext("owner"), perms.findtext("group")) == (
        "0700",
        "64055",
        "107",
    )


def test_restricted_networks_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="restricted"):
        domain_xml(
            "vm", VMSpec(network=Network.RESTRICTED), _image(), FILES, Lease.new(OWNER, lease_s=1)
        )


def test_uris_are_split_on_commas_and_spaces_and_checked() -> None:
    assert parse_uris(" qemu:///system, qemu+ssh://ci@h/system  qemu+tcp://h/system") == [
        "qemu:///system",
        "qemu+ssh://ci@h/system",
        "qemu+tcp://h/system",
    ]
    with pytest.raises(ConfigError, match="names no URI"):
        parse_uris(" , ")
    with pytest.raises(ConfigError, match="is not a libvirt URI"):
        parse_uris("vmhost1")


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"VMLEASE_LIBVIRT_WARM": "maybe"}, "VMLEASE_LIBVIRT_WARM must be 'on' or 'off'"),
        ({"VMLEASE_LIBVIRT_ACCEL": "hvf"}, "VMLEASE_LIBVIRT_ACCEL must be 'tcg' or 'kvm'"),
        ({"VMLEASE_LIBVIRT_POOL": "../etc"}, "pool name"),
    ],
)
def test_bad_settings_fail_before_any_host_is_reached(
    env: dict[str, str], says: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        LibvirtBackend(uris=["qemu+tcp://192.0.2.1/system"], state_dir=tmp_path, env=env)
    assert list(tmp_path.iterdir()) == []


def test_warm_starts_are_on_unless_turned_off(tmp_path: Path) -> None:
    def backend(**env: str) -> LibvirtBackend:
        return LibvirtBackend(uris=["qemu:///system"], state_dir=tmp_path, env=env)

    assert backend().states is not None
    assert backend(VMLEASE_LIBVIRT_WARM="off").states is None
    assert backend(VMLEASE_LIBVIRT_WARM=" ON ").states is not None


# -- placement --------------------------------------------------------------


@dataclass
class FakeConn:
    free: int
    alive: bool = True

    def isAlive(self) -> bool:  # noqa: N802 - libvirt's name
        return self.alive

    def getFreeMemory(self) -> int:  # noqa: N802 - libvirt's name
        return self.free


@dataclass
class FakePool:
    available: int = 10 * 2**30
    calls: list[str] = field(default_factory=list)

    def info(self) -> list[int]:
        return [1, 0, 0, self.available]


def hosts(*free: int) -> Hosts:
    made = Hosts(
        [f"qemu+tcp://h{i}/system" for i in range(len(free))],
        pool="vmlease",
        pool_path="/var/lib/libvirt/vmlease",
        keepalive=(5, 3),
        connect_timeout_s=1,
    )
    for host, amount in zip(made.hosts, free, strict=True):
        host.conn, host.pool = FakeConn(amount), FakePool()
    return made


def test_a_vm_goes_to_the_host_with_the_most_free_memory_ties_to_the_first() -> None:
    h = hosts(2000 * MiB, 3000 * MiB, 3000 * MiB)
    assert h.choose(256 * MiB).uri == "qemu+tcp://h1/system"


def test_memory_placed_and_not_yet_touched_counts_as_taken() -> None:
    h = hosts(3000 * MiB, 2900 * MiB)
    first = h.choose(512 * MiB)
    first.placed["vm-1"] = 512 * MiB
    assert h.choose(512 * MiB).uri == "qemu+tcp://h1/system"


def test_a_host_without_room_is_passed_over_and_none_with_room_fails_clearly() -> None:
    h = hosts(300 * MiB, 2000 * MiB)
    assert h.choose(256 * MiB).uri == "qemu+tcp://h1/system"
    h.hosts[1].pool.available = 1 * MiB
    with pytest.raises(BackendUnavailable, match="no libvirt host has room") as info:
        h.choose(256 * MiB)
    assert "h0" in str(info.value)
    assert "h1" in str(info.value)
    assert 256 * MiB == RESERVE_BYTES


def test_a_host_that_does_not_answer_is_skipped_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = hosts(1000 * MiB, 2000 * MiB)

    def refuse(host: Host) -> object:
        if host.uri.endswith("h1/system"):
            raise BackendUnavailable(f"libvirt host {host.uri}: connection refused")
        return host.conn

    monkeypatch.setattr(h, "connect", refuse)
    with caplog.at_level(logging.WARNING, logger="vmlease.libvirt"):
        assert h.choose(256 * MiB).uri == "qemu+tcp://h0/system"
        assert h.choose(256 * MiB).uri == "qemu+tcp://h0/system"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "h1/system: connection refused; skipping it" in warned[0]


def test_the_pool_directory_follows_the_host_a_session_in_the_users_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    made = Hosts(
        ["qemu:///system", "qemu:///session", "qemu+ssh://u@h/session", "qemu+tcp://h/system"],
        pool="vmlease",
        pool_path=None,
        keepalive=(5, 3),
        connect_timeout_s=1,
    )
    system, session, remote_session, remote_system = made.hosts
    assert made.pool_path(system) == "/var/lib/libvirt/vmlease"
    assert made.pool_path(remote_system) == "/var/lib/libvirt/vmlease"
    assert made.pool_path(session) == f"{tmp_path}/data/libvirt/vmlease"
    with pytest.raises(ConfigError, match="pool_path"):
        made.pool_path(remote_session)
    given = Hosts(
        ["qemu:///session"], pool="p", pool_path="/srv/p", keepalive=(5, 3), connect_timeout_s=1
    )
    assert given.pool_path(given.hosts[0]) == "/srv/p"


class _Caps:
    def __init__(self, xml: str) -> None:
        self.xml = xml

    def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
        return self.xml


def test_the_tsc_rate_comes_from_the_host_or_for_a_local_one_from_this_machine() -> None:
    counter = "<counter name='tsc' frequency='2600000000'/>"
    said = f"<capabilities><host><cpu>{counter}</cpu></host></capabilities>"
    silent = "<capabilities><host><cpu/></host></capabilities>"
    assert tsc_khz(_Caps(said)) == 2600000
    assert tsc_khz(_Caps(said), local=True) == 2600000
    assert tsc_khz(_Caps(silent)) is None  # a remote host that does not say
    assert tsc_khz(_Caps(silent), local=True) == host_tsc_khz()
