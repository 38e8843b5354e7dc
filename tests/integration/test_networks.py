"""Private networks on the qemu backend: Debian VMs on one segment, by name, with
links cut and partitions made and healed, started from saved states and reset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest._lans import USER_MAC
from vmlease.backends.guest._machine import lan_mac
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(300)

#: Serves TCP port 7000 in the guest: answers each connection with the host's name.
SERVE = (
    "nohup python3 -c 'import socket,subprocess\n"
    's=socket.create_server(("",7000))\n'
    "while True:\n"
    " c,_=s.accept(); c.sendall(socket.gethostname().encode()); c.close()' "
    ">/dev/null 2>&1 &"
)


def _ask(vm: vmlease.VM, host: str, timeout: float = 3.0) -> str | None:
    """What ``host``'s port 7000 answers ``vm``, by name; None if it cannot be reached."""
    code = (
        "import socket,sys\n"
        f"c=socket.create_connection(({host!r},7000),timeout={timeout})\n"
        "sys.stdout.write(c.recv(100).decode())"
    )
    done = vm.run(["python3", "-c", code])
    return done.stdout if done.exit_code == 0 else None


def test_three_vms_reach_each_other_by_name_until_partitioned_or_unplugged(
    debian_image: Image, state: Path
) -> None:
    with vmlease.Session(state_dir=state) as session:
        server, a, b = three_on_a_network(session)
        lan = session.network("lan")
        assert sorted(lan.vms) == ["client-a", "client-b", "server"]
        partition_and_unplug(lan, server, a, b)


def three_on_a_network(session: vmlease.Session) -> tuple[vmlease.VM, vmlease.VM, vmlease.VM]:
    """Debian VMs ``server``, ``client-a`` and ``client-b`` on network ``lan``, the
    clients reaching the server's port 7000 by its name."""
    server, a, b = (
        session.create("debian-12", memory_mb=512, networks=["lan"], name=name)
        for name in ("server", "client-a", "client-b")
    )
    server.run(["sh", "-c", SERVE], check=True)
    server.wait_for_port(7000)
    assert _ask(a, "server") == "server"
    assert _ask(b, "server") == "server"
    # Each VM has its own interface and address, though all started from one
    # saved state: no IPv6 link-local address made from the saving VM's MAC.
    addresses = []
    for vm in (server, a, b):
        links = [
            line.split() for line in vm.run(["ip", "-br", "link"], check=True).stdout.splitlines()
        ]
        [(dev, mac)] = [(f[0], f[2]) for f in links if f[2] not in (USER_MAC, "00:00:00:00:00:00")]
        shown = vm.run(["ip", "-br", "addr", "show", "dev", dev], check=True).stdout.split()
        assert len(shown) == 3, shown  # name, state, one address: no IPv6
        assert shown[2].startswith("192.168."), shown
        assert mac == lan_mac(shown[2].split("/")[0]), (mac, shown)  # the address's own
        addresses.append(shown[2])
    assert len(set(addresses)) == 3
    # The first to join appended its block to the image's file; the others' joins
    # replaced it whole.
    hosts = server.run(["cat", "/etc/hosts"], check=True).stdout
    assert hosts.startswith("127.0.0.1\tlocalhost\n"), hosts
    assert hosts.count("# vmlease network lan\n") == 1, hosts
    assert all(f" {vm.name}\n" in hosts for vm in (server, a, b)), hosts
    return server, a, b


def partition_and_unplug(
    lan: vmlease.PrivateNetwork, server: vmlease.VM, a: vmlease.VM, b: vmlease.VM
) -> None:
    """``b`` cut off from ``server`` by a partition and back when it heals, then ``a``
    by its own link (``server`` answers on port 7000 with its name)."""
    lan.partition([server, a], [b])
    assert _ask(a, server.name) == server.name
    assert _ask(b, server.name) is None
    lan.heal()
    assert _ask(b, server.name) == server.name
    a.link_down()
    assert _ask(a, server.name) is None
    a.link_up()
    assert _ask(a, server.name, timeout=10) == server.name


def _lan_address(vm: vmlease.VM) -> str:
    found = [
        word
        for word in vm.run(["ip", "-br", "-4", "addr"], check=True).stdout.split()
        if word.startswith("192.168.")
    ]
    assert len(found) == 1, found
    return found[0]


