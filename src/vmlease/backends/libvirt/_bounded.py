"""Calls into libvirt that end by their deadline, whatever libvirtd does.

A libvirt call waits on the daemon; one that stopped answering (stopped,
swapped out, wedged) holds the call until the connection's keepalive gives
up on it, 15 s or more later. :func:`within` runs a call in a thread of its
own and stops waiting at the deadline: the caller gets BackendTimeout naming
the operation, and whatever the call returns late is handed to ``late`` (to
close a stream it opened, say) instead of being lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from vmlease._errors import BackendTimeout

__all__ = ["within"]

T = TypeVar("T")


def within(
    timeout_s: float,
    what: str,
    call: Callable[[], T],
    *,
    late: Callable[[T], None] | None = None,
) -> T:
    """``call()``'s result, if it comes within ``timeout_s``; else BackendTimeout
    saying that ``what`` got no answer from libvirt in time."""
    lock = threading.Lock()
    outcome: list[tuple[bool, object]] = []
    gave_up = False

    def run() -> None:
        try:
            result: tuple[bool, object] = (True, call())
        except BaseException as exc:  # handed to the caller below
            result = (False, exc)
        with lock:
            outcome.append(result)
            abandoned = gave_up
        if abandoned and result[0] and late is not None:
            late(result[1])  # type: ignore[arg-type]

    worker = threading.Thread(target=run, name="vmlease-libvirt-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    with lock:
        if not outcome:
            gave_up = True
    if gave_up:
        raise BackendTimeout(
            f"{what}: libvirt did not answer within {timeout_s:g} s "
            "(is libvirtd running, and answering?)"
        )
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
