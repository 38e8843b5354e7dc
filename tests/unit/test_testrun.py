"""Which VM each test gets, and what happens to it after: TestRun against fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doubles.fakes import FakeBackend, ResettingFake, SnapshottingFake
from vmlease import BackendError, ConfigError, Session, VMState
from vmlease._testrun import CLEAN_TAG, RunOptions, TestRun


def make_run(tmp_path: Path, backend: FakeBackend, **options: object) -> Iterator[TestRun]:
    run = TestRun(
        RunOptions(**options),  # type: ignore[arg-type]
        make_session=lambda o: Session(
            backend=backend, state_dir=tmp_path, reaper=False, max_vms=o.max_vms
        ),
    )
    try:
        yield run
    finally:
        run.close()


@pytest.fixture
def fake() -> SnapshottingFake:
    return SnapshottingFake()


@pytest.fixture
def run(tmp_path: Path, fake: SnapshottingFake) -> Iterator[TestRun]:
    yield from make_run(tmp_path, fake)


def test_clean_vms_take_turns_and_are_reset_after_each_test(
    run: TestRun, fake: SnapshottingFake
) -> None:
    spec = run.spec()
    names = []
    for _ in range(4):
        use = run.clean_vm(spec)
        names.append(use.vm.name)
        run.finish([use], failed=False)
    assert len(set(names)) == 2  # a pair
    assert names[0] != names[1]
    assert names[2] in names[:2]
    run.close()
    assert fake.ops().count("restore") == 4  # every used VM was reset
    assert run.counts.created == 2
    assert run.counts.restored == 4
    assert run.counts.reused == 2
    assert fake.vms == {}


def test_under_a_vm_limit_one_clean_vm_is_restored_between_tests(
    tmp_path: Path, fake: SnapshottingFake
) -> None:
    for run in make_run(tmp_path, fake, max_vms=1):
        names = []
        for _ in range(3):
            use = run.clean_vm(run.spec())
            names.append(use.vm.name)
            run.finish([use], failed=False)
        assert len(set(names)) == 1
        assert run.counts.created == 1


def test_a_failed_reset_is_replaced_by_a_new_vm(run: TestRun, fake: SnapshottingFake) -> None:
    spec = run.spec()
    a = run.clean_vm(spec)
    run.finish([a], failed=False)
    run.settle()
    b = run.clean_vm(spec)  # the spare booted in the background
    assert b.vm.name != a.vm.name
    fake.fail["restore"] = BackendError("the VM died")
    run.finish([b], failed=False)
    run.settle()
    fake.fail.clear()
    assert b.vm.name not in fake.vms  # its reset failed, so it was deleted
    c = run.clean_vm(spec)
    assert c.vm.name == a.vm.name  # reset fine earlier
    run.finish([c], failed=False)
    d = run.clean_vm(spec)  # in place of the broken one: a new VM
    assert d.vm.name not in (a.vm.name, b.vm.name)
    assert run.counts.created == 3


def test_without_snapshots_each_test_gets_a_fresh_vm(tmp_path: Path) -> None:
    fake = FakeBackend()
    for run in make_run(tmp_path, fake):
        a = run.clean_vm(run.spec())
        run.finish([a], failed=False)
        b = run.clean_vm(run.spec())
        run.finish([b], failed=False)
        assert a.vm.name != b.vm.name
        assert fake.vms == {}


def test_keep_failed_keeps_the_failed_tests_vms_only(
    tmp_path: Path, fake: SnapshottingFake
) -> None:
    for run in make_run(tmp_path, fake, keep="failed"):
        ok = run.clean_vm(run.spec())
        run.finish([ok], failed=False)
        bad = run.clean_vm(run.spec())
        run.finish([bad], failed=True)
        fresh = run.fresh_vm(run.spec())
        run.finish([fresh], failed=True)
        assert bad.kept
        assert fresh.kept
        assert not ok.kept
        assert bad.vm.state is VMState.KEPT
        assert run.counts.kept == [bad.vm.name, fresh.vm.name]
    assert sorted(fake.vms) == sorted([bad.vm.name, fresh.vm.name])


def test_worker_vm_carries_over_and_is_kept_at_the_end_if_a_test_failed(
    tmp_path: Path, fake: SnapshottingFake
) -> None:
    for run in make_run(tmp_path, fake, keep="failed"):
        a = run.worker_vm(run.spec())
        run.finish([a], failed=True)
        b = run.worker_vm(run.spec())
        run.finish([b], failed=False)
        assert a.vm is b.vm
        assert fake.vms[a.vm.name] == "running"
    assert list(fake.vms) == [a.vm.name]


def test_a_failure_report_lists_the_tests_commands_only(run: TestRun) -> None:
    use = run.clean_vm(run.spec())
    use.vm.run(["echo", "hi"])
    sections = dict(run.report([use]))
    commands = sections[f"vmlease: commands run in {use.vm.name}"]
    assert "$ echo hi   (exit 0" in commands
    run.finish([use], failed=False)
    later = run.clean_vm(run.spec())
    assert "echo hi" not in dict(run.report([later])).get(
        f"vmlease: commands run in {later.vm.name}", ""
    )


def test_a_pool_that_fails_partly_deletes_what_it_made(tmp_path: Path) -> None:
    fake = FakeBackend()
    calls = {"n": 0}

    def sometimes(name: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise BackendError("no room")

    fake.on_create = sometimes
    for run in make_run(tmp_path, fake):
        with pytest.raises(BackendError, match="no room"):
            run.pool(3, run.spec())
        assert fake.vms == {}


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_a_pool_needs_a_positive_count(run: TestRun, count: object) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        run.pool(count, run.spec())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"keep": "sometimes"}, "keep must be one of"),
        ({"max_vms": 0}, "at least 1"),
        ({"max_age_s": -1.0}, "more than 0 seconds"),
    ],
)
def test_bad_run_options_are_refused(options: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        RunOptions(**options)  # type: ignore[arg-type]


def test_the_clean_snapshot_is_taken_once_per_vm(run: TestRun, fake: SnapshottingFake) -> None:
    use = run.clean_vm(run.spec())
    run.finish([use], failed=False)
    run.close()
    assert all(tags == {CLEAN_TAG} for tags in fake.snapshots.values())
    assert fake.ops().count("snapshot") == 2


def test_clean_vms_that_can_reset_are_reset_without_a_snapshot(tmp_path: Path) -> None:
    fake = ResettingFake()
    for run in make_run(tmp_path, fake):
        spec = run.spec()
        for _ in range(4):
            use = run.clean_vm(spec)
            run.finish([use], failed=False)
        run.settle()
        assert fake.ops().count("reset") == 4
        assert "snapshot" not in fake.ops()
        assert "restore" not in fake.ops()
        assert run.counts.reset_by_start == 4
        assert run.counts.restored == 4


def test_clean_vms_that_cannot_reset_are_snapshotted_and_restored(tmp_path: Path) -> None:
    fake = ResettingFake(resettable=False)  # VMs that booted, say
    for run in make_run(tmp_path, fake):
        spec = run.spec()
        for _ in range(3):
            use = run.clean_vm(spec)
            run.finish([use], failed=False)
        run.settle()
        assert "reset" not in fake.ops()
        assert fake.ops().count("snapshot") == 2
        assert fake.ops().count("restore") == 3
        assert run.counts.reset_by_start == 0
