"""The vmlease command against real VMs, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import vmlease
from tests.support.visitors import check_side_by_side


def vmlease_cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMLEASE_STATE_DIR": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ls_shows_a_running_vm_with_its_live_owner(session: vmlease.Session, state: Path) -> None:
    vm = session.create()
    done = vmlease_cli("ls", "--json", state=state)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["vms"]
    assert row["name"] == vm.name
    assert row["backend"] == "qemu"
    assert row["state"] == "ready"
    assert row["actual"] == "running"
    assert row["owner"] == "alive"
    assert row["pid"] == os.getpid()
    assert row["session_id"] == session.id
    # What the guest costs the host: QEMU's memory (a 256 MB tiny guest's is far
    # below a GiB) and the blocks its disk overlay took.
    assert 10 * 2**20 < row["memory_bytes"] < 2**30
    assert 0 < row["disk_bytes"] < 2**30
    table = vmlease_cli("ls", state=state).stdout
    assert vm.name in table
    assert "alive" in table
    assert "MEM" in table
    assert "MiB" in table
    vm.stop()
    [row] = json.loads(vmlease_cli("ls", "--json", state=state).stdout)["vms"]
    assert (row["state"], row["actual"]) == ("stopped", "stopped")
    assert row["memory_bytes"] is None  # nothing runs
    vm.delete()
    assert json.loads(vmlease_cli("ls", "--json", state=state).stdout) == {"vms": []}
    [gone] = json.loads(vmlease_cli("ls", "--json", "--all", state=state).stdout)["vms"]
    assert (gone["state"], gone["actual"]) == ("gone", "missing")


def test_image_ls_lists_the_tiny_image(state: Path) -> None:
    done = vmlease_cli("image", "ls", "--json", state=state)
    assert done.returncode == 0
    [image] = [i for i in json.loads(done.stdout)["images"] if i["name"] == "tiny"]
    assert image["name"] == "tiny"
    assert image["kernel_release"].endswith("-cloud-amd64")
    assert "tiny" in vmlease_cli("image", "ls", state=state).stdout


def test_image_build_is_idempotent(state: Path) -> None:
    done = vmlease_cli("image", "build", "tiny", state=state)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stderr
    assert Path(done.stdout.strip(), "manifest.json").is_file()


def test_exec_reaches_a_vm_its_live_session_is_using(session: vmlease.Session, state: Path) -> None:
    vm = session.create()
    vm.run(["sh", "-c", "echo before > /tmp/mark"])  # the session holds the channel now
    done = vmlease_cli("exec", vm.name, "--", "cat", "/tmp/mark", state=state)
    assert (done.returncode, done.stdout) == (0, "before\n"), done.stderr
    assert vm.run(["echo", "after"]).stdout == "after\n"  # and the session gets it back


def test_a_long_exec_and_the_owners_commands_run_side_by_side(
    session: vmlease.Session, state: Path
) -> None:
    check_side_by_side(session.create(), state)


def test_cleanup_where_no_vm_was_ever_made_does_nothing_and_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "state"
    done = vmlease_cli("cleanup", state=empty)
    assert (done.returncode, done.stderr) == (0, "")
    assert "nothing to clean up" in done.stdout
    assert json.loads(vmlease_cli("cleanup", "--json", state=empty).stdout) == {"results": []}
    assert not empty.exists()
