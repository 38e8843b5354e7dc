"""`vmlease lock NAME -- COMMAND`, run as shell suites run it: separate processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmlease._locks import _read_holder

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VMLEASE_STATE_DIR": str(tmp_path / "state")}


def lock_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmlease", "lock", *args]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, each in a group of its own; all killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()  # waits, and closes its pipes


def start(procs: list[subprocess.Popen[bytes]], argv: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    procs.append(proc)
    return len(procs) - 1


def wait_until_held_by(lock_file: Path, pid: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        holder = _read_holder(lock_file)
        if holder is not None and holder.pid == pid:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never took {lock_file}")


def test_two_contenders_take_turns(
    env: dict[str, str], tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "log"
    script = f"echo start >> {log}; sleep 0.4; echo end >> {log}"
    for _ in range(2):
        start(started, lock_argv("--timeout", "30", "turns", "--", "sh", "-c", script), env)
    assert [p.wait(timeout=30) for p in started] == [0, 0]
    assert log.read_text().split() == ["start", "end", "start", "end"]


def test_sigkill_of_the_holder_frees_the_lock_at_once(
    env: dict[str, str], tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    holder = started[start(started, lock_argv("k", "--", "sleep", "60"), env)]
    wait_until_held_by(tmp_path / "state" / "locks" / "k.lock", holder.pid)
    waiter = started[start(started, lock_argv("--timeout", "30", "k", "--", "true"), env)]
    time.sleep(0.3)
    assert waiter.poll() is None, "the waiter did not wait"
    killed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)  # its `sleep 60` lives on, without the lock
    assert waiter.wait(timeout=10) == 0
    assert time.monotonic() - killed_at < 1.0


def test_a_wait_that_runs_out_names_the_holder(
    env: dict[str, str], tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    holder = started[start(started, lock_argv("busy", "--", "sleep", "60"), env)]
    wait_until_held_by(tmp_path / "state" / "locks" / "busy.lock", holder.pid)
    done = subprocess.run(
        lock_argv("--timeout", "0.3", "busy", "--", "true"),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert f"held by pid {holder.pid}" in done.stderr
    assert "vmlease lock busy -- sleep 60" in done.stderr
    assert "since" in done.stderr


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["sh", "-c", "exit 7"], 7),
        (["true"], 0),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
        (["no-such-command-here"], 127),
    ],
)
def test_the_commands_exit_status_is_passed_through(
    env: dict[str, str], command: list[str], status: int
) -> None:
    done = subprocess.run(
        lock_argv("status", "--", *command), env=env, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == status


def test_a_bad_lock_name_is_refused_and_nothing_runs(env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = subprocess.run(
        lock_argv("../x", "--", "touch", str(marker)),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid lock name" in done.stderr
    assert not marker.exists()


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    "words",
    [
        ["--timeout", "5", "L", "--"],
        ["L", "--timeout", "5", "--"],
        ["L", "--timeout=5", "--"],
        ["L", "--timeout", "5"],  # without --: the program starts after NAME
    ],
)
def test_options_go_before_or_after_the_name(
    env: dict[str, str], tmp_path: Path, words: list[str]
) -> None:
    marker = tmp_path / "ran"
    done = _run(lock_argv(*words, "touch", str(marker)), env)
    assert done.returncode == 0, done.stderr
    assert marker.exists()


def test_after_the_double_dash_every_word_is_the_programs(env: dict[str, str]) -> None:
    done = _run(lock_argv("L", "--", "echo", "--timeout", "5"), env)
    assert (done.returncode, done.stdout) == (0, "--timeout 5\n")


@pytest.mark.parametrize("verb", ["lock", "exec"])
@pytest.mark.parametrize(
    "words",
    [
        ["L", "--bogus", "--"],
        ["L", "--timeout", "5", "--bogus"],
        ["--bogus", "L", "--"],
    ],
)
def test_an_unknown_option_is_an_error_that_names_it_and_runs_nothing(
    env: dict[str, str], tmp_path: Path, verb: str, words: list[str]
) -> None:
    marker = tmp_path / "ran"
    argv = [sys.executable, "-m", "vmlease", verb, *words, "touch", str(marker)]
    done = _run(argv, env)
    assert done.returncode == 2
    assert f"vmlease {verb}: unknown option --bogus" in done.stderr
    assert "command not found" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["lock", "exec"])
def test_no_program_is_an_error_with_the_usage(env: dict[str, str], verb: str) -> None:
    done = _run([sys.executable, "-m", "vmlease", verb, "L", "--"], env)
    assert done.returncode == 2
    assert f"vmlease {verb}: no command given" in done.stderr
    assert f"usage: vmlease {verb} [--timeout S] NAME -- COMMAND" in done.stderr
