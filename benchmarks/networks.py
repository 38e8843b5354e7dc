"""Private networks: traffic between VMs on one segment beside traffic between a VM
and the host through user-mode networking, and what a second interface costs.

Side by side in one run, medians (JSON in results/networks.json), debian-12
with 1 vCPU and 512 MB under whichever accelerator this machine has; with
``--runs N``, traffic N/2 times, cold boots N/2 times and starts from the
state and resets 3N times per shape and first command (from three states per
shape, each saved anew), in a random order after a pause:

- TCP round trip (one byte each way, over one connection, the mean of 200) and
  throughput (32 MB one way), VM to VM on the private network, beside the same
  from a VM to an echo server on the host's 127.0.0.1 (the guest's 10.0.2.2);
  and, with no VM, a 98-byte frame there and back through a network's switch
  process between two of its ports (the median of 3000): the switch's share of
  the segment's round trip;
- cold boot to ready, start from the saved booted state to ready and to the
  reply of a first command, and reset to a first command's reply, each with
  and without a private network, interleaved (goal: the network costs under
  10% of each); and of a reset, its wake-up (the exchange that also sets a
  VM's private interfaces and names) and its first command. A first command
  is where a guest started from a state pays for the kernel code it runs
  for the first time since the restore; a network's set-up in the wake-up
  runs some of that code first, so "to ready" alone would charge it to the
  VM on a network; how much of it depends on the command, so there are two:
  ``true`` and ``sh -c :``. Both shapes' states are saved by the run itself,
  in an image directory of its own, so both start with the SSH login their
  state already holds, as a user's do from their own state directory.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import vmlease
from benchmarks.resets import own_images
from vmlease._paths import image_dir
from vmlease.backends.guest._segments import Networks
from vmlease.backends.guest.images import build_debian, build_tiny
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"
#: The phase of a start that wakes the guest (and sets its private networks).
_WAKE = "wake"
MB = 512
#: Starts from the saved state and resets per shape, per run asked for.
_WARM_PER_RUN = 3
#: How many booted states per shape those start from, in turn.
_STATES = 3
#: Two first commands, a program and a shell's builtin: after a restore each runs
#: kernel code new to TCG, some of which a network's set-up runs first.
_FIRST = {"true": ["true"], "sh -c :": ["sh", "-c", ":"]}
#: The pause before each sample.
_SETTLE_S = 0.3
#: Serves port 7001 in a guest (or the host): echoes round trips, swallows bulk.
_SERVER = """
import socket, sys, threading
def serve(c):
    with c:
        while True:
            data = c.recv(1 << 16)
            if not data:
                return
            if len(data) == 1:
                c.sendall(data)
s = socket.create_server((sys.argv[1], 7001))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
#: From a guest to HOST:PORT: microseconds per round trip (the mean of 200: a guest's
#: clock may tick too coarsely to time one), then MB/s one way.
_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = time.perf_counter()
for _ in range(200):
    c.sendall(b"x"); c.recv(1)
rtt = (time.perf_counter() - t) / 200
block = b"y" * 65536
t = time.perf_counter()
for _ in range(512):
    c.sendall(block)
