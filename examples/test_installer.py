"""Example: testing a package installer in real, disposable VMs."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmlease


def test_install_puts_the_program_in_place(machine: vmlease.VM) -> None:
    out = machine.run(["install-hello", "install", "/opt/hello"], check=True)
    assert out.stdout == "installed into /opt/hello\n"
    assert machine.run(["/opt/hello/bin/hello"], check=True).stdout == "hello from /opt/hello\n"


def test_install_twice_keeps_the_users_config(machine: vmlease.VM, tmp_path: Path) -> None:
    machine.run(["install-hello", "install"], check=True)
    conf = tmp_path / "hello.conf"
    conf.write_text("greeting=bonjour\n")
    machine.put(conf, "/etc/hello/hello.conf")
    machine.run(["install-hello", "install"], check=True)
    machine.get("/etc/hello/hello.conf", tmp_path / "after.conf")
    assert (tmp_path / "after.conf").read_text() == "greeting=bonjour\n"


def test_uninstall_removes_everything(machine: vmlease.VM) -> None:
    machine.run(["install-hello", "install", "/opt/x"], check=True)
    machine.run(["install-hello", "uninstall"], check=True)
    assert machine.run(["install-hello", "status"]).exit_code == 1
    assert machine.run(["ls", "/opt/x"]).exit_code != 0


def test_uninstall_without_install_fails_with_a_message(machine: vmlease.VM) -> None:
    with pytest.raises(vmlease.CommandFailed) as info:
        machine.run(["install-hello", "uninstall"], check=True)
    assert info.value.exit_code == 2
    assert "not installed" in info.value.stderr


def test_each_test_gets_a_clean_machine(machine: vmlease.VM) -> None:
    # The tests above installed things; this VM has never seen them.
    assert machine.run(["install-hello", "status"]).stdout == "absent\n"
