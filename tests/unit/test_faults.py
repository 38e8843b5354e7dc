"""The session under failing backends: retries, adoption after a hung create,
and FlakyBackend itself. Against recording fakes; tests/integration/test_faults.py
does the same on real VMs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doubles.fakes import FakeBackend
from tests.support.ledger import ledger_of
from vmlease import (
    BackendError,
    BackendTimeout,
    ChannelError,
    ConfigError,
    RetryPolicy,
    Session,
    VMAlreadyExists,
    VMLeaseError,
    VMState,
)
from vmlease._spec import VMSpec
from vmlease.testing import FlakyBackend, check_faults, parse_faults

NO_WAITS = RetryPolicy(attempts=5).without_waits()


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def session(fake: FakeBackend, tmp_path: Path) -> Iterator[Session]:
    with Session(backend=fake, state_dir=tmp_path, reaper=False, retry=NO_WAITS) as s:
        yield s


def events(session: Session, name: str) -> list[str]:
    record = ledger_of(session).find("fake", name)
    assert record is not None
    return [f"{e.state.value}:{e.detail}" for e in ledger_of(session).events(record.id)]


def fail_before_effect(fake: FakeBackend) -> None:
    """Make the fake's failing creates leave no VM behind."""
    original = fake.create

    def create(name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        try:
            original(name, spec, timeout_s=timeout_s)
        except BackendError as exc:
            if not isinstance(exc, VMAlreadyExists):
                fake.vms.pop(name, None)
            raise

    fake.create = create  # type: ignore[method-assign]


def test_a_create_that_fails_transiently_is_tried_again(
    fake: FakeBackend, session: Session
) -> None:
    fake.fail["create"] = [BackendError("daemon busy", transient=True)]
    fail_before_effect(fake)
    vm = session.create()
    assert vm.state is VMState.READY
    assert fake.ops().count("create") == 2
    assert session.stats().retries == {"create": 1}
    assert session.stats().adopted == 0


def test_a_hung_create_whose_vm_appears_is_adopted(fake: FakeBackend, session: Session) -> None:
    # The first create times out, but the VM was made: the retry meets "already exists".
    fake.fail["create"] = [BackendTimeout("create took too long")]
    vm = session.create()
    assert vm.state is VMState.READY
    assert fake.ops() == ["check_spec", "create", "create", "wait_ready", "wait_ready"]
    assert list(fake.vms) == [vm.name]
    assert session.stats().adopted == 1
    assert any("adopted" in e for e in events(session, vm.name))
    vm.delete()
    assert fake.vms == {}


def test_a_hung_create_whose_vm_does_not_answer_is_replaced(
    fake: FakeBackend, session: Session
) -> None:
    fake.fail["create"] = [BackendTimeout("create took too long")]
    fake.fail["wait_ready"] = [ChannelError("no answer")]  # the adoption check
    vm = session.create()
    assert vm.state is VMState.READY
    assert fake.ops() == [
        "check_spec",
        "create",  # timed out, made the VM
        "create",  # already exists
        "wait_ready",  # the made VM does not answer...
        "delete",  # ...so it goes
        "create",  # and is made again
        "wait_ready",
    ]
    assert session.stats().adopted == 0


def test_already_exists_on_the_first_attempt_is_someone_elses_vm(
    fake: FakeBackend, session: Session
) -> None:
    fake.vms["test-db"] = "running"  # the user's own VM
    with pytest.raises(VMAlreadyExists):
        session.create(name="test-db")
    assert fake.vms == {"test-db": "running"}
    assert "delete" not in fake.ops()


def test_a_create_that_keeps_failing_leaves_nothing(fake: FakeBackend, session: Session) -> None:
    fake.fail["create"] = BackendTimeout("always too slow")
    fail_before_effect(fake)
    with pytest.raises(BackendTimeout) as info:
        session.create()
    assert fake.vms == {}
    assert fake.ops().count("create") == 5
    assert any("gave up on create after 5 attempt(s)" in n for n in info.value.__notes__)
    [record] = ledger_of(session).records(include_gone=True)
    assert record.state is VMState.GONE


def test_hung_creates_of_vms_that_never_answer_leave_nothing(
    fake: FakeBackend, session: Session
) -> None:
    # Every create makes its VM but times out; every made VM fails its check.
    fake.fail["create"] = BackendTimeout("always too slow")
    fake.fail["wait_ready"] = ChannelError("no answer")
    with pytest.raises(VMLeaseError):
        session.create()
    assert fake.vms == {}
    [record] = ledger_of(session).records(include_gone=True)
    assert record.state is VMState.GONE


def test_a_command_is_not_run_again_after_a_failure_mid_command(
    fake: FakeBackend, session: Session
) -> None:
    vm = session.create()
    fake.fail["exec"] = [ChannelError("the channel broke while the command ran")]
    with pytest.raises(ChannelError):
        vm.run(["touch", "/tmp/once"])
    assert fake.ops().count("exec") == 1


def test_a_command_that_never_started_is_run(fake: FakeBackend, session: Session) -> None:
    vm = session.create()
    fake.fail["exec"] = [BackendError("could not reach the guest", transient=True)]
    assert vm.run(["echo", "hi"]).stdout == "echo hi"
    assert fake.ops().count("exec") == 2


def test_every_operation_is_retried(fake: FakeBackend, session: Session) -> None:
    vm = session.create()
    for op in ("stop", "start", "wait_ready", "put", "get", "delete"):
        fake.fail[op] = [BackendError(f"{op} hiccup", transient=True)]
    vm.stop()
    vm.start()
    local = session.state_dir / "f"
    local.write_bytes(b"x")
    vm.put(local, "/f")
    vm.get("/f", local)
    vm.delete()
    assert fake.vms == {}
    retries = session.stats().retries
    for op in ("stop", "start", "boot", "put", "get", "delete"):
        assert retries.get(op) == 1, op


# -- FlakyBackend -------------------------------------------------------------------


def test_flaky_backend_faults_are_repeatable_with_a_seed() -> None:
    def pattern(seed: int) -> list[str]:
        flaky = FlakyBackend(FakeBackend(), failure_rate=0.5, seed=seed)
        out = []
        for _ in range(40):
            try:
                flaky.list()
                out.append("ok")
            except BackendError:
                out.append("fail")
        return out

    assert pattern(3) == pattern(3)
    assert pattern(3) != pattern(4)
    assert 8 < pattern(3).count("fail") < 32


def test_an_injected_failure_happens_before_the_operation() -> None:
    inner = FakeBackend()
    flaky = FlakyBackend(inner, failure_rate=1.0)
    with pytest.raises(BackendError, match="injected failure") as info:
        flaky.create("vmlease-abc-1", VMSpec())
    assert info.value.transient
    assert inner.vms == {}
    assert flaky.injected == {"create": 1}


def test_an_injected_hang_waits_then_times_out() -> None:
    slept: list[float] = []
    inner = FakeBackend()
    flaky = FlakyBackend(inner, failure_rate=0.0, hang_rate=1.0, hang_s=5.0, sleep=slept.append)
    with pytest.raises(BackendTimeout):
        flaky.delete("x", timeout_s=2.0)
    with pytest.raises(BackendTimeout):
        flaky.create("vmlease-abc-1", VMSpec(), timeout_s=30.0)
    assert slept == [2.0, 5.0]  # at most the operation's own limit
    assert "vmlease-abc-1" in inner.vms  # a hung create made its VM


def test_only_the_chosen_operations_fault() -> None:
    flaky = FlakyBackend(FakeBackend(), failure_rate=1.0, operations=["exec"])
    flaky.create("vmlease-abc-1", VMSpec())
    with pytest.raises(BackendError):
        flaky.exec("vmlease-abc-1", ["true"], stdin=None, env=None, cwd=None, timeout_s=None)
    assert flaky.calls == {"create": 1, "exec": 1}


def test_a_session_over_a_flaky_backend_gets_everything_done(tmp_path: Path) -> None:
    inner = FakeBackend()
    flaky = FlakyBackend(inner, failure_rate=0.3, hang_rate=0.05, hang_s=0.0, seed=11)
    policy = RetryPolicy(attempts=12).without_waits()
    with Session(backend=flaky, state_dir=tmp_path, reaper=False, retry=policy) as session:
        for _ in range(20):
            vm = session.create()
            for i in range(5):
                assert vm.run(["echo", str(i)]).stdout == f"echo {i}"
            vm.delete()
        stats = session.stats()
    assert inner.vms == {}
    assert sum(stats.retries.values()) >= sum(flaky.injected.values()) > 20
    assert stats.created == 20


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("failure_rate=1.5", "failure_rate must be a number from 0 to 1"),
        ("failure_rate=0.8,hang_rate=0.5", "failure_rate \\+ hang_rate must be at most 1"),
        ("hang_s=-1", "hang_s must be 0 or more seconds"),
        ("seed=abc", "seed must be a number"),
        ("rate=0.3", "KEY one of failure_rate"),
        ("failure_rate", "write KEY=VALUE pairs"),
        ("operations=create+boot", "cannot fault boot"),
    ],
)
def test_bad_fault_settings_are_refused(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_faults(text)


def test_fault_settings_are_read() -> None:
    assert parse_faults("failure_rate=0.3, hang_rate=0.05,seed=7,operations=create+exec") == {
        "failure_rate": 0.3,
        "hang_rate": 0.05,
        "seed": 7,
        "operations": ["create", "exec"],
    }


def test_flaky_backend_passes_every_backend_operation_on() -> None:
    # An operation it does not override would fall back to the base class and
    # say the backend cannot do it, although the inner one can.
    from vmlease.backends import Backend

    operations = {
        name
        for name, value in vars(Backend).items()
        if callable(value) and not name.startswith("_")
    }
    mro = FlakyBackend.__mro__
    defined = set().union(*(vars(c) for c in mro[: mro.index(Backend)]))
    assert operations - defined == set()
