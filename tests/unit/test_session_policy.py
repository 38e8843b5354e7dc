"""The session's promises, checked against a recording fake backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.doubles.fakes import FakeBackend, SharedFake
from tests.support.ledger import ledger_of
from vmlease import (
    BootError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestFileError,
    ImageNotFound,
    InvalidName,
    InvalidSpec,
    NameInUse,
    Session,
    VMState,
    VMStateError,
)
from vmlease._cleanup import mark_prefix
from vmlease._ledger import Ledger
from vmlease.backends import Capabilities


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def session(fake: FakeBackend, tmp_path: Path) -> Iterator[Session]:
    with Session(backend=fake, state_dir=tmp_path, reaper=False) as s:
        yield s


def test_the_ledger_row_exists_before_the_backend_creates(
    fake: FakeBackend, session: Session
) -> None:
    seen: list[VMState] = []

    def look(name: str) -> None:
        record = ledger_of(session).find("fake", name)
        assert record is not None, "create was called before the ledger had the VM"
        assert record.owner == session.owner
        seen.append(record.state)

    fake.on_create = look
    vm = session.create()
    assert seen == [VMState.CREATING]
    assert vm.state is VMState.READY
    assert fake.ops() == ["check_spec", "create", "wait_ready"]


def test_generated_names_are_unique_and_valid(session: Session) -> None:
    names = [session.create().name for _ in range(5)]
    assert len(set(names)) == 5
    assert all(n.startswith(f"vmlease-{session.id}-") for n in names)


def test_sessions_sharing_an_id_get_distinct_names(tmp_path: Path) -> None:
    # pytest-xdist workers share one session id; their counters start alike.
    with (
        Session(backend=FakeBackend(), state_dir=tmp_path, session_id="run1", reaper=False) as a,
        Session(backend=FakeBackend(), state_dir=tmp_path, session_id="run1", reaper=False) as b,
    ):
        names = [a.create().name, b.create().name, a.create().name]
    assert names == ["vmlease-run1-1", "vmlease-run1-2", "vmlease-run1-3"]


def test_leaving_the_session_deletes_every_vm(fake: FakeBackend, tmp_path: Path) -> None:
    with Session(backend=fake, state_dir=tmp_path, reaper=False) as session:
        a, b = session.create(), session.create()
        b.delete()
    assert fake.vms == {}
    assert a.state is VMState.GONE
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert ledger.records() == []
    ledger.close()


def test_leaving_by_exception_deletes_too(fake: FakeBackend, tmp_path: Path) -> None:
    def failing_test() -> None:
        with Session(backend=fake, state_dir=tmp_path, reaper=False) as session:
            session.create()
            raise RuntimeError("test failed")

    with pytest.raises(RuntimeError, match="test failed"):
        failing_test()
    assert fake.vms == {}


def test_a_failed_boot_is_recorded_and_the_vm_removed(fake: FakeBackend, session: Session) -> None:
    fake.fail["wait_ready"] = BootError("no answer")
    with pytest.raises(BootError):
        session.create(name="broken")
    assert fake.vms == {}
    [row] = ledger_of(session).records(include_gone=True)
    assert row.state is VMState.GONE
    assert row.error is not None
    assert "BootError: no answer" in row.error
    states = [e.state for e in ledger_of(session).events(row.id)]
    assert states == [
        VMState.INTENDED,
        VMState.CREATING,
        VMState.FAILED,
        VMState.GONE,
    ]
    assert session.vms() == []
    assert session.stats().failed == 1
    # The name is free again.
    fake.fail.clear()
    assert session.create(name="broken").name == "broken"


def test_a_failed_create_whose_cleanup_fails_stays_failed(
    fake: FakeBackend, session: Session
) -> None:
    fake.fail["wait_ready"] = BootError("no answer")
    fake.fail["delete"] = vmlease.BackendError("backend down")
    with pytest.raises(BootError):
        session.create(name="stuck")
    [row] = ledger_of(session).records()
    assert row.state is VMState.FAILED
    with pytest.raises(NameInUse):
        session.create(name="stuck")
    # Closing the session tries the delete again.
    fake.fail.clear()
    session.close()
    assert "stuck" not in fake.vms
    assert ledger_of(session).records() == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"cpus": 0}, InvalidSpec),
        ({"cpus": 1.5}, InvalidSpec),
        ({"memory_mb": -1}, InvalidSpec),
        ({"memory_mb": "256"}, InvalidSpec),
        ({"image": "nope"}, ImageNotFound),
        ({"name": "1-starts-with-digit"}, InvalidName),
        ({"name": "under_score"}, InvalidName),
        ({"name": "x" * 64}, InvalidName),
        ({"boot_timeout_s": 0}, ConfigError),
    ],
)
def test_bad_input_creates_nothing(
    fake: FakeBackend, session: Session, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        session.create(**kwargs)  # type: ignore[arg-type]
    assert "create" not in fake.ops()
    assert ledger_of(session).records(include_gone=True) == []


def test_a_taken_name_creates_nothing(fake: FakeBackend, session: Session) -> None:
    session.create(name="db")
    with pytest.raises(NameInUse, match="db"):
        session.create(name="db")
    assert fake.ops().count("create") == 1


def test_run_returns_a_result_and_check_raises(session: Session) -> None:
    vm = session.create()
    result = vm.run(["echo", "hi"], input="in:")
    assert result.stdout == "in:echo hi"
    assert result.exit_code == 0
    assert result.ok
    assert result.duration_s >= 0
    assert not vm.run(["false"]).ok
    with pytest.raises(CommandFailed) as info:
        vm.run(["false"], check=True)
    assert info.value.exit_code == 1
    assert info.value.stderr == "failed\n"
    assert [e.argv[0] for e in vm.transcript] == ["echo", "false", "false"]


def test_a_timed_out_command_raises(session: Session) -> None:
    vm = session.create()
    with pytest.raises(CommandTimeout) as info:
        vm.run(["sleep", "100"], timeout_s=0.5)
    assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize("argv", ["uname -r", b"uname", [], ["ok", 3], None, [b"bytes"]])
def test_bad_argv_is_rejected_before_running(
    fake: FakeBackend, session: Session, argv: object
) -> None:
    vm = session.create()
    with pytest.raises(ConfigError):
        vm.run(argv)  # type: ignore[arg-type]
    assert "exec" not in fake.ops()


def test_a_string_argv_error_suggests_the_list_form(session: Session) -> None:
    vm = session.create()
    with pytest.raises(ConfigError, match=r"\['sh', '-c', 'uname -r'\]"):
        vm.run("uname -r")


def test_bad_timeout_is_rejected(session: Session) -> None:
    vm = session.create()
    with pytest.raises(ConfigError):
        vm.run(["true"], timeout_s=0)


def test_put_of_a_missing_local_file_is_refused(session: Session, tmp_path: Path) -> None:
    vm = session.create()
    with pytest.raises(GuestFileError, match="no such local file"):
        vm.put(tmp_path / "missing", "/tmp/x")


def test_get_into_a_missing_directory_is_refused(session: Session, tmp_path: Path) -> None:
    vm = session.create()
    with pytest.raises(GuestFileError, match="not a directory"):
        vm.get("/etc/hostname", tmp_path / "no" / "such" / "file")


def test_operations_on_a_deleted_vm_say_so(session: Session) -> None:
    vm = session.create()
    vm.delete()
    vm.delete()  # twice is fine
    with pytest.raises(VMStateError, match="deleted"):
        vm.run(["true"])


def test_stop_then_run_says_start_first(fake: FakeBackend, session: Session) -> None:
    vm = session.create()
    vm.stop()
    assert vm.state is VMState.STOPPED
    with pytest.raises(VMStateError, match="start"):
        vm.run(["true"])
    vm.start()
    assert vm.state is VMState.READY
    assert fake.ops()[-3:] == ["stop", "start", "wait_ready"]


def test_stats_count_and_time_operations(session: Session) -> None:
    vm = session.create()
    vm.run(["true"])
    vm.delete()
    stats = session.stats()
    assert (stats.created, stats.deleted) == (1, 1)
    assert stats.ops["exec"].count == 1
    assert set(stats.ops) >= {"check", "create", "boot", "exec", "delete"}


def test_a_closed_session_creates_nothing(session: Session) -> None:
    session.close()
    with pytest.raises(VMStateError, match="closed"):
        session.create()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name_prefix": ""},
        {"name_prefix": "bad_prefix"},
        {"boot_timeout_s": -1},
        {"max_age_s": 0},
        {"session_id": "Bad Id"},
    ],
)
def test_bad_session_options_are_rejected(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Session(backend=FakeBackend(), state_dir=tmp_path, reaper=False, **kwargs)  # type: ignore[arg-type]


def test_unknown_backend_name_lists_the_installed_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="qemu"):
        Session(backend="nosuch", state_dir=tmp_path)


def test_a_backend_without_snapshots_says_what_to_do_instead(session: Session) -> None:
    vm = session.create()
    with pytest.raises(vmlease.UnsupportedOperation, match="fresh VM per test"):
        vm.snapshot("clean")
    with pytest.raises(vmlease.UnsupportedOperation):
        vm.restore("clean")


def test_a_backend_that_cannot_stop_and_start_says_so_and_is_not_asked(tmp_path: Path) -> None:
    fake = FakeBackend()
    fake.capabilities = Capabilities(stop_start=False)
    with Session(backend=fake, state_dir=tmp_path, reaper=False) as session:
        vm = session.create()
        with pytest.raises(vmlease.UnsupportedOperation, match="cannot stop and start"):
            vm.stop()
        with pytest.raises(vmlease.UnsupportedOperation, match="cannot stop and start"):
            vm.start()
        assert "stop" not in fake.ops()
        assert "start" not in fake.ops()
        assert vm.state is VMState.READY


def test_a_kept_vm_outlives_its_session_and_cleanup_removes_it(
    fake: FakeBackend, tmp_path: Path
) -> None:
    with Session(backend=fake, state_dir=tmp_path, reaper=False) as session:
        kept = session.create(name="keep-me")
        session.create(name="drop-me")
        kept.keep("test failed")
    assert sorted(fake.vms) == ["keep-me"]
    assert kept.state is VMState.KEPT
    # A later session's sweep leaves it alone; vmlease cleanup does not.
    with Session(backend=fake, state_dir=tmp_path, reaper=False) as later:
        assert later.swept == []
    from vmlease._cleanup import cleanup

    [outcome] = cleanup(tmp_path, known={"fake": fake})
    assert (outcome.name, outcome.why, outcome.action) == ("keep-me", "kept", "deleted")
    assert fake.vms == {}


def test_max_vms_bounds_a_sessions_vms_and_frees_places(fake: FakeBackend, tmp_path: Path) -> None:
    with Session(
        backend=fake, state_dir=tmp_path, reaper=False, max_vms=2, place_timeout_s=0.2
    ) as session:
        a = session.create()
        session.create()
        with pytest.raises(vmlease.LockTimeout):
            session.create()
        assert len(ledger_of(session).records()) == 2  # the refused create wrote nothing
        a.delete()
        session.create()
        assert session.stats().ops["wait"].count == 4


def test_on_a_shared_namespace_a_new_vm_is_marked_and_the_mark_recorded(tmp_path: Path) -> None:
    shared = SharedFake()
    with Session(backend=shared, state_dir=tmp_path, reaper=False) as s:
        vm = s.create(name="db")
        assert shared.ops()[-1] == "mark"
        record = ledger_of(s).find("shared", "db")
        assert record is not None
        assert record.instance_id == shared.marks["db"]
        assert record.instance_id.startswith(mark_prefix(record))
        assert vm.state is VMState.READY
    # Where the namespace is vmlease's own, nothing is marked.
    plain = FakeBackend()
    with Session(backend=plain, state_dir=tmp_path / "plain", reaper=False) as s:
        s.create()
        assert "mark" not in plain.ops()


def test_a_vm_that_cannot_be_marked_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = SharedFake(fail={"mark": vmlease.GuestFileError("read-only file system")})
    with Session(backend=shared, state_dir=tmp_path, reaper=False) as s:
        vm = s.create()
        assert vm.run(["true"]).exit_code == 0
        record = ledger_of(s).find("shared", vm.name)
        assert record is not None
        assert record.instance_id is None
    assert "could not mark" in caplog.text
    assert "read-only file system" in caplog.text


def test_a_vm_made_outside_create_is_recorded_first_and_deleted_on_leaving(
    fake: FakeBackend, session: Session
) -> None:
    """An image import's first boot: the session owns it while the import runs."""
    ledger = ledger_of(session)
    with session.vm_for("import cloudy") as name:
        [row] = ledger.records()
        assert (row.name, row.state) == (name, VMState.CREATING)
        fake.vms[name] = "running"  # what the import's first boot is
    assert name not in fake.vms
    assert fake.ops()[-1] == "delete"
    assert ledger.records() == []
    [gone] = ledger.records(include_gone=True)
    assert gone.state is VMState.GONE


def test_a_vm_made_outside_create_is_deleted_when_its_work_fails(
    fake: FakeBackend, session: Session
) -> None:
    ledger = ledger_of(session)

    def failing_import() -> None:
        with session.vm_for("import cloudy") as name:
            fake.vms[name] = "running"
            raise RuntimeError("the import failed")

    with pytest.raises(RuntimeError):
        failing_import()
    assert fake.vms == {}
    assert ledger.records() == []
    # Nothing was made (the import failed before its boot): nothing to delete, no error.
    with session.vm_for("import other"):
        pass
    assert ledger.records() == []
