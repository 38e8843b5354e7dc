from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from vmlease import ConfigError, LockTimeout
from vmlease._locks import Lock, Semaphore


def test_places_are_limited_and_come_back(tmp_path: Path) -> None:
    sem = Semaphore(tmp_path, "vm", 2)
    a, b = sem.acquire(0), sem.acquire(0)
    assert sem.try_acquire() is None
    a.release()
    c = sem.try_acquire()
    assert c is not None
    b.release()
    c.release()
    assert (tmp_path / "locks").stat().st_mode & 0o777 == 0o700


def test_timeout_says_what_holds_the_places(tmp_path: Path) -> None:
    sem = Semaphore(tmp_path, "vm", 1)
    held = sem.acquire()
    with pytest.raises(LockTimeout, match="all 1 places") as info:
        sem.acquire(timeout_s=0.1)
    assert isinstance(info.value, TimeoutError)
    held.release()


@pytest.mark.parametrize("slots", [0, -1, 1.5, True, "2"])
def test_bad_limits_are_refused(tmp_path: Path, slots: object) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        Semaphore(tmp_path, "vm", slots)  # type: ignore[arg-type]


def _hold(state: str, ready: multiprocessing.synchronize.Event) -> None:
    Semaphore(Path(state), "vm", 1).acquire()
    ready.set()
    time.sleep(60)


def test_a_killed_holder_frees_its_place_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(30)
    sem = Semaphore(tmp_path, "vm", 1)
    assert sem.try_acquire() is None
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    place = sem.acquire(timeout_s=5)
    place.release()


def _count_at_once(args: tuple[str, str, int]) -> int:
    state, counter, rounds = args
    sem = Semaphore(Path(state), "vm", 2)
    most = 0
    for _ in range(rounds):
        place = sem.acquire(timeout_s=60)
        with Path(counter).open("a") as f:
            f.write("+\n")
        # Each holder writes + after taking its place and - before giving it
        # back, so this count never exceeds the true number of holders.
        text = Path(counter).read_text()
        now = text.count("+") - text.count("-")
        most = max(most, now)
        time.sleep(0.01)
        with Path(counter).open("a") as f:
            f.write("-\n")
        place.release()
    return most


def test_never_more_than_n_holders_across_four_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.touch()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        most = pool.map(_count_at_once, [(str(tmp_path), str(counter), 15)] * 4)
    assert max(most) <= 2
    assert max(most) >= 1


# -- named locks ---------------------------------------------------------------


def test_a_lock_is_exclusive_and_its_timeout_names_the_holder(tmp_path: Path) -> None:
    first = Lock("db", state_dir=tmp_path)
    second = Lock("db", state_dir=tmp_path, timeout_s=0.1)
    with first:
        with pytest.raises(LockTimeout) as info:
            second.acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message
        assert "pytest" in message or "python" in message  # this process's command
        assert "since 20" in message
    with second:  # free again
        pass
    assert (tmp_path / "locks" / "db.lock").stat().st_mode & 0o777 == 0o600


def test_locks_of_other_names_do_not_conflict(tmp_path: Path) -> None:
    with Lock("a", state_dir=tmp_path), Lock("b", state_dir=tmp_path, timeout_s=0):
        pass


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a b", "-x", "x" * 65, 3])
def test_bad_lock_names_are_refused(tmp_path: Path, name: object) -> None:
    with pytest.raises(ConfigError, match="invalid lock name"):
        Lock(name, state_dir=tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / "locks").exists() or list((tmp_path / "locks").iterdir()) == []


def test_a_full_semaphore_names_its_holders(tmp_path: Path) -> None:
    sem = Semaphore(tmp_path, "vm", 2)
    a, b = sem.acquire(), sem.acquire()
    with pytest.raises(LockTimeout, match=f"held by pid {os.getpid()}"):
        sem.acquire(timeout_s=0.05)
    a.release()
    b.release()