c.shutdown(socket.SHUT_WR); c.recv(1)
took = time.perf_counter() - t
print(rtt * 1e6, 32 / took)
"""


def _host_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                if len(data) == 1:
                    conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def _measure(vm: vmlease.VM, host: str, port: int) -> tuple[float, float]:
    done = vm.run(["python3", "-c", _CLIENT, host, str(port)], timeout_s=300, check=True)
    rtt, rate = done.stdout.split()
    return float(rtt), float(rate)


def traffic(runs: int) -> dict[str, Any]:
    """Round trips and throughput on the segment and through user-mode networking."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmlease-networks-") as tmp:
        session = vmlease.Session(state_dir=Path(tmp))
        server, port = _host_server()
        try:
            a = session.create("debian-12", memory_mb=MB, networks=["lan"], name="a")
            b = session.create("debian-12", memory_mb=MB, networks=["lan"], name="b")
            b.run(["sh", "-c", f"nohup python3 -c '{_SERVER}' 0.0.0.0 >/dev/null 2>&1 &"])
            b.wait_for_port(7001)
            for _ in range(runs):
                for where, host, to in (("segment", "b", 7001), ("user", "10.0.2.2", port)):
                    rtt, rate = _measure(a, host, to)
                    samples.setdefault(f"{where} rtt_us", []).append(rtt)
                    samples.setdefault(f"{where} MB/s", []).append(rate)
        finally:
            server.close()
            session.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def _frame_rtt(here: socket.socket, there: socket.socket, out: bytes, back: bytes) -> float:
    """One frame each way between two ports, as QEMU's stream netdev frames them."""

    def relay(sender: socket.socket, receiver: socket.socket, frame: bytes) -> None:
        sender.sendall(struct.pack(">I", len(frame)) + frame)
        want, got = 4 + len(frame), b""
        while len(got) < want:
            chunk = receiver.recv(want - len(got))
            if not chunk:
                raise ConnectionError("the switch hung up on a port")
            got += chunk

    start = time.perf_counter()
    relay(here, there, out)
    relay(there, here, back)
    return time.perf_counter() - start


def switch_alone(frames: int = 3000) -> float:
    """The median round trip, in us, of a frame through a network's switch, no VM."""
    a_mac, b_mac = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    out = b_mac + a_mac + b"\x08\x00" + bytes(84)
    back = a_mac + b_mac + b"\x08\x00" + bytes(84)
    with tempfile.TemporaryDirectory(prefix="vmlease-switch-") as tmp:
        networks = Networks(Path(tmp))
        try:
            (a,), (b,) = networks.join("a", ("lan",)), networks.join("b", ("lan",))
            with socket.socket(socket.AF_UNIX) as here, socket.socket(socket.AF_UNIX) as there:
                for end, port in ((here, a), (there, b)):
                    end.settimeout(10)  # a frame lost is an error, not a hang
                    end.connect(str(port.socket))
                _frame_rtt(here, there, out, back)  # the switch learns both MACs
                samples = [_frame_rtt(here, there, out, back) for _ in range(frames)]
        finally:
            networks.close()
    return statistics.median(samples) * 1e6


def _session(
    state: Path, *, warm: bool, images: Path | None = None
) -> tuple[vmlease.Session, QemuBackend]:
    backend = QemuBackend(state_dir=state, image_dir=images, warm_start=warm, env=os.environ)
    return vmlease.Session(backend=backend, state_dir=state), backend


def _cold(cold: vmlease.Session, networks: list[str]) -> float:
    t = time.perf_counter()
    cold.create("debian-12", memory_mb=MB, networks=networks).delete()
    return time.perf_counter() - t


def _warm(
    warm: vmlease.Session, backend: QemuBackend, networks: list[str], first: str
) -> dict[str, float]:
    """One start from the saved state, to ready and to the reply of command ``first``,
    then a reset to its reply, and of that reset its wake-up and the command."""
    t = time.perf_counter()
    vm = warm.create("debian-12", memory_mb=MB, networks=networks)
    took = {"warm": time.perf_counter() - t}
    vm.run(_FIRST[first], check=True)
    took[f"warm+cmd {first}"] = time.perf_counter() - t
    t = time.perf_counter()
    vm.reset()
    ran = time.perf_counter()
    vm.run(_FIRST[first], check=True)
    took[f"reset {first}"] = time.perf_counter() - t
    took[f"reset's command {first}"] = time.perf_counter() - ran
    took["reset's wake-up"] = backend.start_timings(vm.name).get(_WAKE, 0.0)
    vm.delete()
    return took


