"""testinfra on debian-12 VMs: over vmlease's channel (``vm_host``, ``as_testinfra_host``)
and over SSH with ``vmlease ssh-config``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image

testinfra = pytest.importorskip("testinfra", reason="pip install -e '.[tools]'")
pytestmark = pytest.mark.timeout(600)


def test_testinfra_modules_work_over_the_channel(
    debian_image: Image, session: vmlease.Session
) -> None:
    vm = session.create(image="debian-12")
    host = vmlease.as_testinfra_host(vm)
    assert host.package("openssh-server").is_installed
    assert host.package("openssh-server").version
    ssh = host.service("ssh")
    assert ssh.is_running
    assert ssh.is_enabled
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.file("/root").is_directory
    assert host.socket("tcp://0.0.0.0:22").is_listening
    assert not host.socket("tcp://0.0.0.0:8080").is_listening
    assert host.run("hostname").stdout.strip() == vm.name


def test_a_vm_without_network_is_still_reached_over_the_channel(
    debian_image: Image, session: vmlease.Session
) -> None:
    vm = session.create(image="debian-12", network="none")
    host = vmlease.as_testinfra_host(vm)
    assert host.service("ssh").is_running
    assert host.interface("lo").exists
    with pytest.raises(vmlease.ConfigError, match="no network"):
        vm.ssh  # noqa: B018 - asking for SSH is what fails


def test_testinfra_over_ssh_with_vmleases_ssh_config(
    debian_image: Image, session: vmlease.Session, state: Path, tmp_path: Path
) -> None:
    vm = session.create(image="debian-12")
    config = tmp_path / "ssh_config"
    done = subprocess.run(
        [sys.executable, "-m", "vmlease", "ssh-config", vm.name],
        capture_output=True,
        text=True,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        timeout=120,
        check=True,
    )
    config.write_text(done.stdout)
    # No ControlPersist: nothing of the test's may outlive it.
    host = testinfra.get_host(f"ssh://{vm.name}", ssh_config=str(config), controlpersist=0)
    assert host.run("id -un").stdout.strip() == "root"
    assert host.file("/etc/hostname").exists
