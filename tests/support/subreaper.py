"""Run a command as a child subreaper: ``python subreaper.py COMMAND...``.

libvirtd daemonizes each QEMU, so a QEMU that ends is reaped by the nearest
subreaper among its ancestors, else by PID 1. On a host, PID 1 (systemd)
reaps at once; on some CI machines PID 1 reaps late, and libvirt, which
waits for a destroyed QEMU's process to vanish, then takes a second or more
per destroy. The test daemons run under this instead, as under a host's init.

Signals SIGTERM, SIGINT and SIGHUP go on to the command; this process ends
with the command's exit status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: subreaper.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    children: list[int] = []

    def pass_on(number: int, _frame: object) -> None:
        for pid in children:
            os.kill(pid, number)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, pass_on)  # before the fork: exec resets them in the child
    child = os.fork()
    if child == 0:
        os.execvp(argv[0], argv)  # noqa: S606 - an argument list, as given
    children.append(child)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