def starts(runs: int) -> dict[str, Any]:
    """Cold boots, starts from the saved state and resets, with and without a network.

    Each round runs the two shapes (and, from a state, each with each first
    command) in a random order after a pause (which also lets the last VM's
    QEMU finish exiting): a fixed order could hand one shape every slow turn
    of the host. Cold boots are max(3, runs/2) per shape;
    starts from the state and resets, which take a fraction of a second,
    ``_WARM_PER_RUN`` times ``runs``, so that their medians hold against the
    host's drift, from ``_STATES`` states per shape in turn, each saved anew,
    so that no one state's moment (what its guest was doing when it was saved)
    decides a shape's figures."""
    samples: dict[str, list[float]] = {}
    shapes: dict[str, list[str]] = {"without": [], "with": ["lan"]}
    order = random.Random(runs)
    with tempfile.TemporaryDirectory(prefix="vmlease-networks-") as tmp:
        cold, _ = _session(Path(tmp) / "cold", warm=False)
        try:
            for _ in range(max(3, runs // 2)):
                kinds = list(shapes.items())
                order.shuffle(kinds)
                for kind, networks in kinds:
                    time.sleep(_SETTLE_S)
                    samples.setdefault(f"cold {kind}", []).append(_cold(cold, networks))
        finally:
            cold.close()
        for turn in range(_STATES):
            here = Path(tmp) / f"states-{turn}"
            here.mkdir()
            images = own_images(here)  # both shapes' states saved here, with one login
            warm, backend = _session(here / "warm", warm=True, images=images)
            try:
                for networks in shapes.values():  # each shape's booted state, saved once
                    warm.create("debian-12", memory_mb=MB, networks=networks).delete()
                for _ in range(-(-runs * _WARM_PER_RUN // _STATES)):
                    turns = [(kind, first) for kind in shapes for first in _FIRST]
                    order.shuffle(turns)
                    for kind, first in turns:
                        time.sleep(_SETTLE_S)
                        for what, value in _warm(warm, backend, shapes[kind], first).items():
                            samples.setdefault(f"{what} {kind}", []).append(value)
            finally:
                warm.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def main(runs: int = 7) -> int:
    build_tiny(image_dir())
    build_debian(image_dir(), "debian-12")
    moved = traffic(max(3, runs // 2))
    moved["switch alone rtt_us"] = switch_alone()
    started = starts(runs)
    print("private networks (debian-12, 1 vCPU, 512 MB; medians)")
    print(f"  {'':28} {'segment (VM to VM)':>20} {'user-mode (VM to host)':>24}")
    print(
        f"  {'TCP round trip':28} {moved['segment rtt_us'] / 1000:17.2f} ms "
        f"{moved['user rtt_us'] / 1000:21.2f} ms"
    )
    print(f"  {'throughput':28} {moved['segment MB/s']:15.1f} MB/s {moved['user MB/s']:19.1f} MB/s")
    print(
        f"  {'  of a round trip: the switch':28} {moved['switch alone rtt_us'] / 1000:17.2f} ms"
        "  (a frame there and back through it, no VM)"
    )
    print(f"  {'':28} {'without':>10} {'with lan':>10} {'cost':>8}  (goal < 10%)")
    costs = {}
    labels = {"cold": "cold boot to ready", "warm": "warm start to ready"}
    for first in _FIRST:
        labels[f"warm+cmd {first}"] = f"warm start to `{first}`"
    for first in _FIRST:
        labels[f"reset {first}"] = f"reset to `{first}`"
    for what, label in labels.items():
        without, with_ = started[f"{what} without"], started[f"{what} with"]
        costs[what] = with_ / without - 1
        print(f"  {label:28} {without:9.3f}s {with_:9.3f}s {costs[what]:+7.1%}")
    parts = [("reset's wake-up", "  of a reset: the wake-up")]
    parts += [(f"reset's command {first}", f"  of a reset: `{first}`") for first in _FIRST]
    for part, label in parts:
        print(f"  {label:28} {started[f'{part} without']:9.3f}s {started[f'{part} with']:9.3f}s")
    RESULTS.mkdir(exist_ok=True)
    out = {"traffic": moved, "starts": started, "costs": costs}
    (RESULTS / "networks.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0
