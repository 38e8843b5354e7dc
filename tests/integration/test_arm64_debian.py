"""Debian 12 for arm64, emulated on this x86_64 host, does what an x86_64 Debian VM
does: network through the host, forwards and SSH, waits, a grown disk, and
pyinfra, testinfra and Ansible.

Slow: the first run builds the arm64 image (about 3 minutes: its packages are
installed inside an emulated guest), and its first VM boots cold (about 30 s).
CI builds the image before the slow suite (``scripts/example multiarch``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease._paths import image_dir
from vmlease.backends.guest.images import Image, build_debian

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DEPLOY = """
from pyinfra.operations import files, server

files.put(name="a config file", src="app.conf", dest="/etc/app.conf", mode="640")
server.shell(name="the machine", commands=["uname -m > /etc/app.machine"])
"""


@pytest.fixture(scope="module")
def debian_arm64_image(tiny_arm64_image: Image) -> Image:
    return build_debian(image_dir(), "debian-12", arch="aarch64")


def _vmlease(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        timeout=120,
        check=False,
    )


def test_an_arm64_debian_vm_serves_the_tools_as_an_x86_64_one_does(
    debian_arm64_image: Image, session: vmlease.Session, state: Path, tmp_path: Path
) -> None:
    vm = session.create(image="debian-12", arch="arm64", memory_mb=512, disk_gb=6)
    assert vm.run(["dpkg", "--print-architecture"], check=True).stdout.strip() == "arm64"
    vm.wait_for_unit("ssh.service")
    vm.wait_for_port(22)
    # User-mode networking: the guest resolves the archive through the host.
    assert vm.run(["getent", "hosts", "deb.debian.org"]).exit_code == 0
    size = vm.run(["df", "--output=size", "-B1", "/"], check=True).stdout.split()[-1]
    assert int(size) > 5 * 2**30

    # SSH through a forward on 127.0.0.1, with vmlease's key and known hosts.
    info = vm.ssh
    done = subprocess.run(
        info.argv(["uname", "-m"]), capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "aarch64"), done.stderr

    host = vmlease.as_testinfra_host(vm)
    assert host.package("openssh-server").is_installed
    assert host.service("ssh").is_running
    assert host.system_info.arch == "aarch64"

    (tmp_path / "app.conf").write_text("name = demo\n")
    (tmp_path / "deploy.py").write_text(DEPLOY)
    vm.run(["true"])  # the session holds the channel: pyinfra gets it when it is idle
    vmlease.run_pyinfra(vm, tmp_path / "deploy.py")
    assert vm.run(["cat", "/etc/app.conf"]).stdout == "name = demo\n"
    assert vm.run(["cat", "/etc/app.machine"]).stdout == "aarch64\n"

    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent))
    assert ansible is not None, "ansible-core is not installed (pip install -e '.[tools]')"
    inventory = _vmlease(state, "inventory", "--session", session.id)
    assert inventory.returncode == 0, inventory.stderr
    assert list(json.loads(inventory.stdout)["all"]["hosts"]) == [vm.name]
    (tmp_path / "hosts.json").write_text(inventory.stdout)
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp_path / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=no",
        "ANSIBLE_NOCOLOR": "1",
    }
    ping = subprocess.run(
        [ansible, "-i", str(tmp_path / "hosts.json"), "all", "-m", "setup", "-a",
         "filter=ansible_architecture"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert '"ansible_architecture": "aarch64"' in ping.stdout

    listed = _vmlease(state, "ls")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(vm.name)]
    assert "aarch64" in row.split()
