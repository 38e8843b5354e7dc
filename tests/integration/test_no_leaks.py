"""Never leak, never touch what is not ours: real QEMU VMs and real signals."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.killing import (
    gone_events,
    kill_reaper_then_owner,
    kill_trial,
    leftovers,
    reapers_under,
    start_owner,
    wait_until,
)
from tests.support.ledger import ledger_of
from vmlease._identity import current_owner
from vmlease._reaper import ReaperLink, spawn_reaper
from vmlease._spec import VMSpec
from vmlease.backends.qemu import QemuBackend


def cli(state: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("point", "delay_s"),
    [
        ("creating", 0.0),
        ("launching", random.Random(1).uniform(0.0, 0.3)),
        ("booting", random.Random(2).uniform(0.0, 1.2)),
        ("ready", 0.0),
    ],
)
def test_sigkill_of_the_owner_leaves_nothing_within_10_s(
    state: Path, point: str, delay_s: float
) -> None:
    trial = kill_trial(state, point, delay_s)
    assert trial.leaked == []
    assert trial.reap_s is not None
    assert all(d.startswith("reaped: owner pid") for d in gone_events(state))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_delete_the_vms_before_exit(state: Path, signum: int) -> None:
    owner = start_owner(state, "--count", "2")
    owner.wait_for("READY")
    owner.proc.send_signal(signum)
    code = owner.finish()
    assert code != 0
    # Checked the moment the process is gone: the reaper had no time to act.
    assert leftovers(state) == []
    details = gone_events(state)
    assert len(details) == 2
    assert all(d.startswith("deleted by session") for d in details), details


def test_a_second_ctrl_c_does_not_abandon_vms_half_deleted(state: Path) -> None:
    owner = start_owner(state, "--count", "3", "--delete-pause", "0.3")
    owner.wait_for("READY")
    owner.proc.send_signal(signal.SIGINT)
    owner.wait_for("DELETING")
    owner.proc.send_signal(signal.SIGINT)  # lands while the first VM is being deleted
    owner.finish()
    assert leftovers(state) == []
    details = gone_events(state)
    assert len(details) == 3
    assert all(d.startswith("deleted by session") for d in details), details


def _foreign(state: Path) -> tuple[QemuBackend, list[str]]:
    """QEMU VMs in our state directory, named like ours, that vmlease never recorded."""
    backend = QemuBackend(state_dir=state)
    names = ["vmlease-foreignvm0-1", "test-db"]
    for name in names:
        backend.create(name, VMSpec())
    for name in names:
        backend.wait_ready(name, 60)
    return backend, names


def test_foreign_vms_survive_every_form_of_cleanup(state: Path) -> None:
    backend, foreign = _foreign(state)
    try:
        # A dead owner's VMs are reaped, the foreign ones stay.
        assert kill_trial(state, "ready", 0.0, ignore=frozenset(foreign)).leaked == []
        # A new session's sweep.
        with vmlease.Session(state_dir=state):
            pass
        # vmlease cleanup, and cleanup --all --yes.
        assert cli(state, "cleanup").returncode == 0
        done = cli(state, "cleanup", "--all", "--yes", "--json")
        assert done.returncode == 0
        assert json.loads(done.stdout) == {"results": []}
        running = {vm.name for vm in backend.list() if vm.state == "running"}
        assert running == set(foreign)
        for name in foreign:
            assert (
                backend.exec(name, ["true"], stdin=None, env=None, cwd=None, timeout_s=10).exit_code
                == 0
            )
    finally:
        for name in foreign:
            backend.delete(name)
        backend.close()
    assert_nothing_left(state)


def test_two_sessions_never_touch_each_others_vms(state: Path) -> None:
    other = start_owner(state, "--count", "1")
    theirs = other.wait_for("READY").split()[1]
    try:
        with vmlease.Session(state_dir=state) as mine:
            vm = mine.create()
            # A third session starting (its sweep) and a default cleanup leave both alone.
            with vmlease.Session(state_dir=state) as third:
                assert third.swept == []
            done = cli(state, "cleanup", "--json")
            assert json.loads(done.stdout) == {"results": []}
            rows = {r["name"]: r for r in json.loads(cli(state, "ls", "--json").stdout)["vms"]}
            assert rows[vm.name]["status"] == "alive"
            assert rows[theirs]["status"] == "alive"
            assert rows[theirs]["actual"] == "running"
            assert vm.run(["true"]).exit_code == 0
        # Our session ended; theirs is untouched.
        rows = {r["name"]: r for r in json.loads(cli(state, "ls", "--json").stdout)["vms"]}
        assert list(rows) == [theirs]
        assert rows[theirs]["actual"] == "running"
    finally:
        other.proc.send_signal(signal.SIGTERM)
        other.finish()
    assert leftovers(state) == []


def test_an_expired_vm_is_deleted_even_though_its_owner_lives(state: Path) -> None:
    owner = start_owner(state, "--count", "1", "--max-age", "1")
    name = owner.wait_for("READY").split()[1]
    try:
        time.sleep(1.2)
        [row] = json.loads(cli(state, "ls", "--json").stdout)["vms"]
        assert (row["name"], row["status"], row["owner"]) == (name, "expired", "alive")
        dry = cli(state, "cleanup", "--dry-run", "--json")
        assert [r["action"] for r in json.loads(dry.stdout)["results"]] == ["would delete"]
        assert QemuBackend(state_dir=state).list()[0].state == "running"
        done = cli(state, "cleanup")
        assert done.returncode == 0
        assert name in done.stdout
        assert "expired" in done.stdout
        assert leftovers(state) == []
    finally:
        owner.proc.send_signal(signal.SIGTERM)
        owner.finish()


def test_max_age_on_the_command_line_expires_older_vms(
    session: vmlease.Session, state: Path
) -> None:
    vm = session.create()
    time.sleep(0.5)
    assert json.loads(cli(state, "cleanup", "--max-age", "60", "--json").stdout)["results"] == []
    done = cli(state, "cleanup", "--max-age", "0.2", "--json")
    [result] = json.loads(done.stdout)["results"]
    assert (result["name"], result["why"], result["action"]) == (vm.name, "expired", "deleted")
    assert vm.state is vmlease.VMState.GONE


def test_cleanup_all_asks_first_and_deletes_live_sessions_vms(
    session: vmlease.Session, state: Path
) -> None:
    vm = session.create()
    refused = cli(state, "cleanup", "--all", stdin="n\n")
    assert refused.returncode == 0
    assert vm.name in refused.stdout
    assert "Delete them?" in refused.stdout
    assert vm.run(["true"]).exit_code == 0
    no_answer = cli(state, "cleanup", "--all", stdin="")
    assert no_answer.returncode == 0
    assert vm.run(["true"]).exit_code == 0
    done = cli(state, "cleanup", "--all", stdin="y\n")
    assert done.returncode == 0
    assert "deleted" in done.stdout
    assert vm.state is vmlease.VMState.GONE
    assert_nothing_left(state)


def test_a_reaper_that_cannot_start_means_no_vm(state: Path) -> None:
    def cannot_start(_state: Path) -> None:
        raise vmlease.ReaperUnavailable("the reaper binary is broken")

    link = ReaperLink(state, spawn=cannot_start, timeout_s=1.0)
    with vmlease.Session(state_dir=state, reaper=link) as session:
        with pytest.raises(vmlease.ReaperUnavailable, match="creates no VM"):
            session.create()
        assert ledger_of(session).records(include_gone=True) == []
    assert_nothing_left(state)


def _register(state: str) -> int:
    link = ReaperLink(Path(state))
    link.register(current_owner("racer"))
    pid = link.reaper_pid or 0
    time.sleep(0.5)  # stay registered while the others arrive
    link.close()
    return pid


def test_many_sessions_starting_at_once_share_one_reaper(state: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pids = pool.map(_register, [str(state)] * 8)
    assert len(set(pids)) == 1
    assert pids[0] > 0


def test_a_killed_reaper_is_replaced_and_a_later_sigkill_still_leaves_nothing(
    state: Path,
) -> None:
    trial = kill_reaper_then_owner(state)
    assert trial.replaced_s is not None, "no new reaper took the session over"
    assert trial.leaked == []
    assert trial.reap_s is not None
    assert trial.reap_s <= 10.0
    assert all(d.startswith("reaped: owner pid") for d in gone_events(state))


def test_a_session_whose_reaper_cannot_be_replaced_refuses_to_create_and_still_cleans_up(
    state: Path,
) -> None:
    spawns: list[Path] = []

    def spawn_once(state_dir: Path) -> None:
        if spawns:
            raise vmlease.ReaperUnavailable("no more reapers")
        spawns.append(state_dir)
        spawn_reaper(state_dir)

    link = ReaperLink(state, spawn=spawn_once, timeout_s=2.0)
    with vmlease.Session(state_dir=state, reaper=link) as session:
        vm = session.create()
        [reaper] = reapers_under(state)
        os.kill(reaper, signal.SIGKILL)
        assert wait_until(lambda: link.lost == 1 and not link.registered, 10.0)
        with pytest.raises(vmlease.ReaperUnavailable, match="creates no VM"):
            session.create()
        assert vm.run(["true"]).ok
    assert vm.state is vmlease.VMState.GONE
    assert_nothing_left(state)


def test_an_owner_killed_while_it_deletes_leaves_nothing(state: Path) -> None:
    owner = start_owner(state, "--count", "1", "--delete-pause", "0.5")
    owner.wait_for("READY")
    owner.proc.send_signal(signal.SIGTERM)  # the session starts deleting its VM ...
    owner.wait_for("DELETING")
    os.kill(owner.proc.pid, signal.SIGKILL)  # ... and dies halfway
    owner.finish()
    assert wait_until(lambda: not leftovers(state), 10.0), leftovers(state)
