"""Who owns a VM, and whether that owner is still alive.

An owner is a process on a host during one boot. A pid alone is not proof of
life (pids are reused), so the process start time and the boot id are kept
too: an owner is alive only if a process with that pid exists on the same
host and boot and started at the same moment.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass

from vmlease._procfs import boot_id, process_start_time

__all__ = ["Liveness", "Owner", "current_owner", "liveness"]


@dataclass(frozen=True, slots=True)
class Owner:
    """The identity of a VM's owner.

    Attributes:
        session_id: the vmlease session that created the VM.
        pid: the owning process.
        start_time: that process's start time, in clock ticks since boot
            (field 22 of ``/proc/PID/stat``); 0 when unknown.
        boot_id: the kernel's boot id at the time.
        host: the host name.
    """

    session_id: str
    pid: int
    start_time: int
    boot_id: str
    host: str


class Liveness(enum.Enum):
    """What we can say about an owner from here."""

    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # another host: we cannot look


def current_owner(session_id: str) -> Owner:
    """The identity of this process as the owner of ``session_id``."""
    pid = os.getpid()
    return Owner(
        session_id=session_id,
        pid=pid,
        start_time=process_start_time(pid) or 0,
        boot_id=boot_id(),
        host=socket.gethostname(),
    )


def liveness(owner: Owner) -> Liveness:
    """Whether ``owner`` is alive, judged from this host."""
    if owner.host != socket.gethostname():
        return Liveness.UNKNOWN
    if owner.boot_id and owner.boot_id != boot_id():
        return Liveness.DEAD
    started = process_start_time(owner.pid)
    if started is None:
        return Liveness.DEAD
    if owner.start_time and started != owner.start_time:
        return Liveness.DEAD  # the pid now belongs to another process
    return Liveness.ALIVE
