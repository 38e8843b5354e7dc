"""Ansible against debian-12 VMs through ``vmlease inventory``: ping, and an apt task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(600)


def _inventory(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmlease", "inventory", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        timeout=120,
        check=False,
    )


def _ansible(tmp_path: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which("ansible", path=str(Path(sys.executable).parent))
    if program is None:
        pytest.skip("ansible-core is not installed (pip install -e '.[tools]')")
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp_path / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        # No ControlPersist master left running after the test.
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=no",
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        [program, "-i", str(inventory), "all", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
        check=False,
    )


def test_ansible_pings_and_installs_a_package_on_vms_from_the_inventory(
    debian_image: Image, session: vmlease.Session, state: Path, tmp_path: Path
) -> None:
    vms = [session.create(image="debian-12") for _ in range(2)]
    plain = session.create()  # tiny: no SSH server, left out of the inventory
    done = _inventory(state, "--session", session.id)
    assert done.returncode == 0, done.stderr
    assert f"{plain.name} is left out" in done.stderr
    hosts = json.loads(done.stdout)["all"]["hosts"]
    assert sorted(hosts) == sorted(vm.name for vm in vms)
    assert all(h["ansible_host"] == "127.0.0.1" for h in hosts.values())
    inventory = tmp_path / "hosts.json"
    inventory.write_text(done.stdout)

    ping = _ansible(tmp_path, inventory, "-m", "ping")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count('"ping": "pong"') == 2, ping.stdout

    apt = _ansible(
        tmp_path, inventory, "-m", "apt", "-a", "name=tree state=present update_cache=true"
    )
    assert apt.returncode == 0, apt.stdout + apt.stderr
    for vm in vms:
        assert vm.run(["tree", "--version"]).exit_code == 0
    again = _ansible(tmp_path, inventory, "-m", "apt", "-a", "name=tree state=present")
    assert again.returncode == 0, again.stdout
    assert '"changed": false' in again.stdout


def test_an_inventory_of_a_session_without_vms_is_empty_and_valid(state: Path) -> None:
    done = _inventory(state, "--session", "nosuchsession")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"all": {"hosts": {}}}
    listed = _inventory(state, "--format", "json")
    assert json.loads(listed.stdout) == {"vms": []}


def test_the_json_inventory_says_how_ssh_reaches_each_vm_or_why_not(
    debian_image: Image, session: vmlease.Session, state: Path
) -> None:
    vm = session.create(image="debian-12")
    closed = session.create(image="debian-12", network="none")
    rows = {r["name"]: r for r in json.loads(_inventory(state, "--format", "json").stdout)["vms"]}
    ssh = rows[vm.name]["ssh"]
    assert (ssh["host"], ssh["user"]) == ("127.0.0.1", "root")
    assert ssh["port"] == vm.ssh.port
    assert rows[closed.name]["ssh"] is None
    assert "no network" in rows[closed.name]["why_not"]
