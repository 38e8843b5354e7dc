"""The private networks of one backend instance's VMs (one session's), for both
QEMU-based backends.

A network is a directory under the backend's root, ``.lan-<instance>-<name>``,
served by a switch process of its own (``_switch.py``) that this process
starts on the first VM that joins. The switch holds each VM's port: a Unix
socket its QEMU connects to (the qemu backend), or a TCP port on 127.0.0.1
(libvirt's ``client`` interfaces, whose QEMU runs as another user). The switch
ends when this process does (it watches its owner's pidfd), and removes its
directory: a network outlives neither its session nor a SIGKILL of it.

Each VM on a network gets an address of the network's /24 (by the order it
joined) and a MAC made from that address (``_machine.py`` ``lan_mac``), set in the guest
(``_lans.py``) whenever it becomes ready, is started from a saved state or is
reset: a booted state holds the interface of whichever VM saved it, and two
VMs started from one state must not share an address. Every VM on a network
finds the others by name through ``/etc/hosts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError, BootError, ChannelError, InvalidSpec, VMNotFound
from vmlease._procfs import pids_with_arg
from vmlease._timeouts import DEFAULT
from vmlease.backends.guest._agent import NET, AgentChannel
from vmlease.backends.guest._lans import NET_SINCE, LanLink, LanNames, pack, set_lans
from vmlease.backends.guest._machine import lan_mac
from vmlease.backends.guest._switch import CONTROL

__all__ = ["LanOperations", "Networks", "Port", "Updates", "qemu_uids"]

#: How long a switch may take to come up, and to answer a request.
_START_S = 10.0
#: A network directory no switch serves is a leftover once older than this.
_STALE_S = 60.0
_ASK_S = 5.0
#: The first address a VM gets on a network (.10, .11, ...), and the most VMs.
_FIRST_HOST = 10
_MAX_MEMBERS = 200
#: The users a host's libvirt runs QEMU as, by distribution, besides root.
_QEMU_USERS = ("libvirt-qemu", "qemu")

#: What the other VMs on a VM's networks are to be told: their names, by VM.
Updates = list[tuple[str, LanNames]]


def qemu_uids() -> set[int]:
    """Who may connect to a TCP port of a switch: this user, root, and the users
    libvirt runs QEMU as."""
    uids = {os.getuid(), 0}
    for user in _QEMU_USERS:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(user).pw_uid)
    return uids


@dataclass(frozen=True, slots=True)
class Port:
    """A VM's port on a network: the network's directory, its Unix socket there,
    the MAC of the VM's interface there, and its TCP port on 127.0.0.1 (when one
    was asked for)."""

    network: Path
    socket: Path
    mac: str
    tcp: int | None = None


@dataclass
class _Network:
    name: str
    path: Path
    subnet: int
    process: subprocess.Popen[bytes]
    #: VM name -> its host number on the network.
    members: dict[str, int] = field(default_factory=dict)
    #: VMs whose guest knows its address (to tell of newcomers).
    configured: set[str] = field(default_factory=set)

    def address(self, vm: str) -> str:
        return f"192.168.{self.subnet}.{self.members[vm]}"


class Networks:
    """This backend instance's private networks.

    Args:
        root: the backend's VM directories, where networks' directories go too.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.instance = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._networks: dict[str, _Network] = {}
        #: VM name -> the networks it joined, in the order its spec names them.
        self._joined: dict[str, tuple[str, ...]] = {}
        #: VM name -> the other name its networks know it by.
        self._aliases: dict[str, str] = {}
        #: VM name -> what the others are to be told, its wake-up having set its networks.
        self._woken: dict[str, Updates] = {}

    def sweep(self, now: float | None = None) -> list[Path]:
        """Remove the network directories under the root that no switch serves (one
        killed on its own, or a reboot's leftovers) and that are older than a switch
        takes to start; the ones removed. Live networks are never touched."""
        now = time.time() if now is None else now
        gone = []
        for path in self.root.glob(".lan-*") if self.root.is_dir() else []:
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _STALE_S and not pids_with_arg(str(path)):
                    shutil.rmtree(path)
                    gone.append(path)
        return gone

    def _start(self, name: str) -> _Network:
        if not self._networks:
            self.sweep()
        path = self.root / f".lan-{self.instance}-{name}"
        path.mkdir(mode=0o700, parents=True)
        with (path / "switch.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmlease.backends.guest._switch",
                    str(path),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the tests is not its to take
            )
        deadline = time.monotonic() + _START_S
        while not (path / CONTROL).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                why = (path / "switch.log").read_text(errors="replace")[-500:]
                shutil.rmtree(path, ignore_errors=True)
                raise BackendError(f"the switch of network {name} did not start: {why}")
            time.sleep(0.01)
        return _Network(name, path, 100 + len(self._networks), process)

    def _ask(self, network: _Network, **request: Any) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(_ASK_S)
                conn.connect(str(network.path / CONTROL))
                conn.sendall(json.dumps(request).encode() + b"\n")
                reply: dict[str, Any] = json.loads(conn.makefile().readline() or "{}")
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"the switch of network {network.name} did not answer: {exc}"
            ) from exc
        if not reply.get("ok"):
            raise BackendError(f"network {network.name}: {reply.get('error', 'no answer')}")
        return reply

    def join(
        self,
        vm: str,
        names: tuple[str, ...],
        *,
        alias: str | None = None,
        uids: set[int] | None = None,
    ) -> list[Port]:
        """VM ``vm`` (about to be launched) joins ``names``, known there by its name and
        ``alias``: each network's switch runs and holds its port, a Unix socket and,
        with ``uids``, a port on 127.0.0.1 that those users alone may connect to. A
        join that fails half-way is undone by ``leave`` like a whole one; a name
        another VM of a network goes by is InvalidSpec, before anything is made."""
        ports = []
        with self._lock:
            for name in names:
                known = self._names_on(name)
                for label in (vm, alias):
                    if label is not None and label in known:
                        raise InvalidSpec(
                            f"VM {vm}: a VM on network {name} goes by {label!r} already; "
                            "give each VM on a network an alias of its own"
                        )
            if alias is not None:
                self._aliases[vm] = alias
            for index, name in enumerate(names):
                network = self._networks.get(name)
                if network is None:
                    network = self._networks[name] = self._start(name)
                if len(network.members) >= _MAX_MEMBERS:
                    raise BackendError(f"network {name} has {_MAX_MEMBERS} VMs, its most")
                self._joined[vm] = names[: index + 1]
                taken = set(network.members.values())
                network.members[vm] = next(n for n in range(_FIRST_HOST, 256) if n not in taken)
                request: dict[str, Any] = {"op": "attach", "port": vm}
                if uids is not None:
                    request["uids"] = sorted(uids)
                reply = self._ask(network, **request)
                mac = lan_mac(network.address(vm))
                ports.append(
                    Port(network.path, network.path / reply["path"], mac, reply.get("tcp"))
                )
        return ports

    def _names_on(self, name: str) -> set[str]:
        """The names the VMs on network ``name`` go by (their own and their aliases)."""
        network = self._networks.get(name)
        members = set() if network is None else set(network.members)
        return members | {self._aliases[m] for m in members if m in self._aliases}

    def _known_as(self, network: _Network, vm: str) -> str:
        """VM ``vm``'s line in ``network``'s block of /etc/hosts."""
        alias = self._aliases.get(vm)
        return f"{network.address(vm)} {vm}" + (f" {alias}" if alias else "")

    def joined(self, vm: str) -> tuple[str, ...]:
        """The networks VM ``vm`` is on, in the order its spec names them."""
        with self._lock:
            return self._joined.get(vm, ())

    def index(self, vm: str, network: str) -> int:
        """Which of VM ``vm``'s networks ``network`` is; InvalidSpec if it is on none."""
        with self._lock:
            names = self._joined.get(vm, ())
        if network not in names:
            raise InvalidSpec(f"VM {vm} is not on network {network!r} (it is on {list(names)})")
        return names.index(network)

    def leave(self, vm: str) -> None:
        """VM ``vm`` is gone: its ports and addresses are free."""
        with self._lock:
            self._aliases.pop(vm, None)
            self._woken.pop(vm, None)
            for name in self._joined.pop(vm, ()):
                network = self._networks.get(name)
                if network is None:
                    continue
                network.members.pop(vm, None)
                network.configured.discard(vm)
                # Best effort: a VM's delete does not fail on its switch, which ends
                # with this process anyway.
                with contextlib.suppress(BackendError):
                    if network.process.poll() is None:
                        self._ask(network, op="detach", port=vm)

    def prepare(self, vm: str, channel: AgentChannel, deadline: float) -> None:
        """Bring VM ``vm``'s interfaces up with their MACs and no address, before its
        booted state is saved: a start from the state then only sets an address and
        a MAC, where an interface's first coming up is slow under TCG."""
        with self._lock:
            networks = [self._networks[name] for name in self._joined.get(vm, ())]
            macs = [lan_mac(network.address(vm)) for network in networks]
        links = [LanLink(index, mac, None) for index, mac in enumerate(macs)]
        set_lans(channel, links, (), deadline, vm)

    def _settings(self, vm: str) -> tuple[list[LanLink], list[LanNames], Updates]:
        """VM ``vm``'s interfaces and names, and the names the other VMs on its
        networks are to be given, by VM. From now on ``vm`` is told of newcomers:
        one that joins after this sees it configured and tells it (through its
        channel, so after what the caller sends it now)."""
        with self._lock:
            networks = [self._networks[name] for name in self._joined.get(vm, ())]
            links, blocks, others = [], [], []
            for index, network in enumerate(networks):
                address = network.address(vm)
                links.append(LanLink(index, lan_mac(address), f"{address}/24"))
                lines = "\n".join(self._known_as(network, m) for m in sorted(network.members))
                block = LanNames(network.name, lines)
                blocks.append(block)
                network.configured.add(vm)
                others += [(m, block) for m in sorted(network.configured) if m != vm]
        return links, blocks, others

    def configure(self, vm: str, channel: AgentChannel, deadline: float) -> Updates:
        """Set VM ``vm``'s interfaces and names in its guest (through ``channel``);
        returns the names the other VMs on its networks are to be given, by VM (the
        caller gives them without holding ``vm``'s channel)."""
        links, blocks, others = self._settings(vm)
        set_lans(channel, links, blocks, deadline, vm)
        return others

    def wake(self, vm: str, state: str, channel: AgentChannel, timeout_s: float) -> None:
        """Wake VM ``vm``'s guest after a start from ``state`` (``wake_as``), its
        interfaces and names set in the same exchange where its agent can: a
        round trip fewer than ``configure`` after it. What the others are to be
        told is then kept for ``woken``; a guest that could not set them is left
        to ``configure``, which says why."""
        self.woken(vm)  # an earlier wake-up's, never used: its start went no further
        if not self.joined(vm) or channel.protocol < NET_SINCE:
            channel.wake_as(vm, state, timeout_s)
            return
        links, blocks, others = self._settings(vm)
        answers = channel.wake_as(vm, state, timeout_s, also=[(NET, pack(links, blocks))])
        if answers == [None]:
            with self._lock:
                self._woken[vm] = others

    def woken(self, vm: str) -> Updates | None:
        """What the others are to be told, if VM ``vm``'s last wake-up set its networks
        (once: None after that)."""
        with self._lock:
            return self._woken.pop(vm, None)

    def control(self, name: str, **request: Any) -> dict[str, Any]:
        """Ask network ``name``'s switch (link, partition, heal, impair)."""
        with self._lock:
            network = self._networks.get(name)
        if network is None:
            raise BackendError(f"no VM of this session is on network {name}")
        return self._ask(network, **request)

    def close(self) -> None:
        """Stop every switch of this instance; their directories go with them."""
        with self._lock:
            networks, self._networks = list(self._networks.values()), {}
            self._joined.clear()
        for network in networks:
            network.process.terminate()
            try:
                network.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                network.process.kill()
                network.process.wait()
            shutil.rmtree(network.path, ignore_errors=True)


