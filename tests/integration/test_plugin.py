"""The pytest plugin, run as users run it: pytest in a subprocess, real VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.killing import leftovers
from tests.support.ledger import ledger_records
from vmlease._ledger import Ledger, VMState
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def suite(
    pytester: pytest.Pytester, state: Path, monkeypatch: pytest.MonkeyPatch, tiny_image: Image
) -> pytest.Pytester:
    monkeypatch.setenv("VMLEASE_STATE_DIR", str(state))
    # pytester gives the inner run a HOME of its own: point it at the real image cache.
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(tiny_image.path.parent.parent))
    for name in (
        "VMLEASE_KEEP",
        "VMLEASE_IMAGE",
        "VMLEASE_NETWORK",
        "VMLEASE_ARCH",
        "VMLEASE_BACKEND",
        "VMLEASE_MAX",
        "VMLEASE_FAULTS",
        "VMLEASE_RETRY",
    ):
        monkeypatch.delenv(name, raising=False)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=200)


def names_in_ledger(state: Path) -> list[str]:
    return [r.name for r in ledger_records(state)]


@pytest.mark.parametrize(("mode", "by_start", "by_snapshot"), [("mapped", 2, 0), ("stream", 0, 2)])
def test_clean_vms_are_reset_by_a_new_start_or_else_by_a_snapshot(
    suite: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    by_start: int,
    by_snapshot: int,
) -> None:
    """Mapped booted states: a reset is a new start from the state; the fall back
    (states held as streams): a snapshot after the VM is made, restored."""
    monkeypatch.setenv("VMLEASE_QEMU_MEMORY", mode)
    suite.makepyfile(
        """
        def test_write(vm):
            vm.run(["sh", "-c", "echo x > /root/mark"], check=True)

        def test_clean(vm):
            assert vm.run(["ls", "/root/mark"]).exit_code != 0
            vm.run(["sh", "-c", "echo x > /root/mark"], check=True)
        """
    )
    result = run(suite)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            f"*resets: {by_start} by a new start from the mapped booted state, "
            f"{by_snapshot} by restoring a snapshot*",
            "*nothing left behind*",
        ]
    )


def test_vm_is_clean_for_every_test_and_worker_vm_carries_state(
    suite: pytest.Pytester, state: Path
) -> None:
    suite.makepyfile(
        """
        def test_write(vm):
            vm.run(["sh", "-c", "echo x > /root/mark"], check=True)

        def test_clean(vm):
            assert vm.run(["ls", "/root/mark"]).exit_code != 0

        def test_worker_write(worker_vm):
            worker_vm.run(["sh", "-c", "echo x > /root/mark"], check=True)

        def test_worker_sees_it(worker_vm):
            assert worker_vm.run(["cat", "/root/mark"]).stdout == "x\\n"
        """
    )
    result = run(suite)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            # vm: two clean VMs take turns, each reset after its test; worker_vm: one.
            "*VMs: 3 created, 1 reused, 2 restored, 3 deleted, 0 kept*",
            "*nothing left behind*",
        ]
    )
    assert leftovers(state) == []


def test_two_xdist_workers_share_a_session_and_name_vms_by_worker(
    suite: pytest.Pytester, state: Path
) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_clean_each_time(vm, i):
            assert vm.run(["ls", "/root/mark"]).exit_code != 0
            vm.run(["touch", "/root/mark"], check=True)
        """
    )
    result = run(suite, "-n", "2")
    result.assert_outcomes(passed=6)
    names = names_in_ledger(state)
    assert len(names) == 4  # two clean VMs per worker, taking turns
    assert {n.split("-")[1] for n in names} == {names[0].split("-")[1]}  # one session id
    assert sorted(n.split("-")[2] for n in names) == ["gw0", "gw0", "gw1", "gw1"]
    result.stdout.fnmatch_lines(["*VMs: 4 created*6 restored*", "*nothing left behind*"])
    assert leftovers(state) == []


