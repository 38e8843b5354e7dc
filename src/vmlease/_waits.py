"""Waiting for a real system: one polling loop with one timeout, for every wait.

The waits on a VM handle (``wait_until_succeeds``, ``wait_for_unit``,
``wait_for_port``, ``wait_for_console``) are checks run again and again
until they pass or the time runs out. A timeout raises WaitTimeout showing
what the last check said and the console's last lines, so a failure says
why without a second run. All times are in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vmlease._errors import ConfigError, WaitTimeout

__all__ = ["INIT_PROBE", "Check", "listening_probe", "poll", "port_number"]

T = TypeVar("T")

#: Prints the guest's init: ``systemd`` (its own test, as ``sd_booted`` makes it),
#: ``openrc``, or ``busybox`` and the like (what PID 1 runs).
INIT_PROBE = (
    "if [ -d /run/systemd/system ]; then echo systemd; "
    "elif [ -d /run/openrc ] || command -v openrc >/dev/null 2>&1; then echo openrc; "
    'else basename "$(readlink /proc/1/exe 2>/dev/null || echo unknown)"; fi'
)


@dataclass(frozen=True, slots=True)
class Check(Generic[T]):
    """One try: ``value`` when it passed, else what it said (``detail``).

    ``final`` stops the waiting at once: the condition cannot come true any
    more (a systemd unit that failed).
    """

    value: T | None
    detail: str = ""
    final: bool = False


def poll(
    what: str,
    check: Callable[[], Check[T]],
    *,
    timeout_s: float,
    interval_s: float,
    console: Callable[[], str],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``check`` until it passes; WaitTimeout (with its last word and the console) if not."""
    for name, value in (("timeout_s", timeout_s), ("interval_s", interval_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    deadline = clock() + timeout_s
    while True:
        result = check()
        if result.value is not None:
            return result.value
        if result.final or clock() >= deadline:
            why = "cannot happen any more" if result.final else f"not within {timeout_s:g} s"
            raise WaitTimeout(
                f"{what}: {why}\n--- last check said ---\n{result.detail.strip() or '(nothing)'}"
                f"\n--- console (last lines) ---\n{console()}",
                detail=result.detail,
            )
        sleep(min(interval_s, max(0.0, deadline - clock())))


def port_number(port: object) -> int:
    """A TCP port (1 to 65535); ConfigError otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"a port is a whole number from 1 to 65535, not {port!r}")
    return port


def listening_probe(port: int) -> list[str]:
    """A command that exits 0 when something in the guest listens on TCP ``port``.

    It reads ``/proc/net/tcp`` and ``tcp6`` (state ``0A`` is LISTEN), so it
    needs nothing beyond a shell and grep: it works on tiny and Debian alike.
    """
    line = f"^ *[0-9]+: [0-9A-F]+:{port:04X} [0-9A-F]+:[0-9A-F]+ 0A "
    return ["sh", "-c", f"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -qiE '{line}'"]
