"""Reading ``/proc``: process start times, command lines, the boot id, the host CPU.

Every look at ``/proc`` goes through here, so the few facts vmlease takes
from it (is this pid still the process we knew, which processes belong to a
VM, which boot is this) are read one way. A process that vanishes while it
is being read is simply not there: no function here raises for that.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "boot_id",
    "cmdline",
    "host_tsc_khz",
    "mem_available_bytes",
    "memory_bytes",
    "own_command",
    "pids",
    "pids_with_arg",
    "process_start_time",
]

PROC = Path("/proc")


def boot_id() -> str:
    """The current boot id, or "" where the kernel does not tell."""
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[19])


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, or a debugger holds it)."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return raw[raw.rfind(")") + 2 :][:1] in ("T", "t")


def mem_available_bytes() -> int | None:
    """The memory the host can give new processes without swapping (``MemAvailable``)."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_bytes(pid: int) -> int | None:
    """The memory ``pid`` really holds, or None if it is gone: its proportional
    set (PSS: each page it shares with other processes counted as its share), so
    that VMs mapping one booted state's memory are not each charged for all of
    it; its resident set where the kernel has no ``smaps_rollup``."""
    for name, field in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in (PROC / str(pid) / name).read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except FileNotFoundError:
            continue
        except (OSError, ValueError, IndexError):
            return None
    return None


def cmdline(pid: int | str) -> list[bytes] | None:
    """The arguments ``pid`` was started with, or None if it is gone (or a kernel thread)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0")[:-1] if raw else None


def own_command(limit: int = 300) -> str:
    """This process's command line as text, for saying who holds something."""
    args = cmdline("self") or []
    return " ".join(a.decode(errors="replace") for a in args if a)[:limit]


def pids(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids of the live processes whose command line ``match`` accepts (never this one)."""
    found = []
    me = os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        args = cmdline(entry.name)
        if args is not None and match(args):
            found.append(int(entry.name))
    return found


def pids_with_arg(arg: str | bytes) -> list[int]:
    """Pids of the live processes that have ``arg`` as one whole argument.

    A VM's QEMU is known this way by its pidfile path, which no other
    process names as an argument: a pid alone may have been reused.
    """
    want = arg.encode() if isinstance(arg, str) else arg
    return pids(lambda args: want in args)


def host_tsc_khz(cpuinfo: Path = PROC / "cpuinfo") -> int | None:
    """The host CPU's clock in kHz as ``/proc/cpuinfo`` states it (its TSC rate), if it does."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None
