"""Example: an APT repository served from one Debian VM of a private network,
installed from by two others by the name the test gives the server (each VM
on the network finds the others by their VM names and their aliases), and a
client that rides out a partition of its server and carries on when the
network heals.

The repository is built here: a package (``dpkg-deb``) and its index
(``dpkg-scanpackages``); the server VM serves it over HTTP on the private
network only (nothing is forwarded to the host).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import vmlease

APT = {"DEBIAN_FRONTEND": "noninteractive"}
#: The clients' source: the server by its name on the private network.
SOURCES = "/etc/apt/sources.list.d/lan.list"
#: apt-get reads the private source alone, and gives up on a silent server in 5 s.
LAN_ONLY = [
    f"-o=Dir::Etc::SourceList={SOURCES}",
    "-o=Dir::Etc::SourceParts=-",
    "-o=APT::Get::List-Cleanup=0",
    "-o=Acquire::http::Timeout=5",
    "-o=Acquire::Retries=0",
]
#: Polls the server twice a second, writing ok or down: the client that rides it out.
POLL = (
    "nohup python3 -c 'import time,urllib.request\n"
    "while True:\n"
    " try:\n"
    '  urllib.request.urlopen("http://server:8000/Packages",timeout=1).read(); s="ok"\n'
    " except OSError:\n"
    '  s="down"\n'
    ' open("/var/log/poll","a").write(s+"\\n"); time.sleep(0.5)\' >/dev/null 2>&1 &'
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat repository: hello-lan_1.0_all.deb and its Packages index."""
    root = tmp_path_factory.mktemp("repo")
    tree = root / "build"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: hello-lan\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: vmlease <vmlease@localhost>\nDescription: says hello over the LAN\n"
    )
    (tree / "usr/bin").mkdir(parents=True)
    script = tree / "usr/bin/hello-lan"
    script.write_text("#!/bin/sh\necho hello over the lan\n")
    script.chmod(0o755)
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(
        [
            "dpkg-deb",
            "--root-owner-group",
            "--build",
            str(tree),
            str(repo / "hello-lan_1.0_all.deb"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    index = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=60,
    )
    (repo / "Packages").write_bytes(index.stdout)
    return repo


def _seen(client: vmlease.VM, word: str, timeout_s: float = 30.0) -> None:
    """Wait until the client's poller last said ``word``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = client.run(["sh", "-c", "tail -n 1 /var/log/poll 2>/dev/null"]).stdout.strip()
        if last == word:
            return
        time.sleep(0.5)
    raise AssertionError(f"the client's poller never said {word!r}")


def test_clients_install_from_the_servers_repository_and_ride_out_a_partition(
    vm_factory: Callable[..., vmlease.VM],
    vm_network: Callable[[str], vmlease.PrivateNetwork],
    repository: Path,
) -> None:
    server = vm_factory(image="debian-12", memory_mb=512, networks=["lan"], alias="server")
    a, b = (vm_factory(image="debian-12", memory_mb=512, networks=["lan"]) for _ in "ab")
    server.run(["mkdir", "-p", "/srv/repo"], check=True)
    for path in repository.iterdir():
        server.put(path, f"/srv/repo/{path.name}")
    server.run(
        ["sh", "-c", "cd /srv/repo && nohup python3 -m http.server 8000 >/dev/null 2>&1 &"],
        check=True,
    )
    server.wait_for_port(8000)
    for client in (a, b):
        line = "deb [trusted=yes] http://server:8000/ ./"
        client.run(["sh", "-c", f"echo '{line}' > {SOURCES}"], check=True)
        client.run(["apt-get", "update", *LAN_ONLY], env=APT, check=True, timeout_s=120)
        client.run(["apt-get", "install", "-y", "hello-lan"], env=APT, check=True, timeout_s=300)
        assert client.run(["hello-lan"], check=True).stdout == "hello over the lan\n"

    lan = vm_network("lan")
    b.run(["sh", "-c", POLL], check=True)
    _seen(b, "ok")
    lan.partition([server, a], [b])
    _seen(b, "down")
    assert a.run(["apt-get", "update", *LAN_ONLY], env=APT, timeout_s=120).exit_code == 0
    lan.heal()
    _seen(b, "ok")
    # The same client process saw it all, and apt works again.
    log = b.run(["cat", "/var/log/poll"]).stdout.split()
    assert (log[0], "down" in log, log[-1]) == ("ok", True, "ok")
    assert b.run(["apt-get", "update", *LAN_ONLY], env=APT, timeout_s=120).exit_code == 0
