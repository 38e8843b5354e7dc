"""pyinfra through the ``@vmlease`` connector, against debian-12 VMs of a live session:
commands and files over vmlease's channel (no SSH, no network needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image

pytest.importorskip("pyinfra", reason="pip install -e '.[tools]'")
pytestmark = pytest.mark.timeout(600)

DEPLOY = """
from pyinfra.operations import apt, files

files.put(name="a config file", src="app.conf", dest="/etc/app.conf", mode="640")
files.line(name="a line", path="/etc/environment", line="APP_LEVEL=debug")
apt.packages(name="tree", packages=["tree"], update=True, cache_time=86400)
"""


def _pyinfra(state: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        timeout=500,
        check=False,
    )


def _totals(output: str) -> list[str]:
    """pyinfra's "Grand total" row: hosts, success (changed), error, no change."""
    line = next(line for line in output.splitlines() if "Grand total" in line)
    return line.split()[2:]


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    (tmp_path / "app.conf").write_text("name = demo\n")
    path = tmp_path / "deploy.py"
    path.write_text(DEPLOY)
    return path


def test_a_deploy_changes_the_vm_once_then_reports_no_changes(
    debian_image: Image, session: vmlease.Session, deploy: Path
) -> None:
    vm = session.create(image="debian-12")
    vm.run(["true"])  # the session holds the channel: pyinfra gets it when it is idle
    first = vmlease.run_pyinfra(vm, deploy)
    assert _totals(first.stdout + first.stderr)[1] == "3", first.stderr
    assert vm.run(["cat", "/etc/app.conf"]).stdout == "name = demo\n"
    assert "APP_LEVEL=debug" in vm.run(["cat", "/etc/environment"]).stdout
    assert vm.run(["stat", "-c", "%a", "/etc/app.conf"]).stdout.strip() == "640"
    assert vm.run(["tree", "--version"]).exit_code == 0
    again = vmlease.run_pyinfra(vm, deploy)
    hosts, changed, errors, unchanged = _totals(again.stdout + again.stderr)
    assert (hosts, changed, errors, unchanged) == ("3", "-", "-", "3"), again.stderr


def test_facts_and_shell_reach_a_vm_without_network(
    debian_image: Image, session: vmlease.Session, tmp_path: Path
) -> None:
    vm = session.create(image="debian-12", network="none")
    facts = _pyinfra(
        session.state_dir, f"@vmlease/{vm.name}", "fact", "server.Hostname", cwd=tmp_path
    )
    assert facts.returncode == 0, facts.stderr
    assert f'"{vm.name}"' in facts.stdout + facts.stderr
    shell = _pyinfra(
        session.state_dir,
        f"@vmlease/{vm.name}",
        "exec",
        "--",
        "echo from-pyinfra > /root/said",
        cwd=tmp_path,
    )
    assert shell.returncode == 0, shell.stderr
    assert vm.run(["cat", "/root/said"]).stdout == "from-pyinfra\n"


def test_vmlease_alone_stands_for_every_running_vm(
    tiny_image: Image, session: vmlease.Session, tmp_path: Path
) -> None:
    vms = [session.create() for _ in range(2)]
    done = _pyinfra(session.state_dir, "@vmlease", "exec", "--", "hostname", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for vm in vms:
        assert vm.name in done.stdout + done.stderr


def test_a_vm_vmlease_does_not_own_is_a_connection_error_naming_it(
    tiny_image: Image, session: vmlease.Session, tmp_path: Path
) -> None:
    session.create()
    done = _pyinfra(session.state_dir, "@vmlease/not-a-vm", "exec", "--", "true", cwd=tmp_path)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "not-a-vm" in said
    assert "vmlease ls" in said
