"""A QEMU VM's record, and the ways into it from the host besides the agent:
port forwards on 127.0.0.1 and SSH.

``vm.json`` in the VM's directory says how to launch it again, its spec, its
image build, and its forwards, so that a restore or a restart brings them
back on the same host ports when they are free.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmlease._errors import BackendError, ChannelError, GuestFileError, VMNotFound
from vmlease._ssh import SSHInfo
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._wakeup import authorize_key
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu._launch import QMP_SOCKET
from vmlease.backends.qemu._qmp import QMP, host_forwards

__all__ = [
    "HOST_KEYS",
    "RECORD",
    "Login",
    "apply_forwards",
    "authorize",
    "read_record",
    "ssh_info",
    "write_private",
    "write_record",
]

RECORD = "vm.json"
#: A VM's SSH host keys as its guest reported them when it started.
HOST_KEYS = "ssh_host_keys.pub"


def read_record(vm_dir: Path) -> dict[str, Any]:
    """The VM's ``vm.json``; VMNotFound if it has none."""
    try:
        record: dict[str, Any] = json.loads((vm_dir / RECORD).read_text())
    except FileNotFoundError as exc:
        raise VMNotFound(f"the qemu backend has no VM named {vm_dir.name!r}") from exc
    return record


def write_record(vm_dir: Path, record: dict[str, Any]) -> None:
    (vm_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its user alone, whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class Login:
    """Who ``vm.ssh`` logs in as, with which key pair (the public half as a line)."""

    user: str
    key: Path
    public: str

    def saved(self, host_keys: str) -> dict[str, str]:
        """This login as a saved state records it, with the guest's ``host_keys``."""
        return {"user": self.user, "key": self.public, "host_keys": host_keys}


def authorize(
    vm_dir: Path,
    channel: AgentChannel,
    image: Image,
    login: Login,
    saved: object,
    deadline: float,
) -> None:
    """Make ``login`` the one the guest accepts, and keep its host keys (in
    ``HOST_KEYS``) for ``vmlease ssh`` from any process.

    ``saved`` is what the state the VM just started from says it accepts (see
    ``_mapped.state_meta``), or None. If that is this very login, nothing
    changes in the guest; if it is root's, root's key is replaced by one file
    copy (the agent's PUT: no process started, where a fresh start has no
    code translated yet); otherwise the image's way runs in the guest.
    """
    known = saved if isinstance(saved, dict) and saved.get("host_keys") else {}
    host_keys: str | None = None
    if known.get("user") == login.user and known.get("key") == login.public:
        host_keys = str(known["host_keys"])
    elif known.get("user") == login.user == "root":
        public_file = login.key.with_name(login.key.name + ".pub")
        with contextlib.suppress(ChannelError, GuestFileError):
            channel.put(public_file, "/root/.ssh/authorized_keys", 0o600, deadline)
            host_keys = str(known["host_keys"])
    if host_keys is None:
        host_keys = authorize_key(
            channel,
            vm_dir.name,
            image=image.name,
            image_user=image.ssh_user,
            user=login.user,
            public_key=login.public,
            deadline=deadline,
        )
    write_private(vm_dir / HOST_KEYS, host_keys)


def apply_forwards(vm_dir: Path, wanted: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Make every ``guest: host`` forward of ``wanted`` (and those recorded) exist
    on 127.0.0.1; host port 0 lets the kernel choose. Returns all the VM's
    forwards, which ``vm.json`` keeps. The caller holds the VM's lock."""
    name = vm_dir.name
    record = read_record(vm_dir)
    forwards = {int(k): int(v) for k, v in record.get("forwards", {}).items()}
    for guest, host in wanted.items():
        forwards.setdefault(guest, host)
    if not forwards:
        return forwards
    with QMP(vm_dir / QMP_SOCKET, timeout_s=timeout_s) as qmp:
        present = host_forwards(qmp.hmp("info usernet", timeout_s=timeout_s))
        for guest, host in sorted(forwards.items()):
            if present.get(guest):
                continue
            said = qmp.hmp(f"hostfwd_add net0 tcp:127.0.0.1:{host}-:{guest}", timeout_s=timeout_s)
            if said and host:  # the recorded port is taken now: take another
                said = qmp.hmp(f"hostfwd_add net0 tcp:127.0.0.1:0-:{guest}", timeout_s=timeout_s)
            if said:
                raise BackendError(f"VM {name}: cannot forward port {guest}: {said}")
        present = host_forwards(qmp.hmp("info usernet", timeout_s=timeout_s))
    missing = sorted(set(forwards) - set(present))
    if missing:
        raise BackendError(f"VM {name}: QEMU does not list forwards for ports {missing}")
    forwards = {guest: present[guest] for guest in forwards}
    record["forwards"] = {str(k): v for k, v in sorted(forwards.items())}
    write_record(vm_dir, record)
    return forwards


def ssh_info(vm_dir: Path, port: int, user: str, key: Path) -> SSHInfo:
    """How to reach the VM's sshd on host port ``port``, with its host keys as its
    guest reported them when it started (a known_hosts file of its own)."""
    try:
        lines = (vm_dir / HOST_KEYS).read_text().splitlines()
    except FileNotFoundError:
        lines = []
    keys = [line.split()[:2] for line in lines if len(line.split()) >= 2]
    if not keys:
        raise ChannelError(f"VM {vm_dir.name}: its SSH host keys were not read when it started")
    known = vm_dir / "known_hosts"
    write_private(known, "".join(f"[127.0.0.1]:{port} {kind} {key}\n" for kind, key in keys))
    return SSHInfo("127.0.0.1", port, user, key, known)