def test_the_vm_marker_asks_for_a_fresh_vm_of_a_spec(suite: pytest.Pytester, state: Path) -> None:
    suite.makepyfile(
        """
        import pytest

        def test_default(vm):
            vm.run(["touch", "/root/mark"], check=True)

        @pytest.mark.vm(fresh=True, memory_mb=192, cpus=2)
        def test_fresh(vm):
            assert vm.run(["nproc"]).stdout == "2\\n"
            total_kb = int(vm.run(["cat", "/proc/meminfo"]).stdout.split()[1])
            assert total_kb <= 192 * 1024

        @pytest.mark.vm(colour="blue")
        def test_bad_marker(vm):
            pass
        """
    )
    result = run(suite)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*does not know colour*"])
    assert len(names_in_ledger(state)) == 3  # two clean VMs taking turns, one fresh
    assert leftovers(state) == []


def test_factory_and_pool_vms_are_deleted_when_the_test_fails(
    suite: pytest.Pytester, state: Path
) -> None:
    suite.makepyfile(
        """
        def test_factory(vm_factory):
            a = vm_factory()
            b = vm_factory(memory_mb=160)
            assert a.name != b.name
            assert False, "fails with two factory VMs"

        def test_pool(vm_pool):
            vms = vm_pool(3)
            assert len({v.name for v in vms}) == 3
            for v in vms:
                assert v.run(["true"]).exit_code == 0
            assert False, "fails with a pool of three"
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*VMs: 5 created*5 deleted, 0 kept*", "*nothing left behind*"])
    assert leftovers(state) == []


def test_a_failure_report_shows_commands_and_console(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        def test_fails(vm):
            vm.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
            assert False
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*vmlease: commands run in vmlease-*",
            "$ sh -c echo to-stdout; echo to-stderr >&2; exit 3   (exit 3, * s)",
            "  stdout: to-stdout",
            "  stderr: to-stderr",
            "*vmlease: console of vmlease-*",
            # Its own boot, or (started from a saved state) the boot of the VM that
            # saved the state, then its own start from it.
            "vmlease: guest * up*",
        ]
    )
    assert "kept running for inspection" not in result.stdout.str()  # --vm-keep is off


def test_keep_failed_keeps_the_failed_tests_vm_and_says_how_to_reach_it(
    suite: pytest.Pytester, state: Path
) -> None:
    suite.makepyfile(
        """
        def test_passes(vm):
            vm.run(["true"], check=True)

        def test_fails(vm):
            vm.run(["sh", "-c", "echo evidence > /root/evidence"], check=True)
            assert False
        """
    )
    result = run(suite, "--vm-keep=failed")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*The VM is kept running for inspection*", "  vmlease exec vmlease-* -- sh -c*"]
    )
    kept = [line for line in result.stdout.lines if line.startswith("kept for inspection: ")]
    [name] = kept[0].removeprefix("kept for inspection: ").split(", ")
    env = {**os.environ, "VMLEASE_STATE_DIR": str(state)}
    cli = [sys.executable, "-m", "vmlease"]
    done = subprocess.run(
        [*cli, "exec", name, "--", "cat", "/root/evidence"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "evidence\n")
    rows = json.loads(
        subprocess.run(
            [*cli, "ls", "--json"], env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )["vms"]
    assert [(r["name"], r["state"], r["actual"]) for r in rows] == [(name, "kept", "running")]
    # The next run's sweep leaves it alone; vmlease cleanup removes it.
    suite.makepyfile(test_other="def test_ok(vm):\n    pass\n")
    run(suite, "test_other.py").assert_outcomes(passed=1)
    assert name in json.dumps(
        json.loads(
            subprocess.run(
                [*cli, "ls", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )
    )
    subprocess.run([*cli, "cleanup"], env=env, timeout=60, check=True, capture_output=True)
    assert leftovers(state) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_run_leaves_nothing(
    suite: pytest.Pytester, state: Path, signum: int
) -> None:
    flag = suite.path / "started"
    suite.makepyfile(
        f"""
        import pathlib, time

        def test_waits(vm, worker_vm):
            pathlib.Path({str(flag)!r}).write_text("up")
            time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite.path)],
        cwd=suite.path,
        env={**os.environ, "VMLEASE_STATE_DIR": str(state)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert leftovers(state) == [], out
    assert len(names_in_ledger(state)) >= 2


def test_a_crashed_worker_is_reaped_and_replaced(suite: pytest.Pytester, state: Path) -> None:
    suite.makepyfile(
        """
        import os

        def test_crash(worker_vm):
            worker_vm.run(["true"], check=True)
            os._exit(3)

        def test_after(worker_vm):
            assert worker_vm.run(["true"]).exit_code == 0
        """
    )
    result = run(suite, "-n", "1", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    deadline = time.monotonic() + 10
    while leftovers(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(state) == []
    ledger = Ledger(state / "ledger.sqlite3")
    rows = ledger.records(include_gone=True)
    details = {r.name: [e.detail for e in ledger.events(r.id)] for r in rows}
    ledger.close()
    assert len(rows) == 2, details  # the replacement worker got a fresh VM
    assert any(any(d and d.startswith("reaped") for d in ds) for ds in details.values())
    assert all(r.state is VMState.GONE for r in rows)


def test_settings_follow_command_line_then_environment_then_ini(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.makeini("[pytest]\nvm_image = from-ini\n")
    suite.makepyfile("def test_one(vm):\n    pass\n")
    run(suite).stdout.fnmatch_lines(["*no image 'from-ini'*"])
    monkeypatch.setenv("VMLEASE_IMAGE", "tiny")
    run(suite).assert_outcomes(passed=1)
    run(suite, "--vm-image=from-cli").stdout.fnmatch_lines(["*no image 'from-cli'*"])


def test_the_run_can_give_every_vm_a_network(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.makepyfile(
        """
        import json, os, pathlib, pytest

        def network(vm):
            qemu = pathlib.Path(os.environ["VMLEASE_STATE_DIR"]) / "qemu"
            return json.loads((qemu / vm.name / "vm.json").read_text())["network"]

        def test_run_default(vm):
            assert network(vm) == "restricted"

        @pytest.mark.vm(network="none")
        def test_marker_wins(vm):
            assert network(vm) == "none"
        """
    )
    run(suite, "--vm-network=restricted").assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--vm-keep=sometimes"], {}, "keep must be one of never, failed, always"),
        ([], {"VMLEASE_KEEP": "maybe"}, "keep must be one of never, failed, always"),
        (["--vm-max=two"], {}, "--vm-max (or VMLEASE_MAX) must be a number"),
        (["--vm-max=0"], {}, "at least 1"),
        (["--vm-max-age=-5"], {}, "more than 0 seconds"),
        (["--vm-faults=rate=0.3"], {}, "KEY one of failure_rate"),
        ([], {"VMLEASE_FAULTS": "failure_rate=2"}, "failure_rate must be a number from 0 to 1"),
        (["--vm-retry=tries=3"], {}, "KEY one of attempts"),
        (["--vm-network=wifi"], {}, "network must be one of user, none, restricted"),
        ([], {"VMLEASE_RETRY": "create_s=soon"}, "create_s must be a number"),
    ],
)
def test_bad_settings_stop_the_run_with_a_clear_message(
    suite: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    says: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    suite.makepyfile("def test_one(vm):\n    pass\n")
    result = run(suite, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{says}*"])


def test_vm_host_is_a_testinfra_host_for_the_tests_vm(
    suite: pytest.Pytester, debian_image: Image
) -> None:
    pytest.importorskip("testinfra", reason="pip install -e '.[tools]'")
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.vm(image="debian-12")
        def test_one(vm, vm_host):
            assert vm_host.run("hostname").stdout.strip() == vm.name
            assert vm_host.package("python3").is_installed
            assert vm_host.service("ssh").is_running
        """
    )
    run(suite).assert_outcomes(passed=1)