class LanOperations:
    """Private-network operations of a backend (mixed into it): ``lans`` and
    ``_agent`` from it, ``_set_link`` its own."""

    lans: Networks

    def _agent(
        self, name: str, timeout_s: float
    ) -> contextlib.AbstractContextManager[AgentChannel]:
        raise NotImplementedError

    def _set_link(self, name: str, index: int, up: bool, timeout_s: float) -> None:
        """Cut or restore VM ``name``'s interface on its ``index``-th network."""
        raise NotImplementedError

    def _lans_up(self, name: str, channel: AgentChannel, deadline: float) -> Updates:
        """VM ``name``'s private interfaces set (by its wake-up, or now); what the others
        are to be told."""
        told = self.lans.woken(name)
        return told if told is not None else self.lans.configure(name, channel, deadline)

    def _tell(self, updates: Updates, deadline: float) -> None:
        """Give each VM its network's names (a VM that is gone or stopped meanwhile is
        skipped: it learns the names when it is ready again)."""
        for vm, block in updates:
            with (
                contextlib.suppress(VMNotFound, ChannelError, BootError),
                self._agent(vm, _ASK_S) as channel,
            ):
                set_lans(channel, (), (block,), deadline, vm)

    def set_link(
        self, name: str, network: str, up: bool, *, timeout_s: float = DEFAULT.forward_s
    ) -> None:
        """Cut or restore VM ``name``'s link to ``network``: its interface sees no carrier."""
        self._set_link(name, self.lans.index(name, network), up, timeout_s)

    def network_control(
        self, network: str, request: Mapping[str, Any], *, timeout_s: float = DEFAULT.forward_s
    ) -> dict[str, Any]:
        """Ask ``network``'s switch: partition, heal, impair."""
        return self.lans.control(network, **request)
