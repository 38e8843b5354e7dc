"""Example: a .deb installed with apt in a real Debian 12, its systemd service
reached from the host, and a clean VM for the next test."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

import vmlease

pytestmark = pytest.mark.vm(image="debian-12")

APT = {"DEBIAN_FRONTEND": "noninteractive"}
SOURCE = Path(__file__).parent / "hello-web"


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hello-web_1.0_all.deb, built from ``hello-web/`` (files owned by root)."""
    out = tmp_path_factory.mktemp("deb")
    tree = out / "hello-web"
    shutil.copytree(SOURCE, tree)
    deb = out / "hello-web_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return deb


def test_the_package_installs_and_its_service_answers_from_the_host(
    vm: vmlease.VM, package: Path
) -> None:
    vm.put(package, "/tmp/hello-web.deb")
    vm.run(["apt-get", "install", "-y", "/tmp/hello-web.deb"], env=APT, check=True, timeout_s=300)
    vm.wait_for_unit("hello-web.service")
    vm.wait_for_port(8080)
    port = vm.forward(8080)  # on 127.0.0.1 only
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as reply:
        assert reply.read() == b"hello from hello-web\n"

    vm.run(["apt-get", "purge", "-y", "hello-web"], env=APT, check=True, timeout_s=300)
    assert vm.run(["systemctl", "is-active", "hello-web.service"]).stdout.strip() != "active"
    assert vm.run(["dpkg", "-s", "hello-web"]).exit_code != 0


def test_the_next_vm_never_saw_it(vm: vmlease.VM) -> None:
    assert vm.run(["dpkg", "-s", "hello-web"]).exit_code != 0
    assert vm.run(["test", "-e", "/usr/lib/hello-web/server.py"]).exit_code != 0
    assert vm.run(["test", "-e", "/tmp/hello-web.deb"]).exit_code != 0
