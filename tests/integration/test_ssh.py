"""SSH to real guests: one key per state directory, the real host key, checking on."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_vm_ssh_reaches_the_vm_with_host_key_checking_on(
    session: vmlease.Session, debian_image: Image, state: Path
) -> None:
    vm = session.create(image="debian-12")
    info = vm.ssh
    assert (info.host, info.user) == ("127.0.0.1", "root")
    assert stat.S_IMODE(info.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(info.known_hosts.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "ssh").stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert f"[127.0.0.1]:{info.port} ssh-ed25519 " in info.known_hosts.read_text()
    done = subprocess.run(
        info.argv(["sh", "-c", "echo hello from $(hostname)"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"hello from {vm.name}\n"), done.stderr


def test_a_wrong_host_key_is_refused(
    session: vmlease.Session, debian_image: Image, tmp_path: Path
) -> None:
    vm = session.create(image="debian-12")
    info = vm.ssh
    forged = tmp_path / "known_hosts"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged.write_text(f"[127.0.0.1]:{info.port} {other.with_suffix('.pub').read_text()}")
    argv = [
        a if a != f"UserKnownHostsFile={info.known_hosts}" else f"UserKnownHostsFile={forged}"
        for a in info.argv(["true"])
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "host key" in done.stderr.lower() or "REMOTE HOST IDENTIFICATION" in done.stderr


def test_vmlease_ssh_and_ssh_config_work_for_ssh_and_scp(
    session: vmlease.Session, debian_image: Image, state: Path, tmp_path: Path
) -> None:
    vm = session.create(image="debian-12")
    done = _cli(state, "ssh", vm.name, "--", "cat", "/etc/hostname")
    assert done.returncode == 0, done.stderr
    config = _cli(state, "ssh-config", vm.name)
    assert config.returncode == 0, config.stderr
    assert f"Host {vm.name}\n" in config.stdout
    assert "StrictHostKeyChecking yes" in config.stdout
    conf = tmp_path / "ssh_config"
    conf.write_text(config.stdout)
    ran = subprocess.run(
        ["ssh", "-F", str(conf), vm.name, "uname", "-s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (ran.returncode, ran.stdout) == (0, "Linux\n"), ran.stderr
    local = tmp_path / "payload"
    local.write_bytes(os.urandom(4096))
    copied = subprocess.run(
        ["scp", "-q", "-F", str(conf), str(local), f"{vm.name}:/root/payload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr
    assert (
        vm.run(["sha256sum", "/root/payload"]).stdout.split()[0]
        == (
            subprocess.run(
                ["sha256sum", str(local)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
    )


@pytest.mark.slow  # installs rsync in the guest from the archive
def test_ssh_config_works_for_rsync(
    session: vmlease.Session, debian_image: Image, state: Path, tmp_path: Path
) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed here (apt-get install rsync)")
    vm = session.create(image="debian-12")
    vm.run(["apt-get", "update", "-q"], check=True, timeout_s=300)
    vm.run(
        ["apt-get", "install", "-y", "-q", "rsync"],
        check=True,
        timeout_s=300,
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )
    conf = tmp_path / "ssh_config"
    conf.write_text(_cli(state, "ssh-config", vm.name).stdout)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("synced\n")
    done = subprocess.run(
        ["rsync", "-a", "-e", f"ssh -F {conf}", f"{tree}/", f"{vm.name}:/srv/tree/"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert vm.run(["cat", "/srv/tree/sub/file"]).stdout == "synced\n"


def test_ssh_to_a_vm_without_network_or_ssh_server_says_why(
    session: vmlease.Session, debian_image: Image, state: Path
) -> None:
    offline = session.create(image="debian-12", network="none")
    done = _cli(state, "ssh", offline.name, "--", "true")
    assert done.returncode == 2
    assert "has no network" in done.stderr
    tiny = session.create()
    with pytest.raises(vmlease.UnsupportedOperation, match="runs no SSH server"):
        tiny.ssh  # noqa: B018