def test_a_reset_vm_comes_back_with_its_own_address_and_names_and_a_taken_address_its_mac(
    debian_image: Image, state: Path
) -> None:
    with vmlease.Session(state_dir=state) as session:
        one = session.create("debian-12", memory_mb=512, networks=["lan"], name="one")
        two = session.create("debian-12", memory_mb=512, networks=["lan"], name="two")
        before = _lan_address(two)
        two.reset()
        assert _lan_address(two) == before  # its own address again, not the state's
        assert before != _lan_address(one)
        assert two.run(["getent", "hosts", "one"]).exit_code == 0
        one.run(["sh", "-c", SERVE], check=True)
        one.wait_for_port(7000)
        assert _ask(two, "one") == "one"
        # A restored snapshot knows the VMs that joined after it was taken.
        two.snapshot("before")
        session.create("debian-12", memory_mb=512, networks=["lan"], name="late")
        two.restore("before")
        assert two.run(["getent", "hosts", "late"]).exit_code == 0
        # A VM that takes the address one left (and with it one's MAC) is reached at
        # once by two, which talked to one at that address.
        address = _lan_address(one)
        one.delete()
        new = session.create("debian-12", memory_mb=512, networks=["lan"], name="new")
        assert _lan_address(new) == address
        new.run(["sh", "-c", SERVE], check=True)
        new.wait_for_port(7000)
        assert _ask(two, "new") == "new"


def _timed_ask(vm: vmlease.VM, host: str) -> float | None:
    """Seconds ``vm`` takes to connect to ``host``'s port 7000 and read its answer."""
    code = (
        "import socket,sys,time\n"
        "t=time.monotonic()\n"
        f"c=socket.create_connection(({host!r},7000),timeout=5)\n"
        "c.recv(100)\n"
        "sys.stdout.write(repr(time.monotonic()-t))"
    )
    done = vm.run(["python3", "-c", code])
    return float(done.stdout) if done.exit_code == 0 else None


def test_a_vm_on_two_networks_is_on_each_through_its_own_interface_with_faults_per_network(
    debian_image: Image, state: Path
) -> None:
    with vmlease.Session(state_dir=state) as session:
        hub = session.create("debian-12", memory_mb=512, networks=["front", "back"], name="hub")
        web = session.create("debian-12", memory_mb=512, networks=["front"], name="web")
        db = session.create("debian-12", memory_mb=512, networks=["back"], name="db")
        hub.run(["sh", "-c", SERVE], check=True)
        hub.wait_for_port(7000)
        # Each interface is on the network it was set up for: were they swapped, the
        # addresses would sit on the other segment and neither would answer.
        assert _ask(web, "hub") == "hub"
        assert _ask(db, "hub") == "hub"
        assert web.run(["getent", "hosts", "db"]).exit_code != 0  # names are per network
        front = session.network("front")
        front.impair(hub, delay_s=0.5)
        took = _timed_ask(web, "hub")
        assert took is not None
        assert took >= 0.5  # the SYN alone waits that long in the switch
        quick = _timed_ask(db, "hub")  # the other network is not delayed
        assert quick is not None
        assert quick < took
        front.impair(hub, loss=1.0)
        assert _ask(web, "hub") is None
        assert _ask(db, "hub") == "hub"
        front.clear()
        assert _ask(web, "hub", timeout=10) == "hub"


RUNNER = textwrap.dedent(
    """
    import sys, time, vmlease
    session = vmlease.Session(state_dir=sys.argv[1])
    session.create("debian-12", memory_mb=512, networks=["lan"])
    print("up", flush=True)
    time.sleep(600)
    """
)


def test_a_networks_switch_is_gone_within_10_s_of_its_owners_sigkill(
    debian_image: Image, state: Path
) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert runner.stdout is not None
        assert runner.stdout.readline().strip() == "up"
        switches = [p for p in (state / "qemu").iterdir() if p.name.startswith(".lan-")]
        assert len(switches) == 1
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        killed = time.monotonic()

        def switch_runs() -> bool:
            found = subprocess.run(
                ["pgrep", "-f", f"_switch {switches[0]}"], capture_output=True, check=False
            )
            return found.returncode == 0

        while (switches[0].exists() or switch_runs()) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert not switches[0].exists()
        assert not switch_runs()
    finally:
        runner.kill()
        runner.wait()
        if runner.stdout is not None:
            runner.stdout.close()
        # The VM itself is the reaper's, as for any dead owner's.
        deadline = time.monotonic() + 30
        while any((state / "qemu").glob("*/vm.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
