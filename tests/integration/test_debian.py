"""Debian guests on the embedded backend: built from the archive, booted once,
then started from their saved state, with systemd, SSH's server and networking."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from tests.support.ledger import ledger_records
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def debian(debian_image: Image, session: vmlease.Session) -> vmlease.VM:
    return session.create(image="debian-12")


def _sh(vm: vmlease.VM, line: str) -> str:
    return vm.run(["sh", "-c", line], check=True, timeout_s=120).stdout.strip()


def test_a_debian_vm_is_up_when_created(debian: vmlease.VM) -> None:
    assert _sh(debian, "systemctl is-system-running") == "running"
    assert _sh(debian, "systemctl is-active ssh.service") == "active"
    assert _sh(debian, ". /etc/os-release; echo $VERSION_CODENAME") == "bookworm"
    assert _sh(debian, "python3 -c 'print(6 * 7)'") == "42"
    assert _sh(debian, "hostname") == debian.name
    assert _sh(debian, "systemctl is-active vmlease-agent.service") == "active"


def test_there_is_no_password_anywhere(debian: vmlease.VM) -> None:
    assert _sh(debian, "passwd --status root | cut -d' ' -f2") == "L"
    shadow = _sh(debian, "cut -d: -f2 /etc/shadow | sort -u")
    assert set(shadow.split()) <= {"*", "!", "!*"}, shadow
    config = _sh(debian, "sshd -T").lower().splitlines()
    assert "passwordauthentication no" in config
    assert "kbdinteractiveauthentication no" in config
    assert "permitrootlogin without-password" in config  # sshd's word for prohibit-password


def test_the_first_boot_made_ed25519_and_ecdsa_host_keys_and_sshd_offers_them(
    debian: vmlease.VM,
) -> None:
    assert _sh(debian, "cd /etc/ssh && ls ssh_host_*").split() == [
        "ssh_host_ecdsa_key",
        "ssh_host_ecdsa_key.pub",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
    ]
    offered = _sh(debian, "ssh-keyscan -T 30 127.0.0.1 2>/dev/null | cut -d' ' -f2 | sort")
    assert offered.split() == ["ecdsa-sha2-nistp256", "ssh-ed25519"]


def test_apt_points_at_the_hosts_mirror(debian: vmlease.VM, debian_image: Image) -> None:
    sources = _sh(debian, "cat /etc/apt/sources.list")
    assert debian_image.info["mirror"] in sources
    assert "bookworm" in sources


def test_user_networking_gives_an_address_and_dns(debian: vmlease.VM) -> None:
    assert "10.0.2.15/24" in _sh(debian, "ip -br addr show eth0")
    assert _sh(debian, "getent hosts deb.debian.org | wc -l") != "0"


@pytest.mark.parametrize("network", ["none", "restricted"])
def test_a_vm_can_have_no_network_or_no_way_out(
    session: vmlease.Session, debian_image: Image, network: str
) -> None:
    vm = session.create(image="debian-12", network=network)
    links = _sh(vm, "ip -br link")
    if network == "none":
        assert "eth0" not in links
    else:
        assert "eth0" in links
        probe = "import socket; socket.create_connection(('10.0.2.2', 22), timeout=5)"
        assert vm.run(["python3", "-c", probe], timeout_s=60).exit_code != 0


def test_later_vms_start_from_the_saved_booted_state_and_reset_by_snapshot(
    session: vmlease.Session, debian_image: Image, state: Path
) -> None:
    first = session.create(image="debian-12")
    second = session.create(image="debian-12")
    record = json.loads((state / "qemu" / second.name / "vm.json").read_text())
    assert record.get("warm"), "the second VM booted instead of starting from the saved state"
    assert _sh(second, "systemctl is-system-running") == "running"
    assert _sh(second, "hostname") == second.name
    second.snapshot("clean")
    _sh(second, "echo dirty > /root/mark && systemctl stop ssh.service")
    second.restore("clean")
    assert _sh(second, "test -e /root/mark && echo yes || echo no") == "no"
    assert _sh(second, "systemctl is-active ssh.service") == "active"
    assert first.run(["true"]).ok


def test_a_bad_network_is_refused_before_anything_is_made(
    session: vmlease.Session, state: Path
) -> None:
    with pytest.raises(vmlease.InvalidSpec, match="network must be one of user, none, restricted"):
        session.create(image="debian-12", network="bridged")
    assert ledger_records(state) == []


def test_building_again_does_nothing(debian_image: Image) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmlease", "image", "build", "debian-12"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stderr
    assert done.stdout.strip() == str(debian_image.path)


@pytest.mark.slow
def test_debian_13_builds_boots_and_takes_ssh(session: vmlease.Session, tiny_image: Image) -> None:
    from vmlease._paths import image_dir
    from vmlease.backends.guest.images import build_debian

    build_debian(image_dir(), "debian-13")
    vm = session.create(image="debian-13")
    assert _sh(vm, ". /etc/os-release; echo $VERSION_CODENAME") == "trixie"
    assert _sh(vm, "systemctl is-system-running") == "running"
    done = subprocess.run(vm.ssh.argv(["true"]), capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_disk_gb_grows_the_root_file_system_and_not_the_saved_state(
    session: vmlease.Session, debian_image: Image
) -> None:
    big = session.create(image="debian-12", disk_gb=9)
    size_gb = int(_sh(big, "df --output=size -B1G / | tail -1"))
    assert 8 <= size_gb <= 9
    plain = session.create(image="debian-12")
    assert int(_sh(plain, "df --output=size -B1G / | tail -1")) < 5


@pytest.mark.parametrize(
    ("image", "disk_gb", "says"),
    [
        ("debian-12", 1, r"smaller than the debian-12 image's disk \(4 GiB\)"),
        ("tiny", 8, "cannot grow its root file system"),
        ("debian-12", 0, "disk_gb must be at least 1"),
    ],
)
def test_a_bad_disk_size_is_refused_before_anything_is_made(
    session: vmlease.Session, debian_image: Image, state: Path, image: str, disk_gb: int, says: str
) -> None:
    with pytest.raises(vmlease.InvalidSpec, match=says):
        session.create(image=image, disk_gb=disk_gb)
    assert ledger_records(state) == []


@pytest.mark.parametrize(
    ("image", "user", "says"),
    [
        ("tiny", "root", "runs no SSH server"),
        ("debian-12", "Admin", "user must be a user name"),
    ],
)
def test_a_bad_user_is_refused_before_anything_is_made(
    session: vmlease.Session, debian_image: Image, state: Path, image: str, user: str, says: str
) -> None:
    with pytest.raises(vmlease.InvalidSpec, match=says):
        session.create(image=image, user=user)
    assert ledger_records(state) == []


def test_the_first_boot_of_an_image_and_shape_is_announced(
    debian_image: Image, state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An image cache of its own, so that no saved state exists: this VM boots.
    images = tmp_path / "images"
    (images / "debian-12").mkdir(parents=True)
    (images / "debian-12" / debian_image.build_id).symlink_to(debian_image.path)
    (images / "debian-12" / "current").symlink_to(debian_image.build_id)
    caplog.set_level(logging.INFO, logger="vmlease.progress")
    with vmlease.Session(state_dir=state, backend_options={"image_dir": images}) as s:
        first = s.create(image="debian-12")
        s.create(image="debian-12")  # from the saved state: nothing to announce
    said = [r.getMessage() for r in caplog.records if r.name == "vmlease.progress"]
    assert len(said) == 1, said
    assert first.name in said[0]
    assert "booting it" in said[0]
