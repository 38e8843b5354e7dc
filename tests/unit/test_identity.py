from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from vmlease._identity import Liveness, current_owner, liveness
from vmlease._procfs import process_start_time


def test_this_process_is_alive() -> None:
    owner = current_owner("s1")
    assert owner.pid == os.getpid()
    assert owner.start_time > 0
    assert owner.boot_id
    assert liveness(owner) is Liveness.ALIVE


def test_an_exited_process_is_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    owner = dataclasses.replace(current_owner("s1"), pid=child.pid, start_time=12345)
    assert liveness(owner) is Liveness.DEAD


def test_a_reused_pid_is_dead() -> None:
    # Same pid, other start time: the pid now belongs to another process.
    owner = current_owner("s1")
    assert liveness(dataclasses.replace(owner, start_time=owner.start_time + 1)) is Liveness.DEAD


def test_another_boot_is_dead() -> None:
    owner = dataclasses.replace(current_owner("s1"), boot_id="not-this-boot")
    assert liveness(owner) is Liveness.DEAD


def test_another_host_is_unknown() -> None:
    owner = dataclasses.replace(current_owner("s1"), host="elsewhere.invalid")
    assert liveness(owner) is Liveness.UNKNOWN


def test_start_time_of_missing_process_is_none() -> None:
    assert process_start_time(2**22 + 12345) is None
