"""Waiting for a real system: commands, ports, the console (tiny) and units (Debian)."""

from __future__ import annotations

import pytest

import vmlease
from vmlease.backends.guest.images import Image


def test_wait_until_succeeds_returns_the_run_that_succeeded(shared_vm: vmlease.VM) -> None:
    shared_vm.run(["sh", "-c", "rm -f /tmp/ready; (sleep 1; touch /tmp/ready) &"], check=True)
    result = shared_vm.wait_until_succeeds(["sh", "-c", "cat /tmp/ready && echo there"])
    assert result.stdout == "there\n"


def test_wait_until_succeeds_times_out_with_the_last_output(shared_vm: vmlease.VM) -> None:
    with pytest.raises(vmlease.WaitTimeout) as info:
        shared_vm.wait_until_succeeds(["sh", "-c", "echo still-not; exit 3"], timeout_s=1)
    assert "still-not" in str(info.value)
    assert "exit 3" in str(info.value)
    assert "--- console (last lines) ---" in str(info.value)


def test_wait_for_port_sees_a_server_start(shared_vm: vmlease.VM) -> None:
    shared_vm.run(["sh", "-c", "(sleep 1; httpd -p 8123 -h /tmp) &"], check=True)
    try:
        shared_vm.wait_for_port(8123, timeout_s=30)
    finally:
        shared_vm.run(["sh", "-c", "pkill -f 'httpd -p 8123' || true"])


def test_wait_for_port_on_a_port_nothing_listens_on_says_so(shared_vm: vmlease.VM) -> None:
    with pytest.raises(vmlease.WaitTimeout, match="nothing listens on port 9"):
        shared_vm.wait_for_port(9, timeout_s=1)
    with pytest.raises(vmlease.ConfigError, match="from 1 to 65535"):
        shared_vm.wait_for_port(70000)


def test_wait_for_console_finds_a_line(shared_vm: vmlease.VM) -> None:
    shared_vm.run(["sh", "-c", "echo 'marker 4711 reached' > /dev/console"], check=True)
    match = shared_vm.wait_for_console(r"marker (\d+) reached", timeout_s=10)
    assert match.group(1) == "4711"
    with pytest.raises(vmlease.WaitTimeout, match="the console never said"):
        shared_vm.wait_for_console("no such words here", timeout_s=0.5)


def test_wait_for_unit_on_debian(session: vmlease.Session, debian_image: Image) -> None:
    vm = session.create(image="debian-12")
    vm.wait_for_unit("ssh.service", timeout_s=30)
    # A oneshot unit is "activating" until its command ends, then "failed" for good.
    start = "systemd-run --unit=doomed.service --property=Type=oneshot false || true"
    vm.run(["sh", "-c", start], check=True)
    with pytest.raises(vmlease.WaitTimeout, match="cannot happen any more") as info:
        vm.wait_for_unit("doomed.service", timeout_s=60)
    assert "doomed.service is failed" in str(info.value)
    with pytest.raises(vmlease.ConfigError, match="not a systemd unit name"):
        vm.wait_for_unit("bad name; rm -rf /")


def test_wait_for_unit_in_a_guest_without_systemd_says_so_at_once(
    shared_vm: vmlease.VM,
) -> None:
    with pytest.raises(vmlease.UnsupportedOperation, match="not a systemd guest") as info:
        shared_vm.wait_for_unit("ssh.service", timeout_s=600)
    assert "its init is busybox" in str(info.value)
    assert "wait_for_port" in str(info.value)
