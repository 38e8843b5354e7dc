"""Checks that another process's commands run beside a VM's owner's, not in turns.

Each check makes one side's command wait, in the guest, for a mark that only
the other side's command writes. If the two took turns on one channel, the
waiting side would hold the agent and the other could never write its mark:
the check would fail (the waiter gives up after ``WAIT_S``), whatever the
machine's speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import vmlease

__all__ = ["WAIT_S", "check_side_by_side"]

#: How long a waiting command waits for the other side's mark.
WAIT_S = 60


def _wait_for(mark: str, started: str) -> list[str]:
    """A guest command that writes ``started``, then exits 0 once ``mark`` exists
    (1 after ``WAIT_S``)."""
    tenths = WAIT_S * 10
    return [
        "sh",
        "-c",
        f"touch {started}; i=0; while [ ! -e {mark} ]; do i=$((i+1)); "
        f'[ "$i" -gt {tenths} ] && exit 1; sleep 0.1; done; echo seen',
    ]


def _exec(vm: vmlease.VM, state: Path, env: Mapping[str, str], *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmlease", "exec", vm.name, "--", *argv],
        env={**os.environ, **env, "VMLEASE_STATE_DIR": str(state)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_side_by_side(vm: vmlease.VM, state: Path, env: Mapping[str, str] | None = None) -> None:
    """A long ``vmlease exec`` and the owner's commands, both ways round."""
    env = env or {}
    # Another process's long command; the owner's commands run meanwhile.
    visitor = _exec(vm, state, env, *_wait_for("/tmp/owner-mark", "/tmp/visitor-started"))
    try:
        # Once it runs, the owner's commands must get through while it waits.
        vm.wait_until_succeeds(["test", "-e", "/tmp/visitor-started"], timeout_s=WAIT_S)
        assert vm.run(["echo", "mine"]).stdout == "mine\n"
        vm.run(["touch", "/tmp/owner-mark"], check=True)
        out, err = visitor.communicate(timeout=WAIT_S + 30)
    finally:
        if visitor.poll() is None:
            visitor.kill()
            visitor.communicate()
    assert (visitor.returncode, out) == (0, "seen\n"), err

    # The owner's long command; another process's commands run meanwhile.
    result: list[vmlease.CommandResult | BaseException] = []

    def owner() -> None:
        try:
            waiting = _wait_for("/tmp/visitor-mark", "/tmp/owner-started")
            result.append(vm.run(waiting, timeout_s=WAIT_S + 30))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        # Another process sees the owner's command running, then lets it end.
        line = (
            f"i=0; while [ ! -e /tmp/owner-started ]; do i=$((i+1)); "
            f'[ "$i" -gt {WAIT_S * 10} ] && exit 1; sleep 0.1; done; '
            "echo theirs; touch /tmp/visitor-mark"
        )
        done = _exec(vm, state, env, "sh", "-c", line)
        out, err = done.communicate(timeout=WAIT_S + 30)
        assert (done.returncode, out) == (0, "theirs\n"), err
    finally:
        thread.join(WAIT_S + 30)
    [outcome] = result
    assert not isinstance(outcome, BaseException), outcome
    assert (outcome.exit_code, outcome.stdout) == (0, "seen\n"), outcome.stderr
