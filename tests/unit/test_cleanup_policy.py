"""Ownership-only deletion, checked with a recording fake backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.doubles.fakes import FakeBackend, SharedFake
from tests.support.ledger import dead_owner
from vmlease import LedgerError
from vmlease._cleanup import Standing, cleanup, mark_prefix, status
from vmlease._identity import current_owner
from vmlease._ledger import Ledger, Record, VMState


@pytest.fixture
def open_ledger(tmp_path: Path) -> Iterator[Callable[[str], Ledger]]:
    """Opens ledgers in ``tmp_path`` by file name; closes them after the test."""
    opened: list[Ledger] = []

    def open_(name: str) -> Ledger:
        opened.append(Ledger(tmp_path / name))
        return opened[-1]

    yield open_
    for ledger in opened:
        ledger.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Ledger, FakeBackend]]:
    """A ledger with a dead owner's VM and a live owner's VM, and a backend that
    also has instances vmlease never recorded, named like ours."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    fake = FakeBackend()
    dead = ledger.claim(name="vmlease-dead-1", backend="fake", owner=dead_owner(), spec="{}")
    ledger.transition(dead.id, VMState.READY)
    live = ledger.claim(
        name="vmlease-live-1", backend="fake", owner=current_owner("live"), spec="{}"
    )
    ledger.transition(live.id, VMState.READY)
    for name in ("vmlease-dead-1", "vmlease-live-1", "vmlease-foreign-1", "test-db", "test-x"):
        fake.vms[name] = "running"
    yield ledger, fake
    ledger.close()


def test_default_cleanup_deletes_only_the_dead_owners_vm(
    world: tuple[Ledger, FakeBackend], tmp_path: Path
) -> None:
    _, fake = world
    outcomes = cleanup(tmp_path, known={"fake": fake})
    assert [(o.name, o.why, o.action) for o in outcomes] == [
        ("vmlease-dead-1", "orphaned", "deleted")
    ]
    assert sorted(fake.vms) == ["test-db", "test-x", "vmlease-foreign-1", "vmlease-live-1"]


def test_dry_run_deletes_nothing(world: tuple[Ledger, FakeBackend], tmp_path: Path) -> None:
    ledger, fake = world
    outcomes = cleanup(tmp_path, dry_run=True, known={"fake": fake})
    assert [o.action for o in outcomes] == ["would delete"]
    assert "delete" not in fake.ops()
    assert len(ledger.records()) == 2


def test_all_asks_and_then_deletes_only_ledger_vms(
    world: tuple[Ledger, FakeBackend], tmp_path: Path
) -> None:
    ledger, fake = world
    asked: list[list[str]] = []

    def no(records: list[Record]) -> bool:
        asked.append([r.name for r in records])
        return False

    assert cleanup(tmp_path, everything=True, confirm=no, known={"fake": fake}) == []
    assert asked == [["vmlease-dead-1", "vmlease-live-1"]]
    assert "delete" not in fake.ops()
    outcomes = cleanup(tmp_path, everything=True, confirm=lambda _r: True, known={"fake": fake})
    assert sorted(o.name for o in outcomes) == ["vmlease-dead-1", "vmlease-live-1"]
    assert sorted(fake.vms) == ["test-db", "test-x", "vmlease-foreign-1"]
    assert ledger.records() == []


def test_a_failed_delete_is_reported_and_kept_for_later(
    world: tuple[Ledger, FakeBackend], tmp_path: Path
) -> None:
    ledger, fake = world
    from vmlease import BackendError

    fake.fail["delete"] = BackendError("backend down")
    [outcome] = cleanup(tmp_path, known={"fake": fake})
    assert (outcome.action, outcome.error) == ("failed", "backend down")
    [row] = [r for r in ledger.records() if r.name == "vmlease-dead-1"]
    assert row.state is VMState.FAILED
    fake.fail.clear()
    [again] = cleanup(tmp_path, known={"fake": fake})
    assert again.action == "deleted"


def test_a_vm_already_gone_from_the_backend_is_recorded_gone(
    world: tuple[Ledger, FakeBackend], tmp_path: Path
) -> None:
    ledger, fake = world
    del fake.vms["vmlease-dead-1"]
    [outcome] = cleanup(tmp_path, known={"fake": fake})
    assert outcome.action == "already gone"
    assert [r.name for r in ledger.records()] == ["vmlease-live-1"]


def test_status_classification(open_ledger: Callable[[str], Ledger], tmp_path: Path) -> None:
    ledger = open_ledger("l.db")
    live = ledger.claim(
        name="a", backend="fake", owner=current_owner("s"), spec="{}", expires_at=2000.0
    )
    dead = ledger.claim(name="b", backend="fake", owner=dead_owner(), spec="{}")
    elsewhere = ledger.claim(
        name="c",
        backend="fake",
        owner=dataclasses.replace(current_owner("s"), host="elsewhere.invalid"),
        spec="{}",
    )
    rows = {r.name: r for r in ledger.records()}
    assert status(rows["a"], now=1000.0) is Standing.ALIVE
    assert status(rows["a"], now=2000.0) is Standing.EXPIRED
    assert status(rows["a"], now=rows["a"].created_at + 11, max_age_s=10) is Standing.EXPIRED
    assert status(rows["b"], now=1000.0) is Standing.ORPHANED
    assert status(rows["c"], now=1000.0) is Standing.UNKNOWN
    del live, dead, elsewhere


def test_cleanup_without_a_ledger_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger"):
        cleanup(tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_cleanup_of_a_corrupt_ledger_is_an_error_and_deletes_nothing(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").write_bytes(b"x" * 4096)
    fake = FakeBackend(vms={"vmlease-a-1": "running"})
    with pytest.raises(LedgerError, match="corrupt"):
        cleanup(tmp_path, everything=True, confirm=lambda _r: True, known={"fake": fake})
    assert fake.vms == {"vmlease-a-1": "running"}


# -- backends that share a namespace with the user: the second check -----------


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Ledger, SharedFake]]:
    """A ledger whose dead owner made four VMs on a shared-namespace backend:
    two with generated names, two with chosen ones; each marked when made."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    fake = SharedFake()
    owner = dead_owner()
    for name in (f"vmlease-{owner.session_id}-1", f"vmlease-{owner.session_id}-2", "db", "web"):
        row = ledger.claim(name=name, backend="shared", owner=owner, spec="{}")
        fake.vms[name] = "running"
        ledger.set_instance_id(row.id, fake.mark(name, f"vmlease:{name}") or "")
        ledger.transition(row.id, VMState.READY)
    yield ledger, fake
    ledger.close()


def _run(tmp_path: Path, fake: SharedFake, **options: object) -> dict[str, tuple[str, str]]:
    outcomes = cleanup(tmp_path, known={"shared": fake}, **options)  # type: ignore[arg-type]
    return {o.name: (o.action, o.error or "") for o in outcomes}


def test_vms_whose_marks_match_are_deleted(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    ledger, fake = shared
    names = ("vmlease-deadsess-1", "vmlease-deadsess-2", "db", "web")
    actions = {name: action for name, (action, _) in _run(tmp_path, fake).items()}
    assert actions == dict.fromkeys(names, "deleted")
    assert fake.vms == {}
    assert ledger.records() == []


def test_a_vm_the_user_replaced_is_left_alone_and_forgotten(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    ledger, fake = shared
    fake.replace("db")
    fake.replace("vmlease-deadsess-2")  # a generated name does not outrank the mark
    result = _run(tmp_path, fake)
    assert result["db"][0] == "not ours"
    assert "carries no vmlease mark" in result["db"][1]
    assert result["vmlease-deadsess-2"][0] == "not ours"
    assert sorted(fake.vms) == ["db", "vmlease-deadsess-2"]
    assert [c.name for c in fake.calls if c.op == "delete"] == ["vmlease-deadsess-1", "web"]
    assert ledger.records() == []  # closed: the VM of that name is the user's
    [db] = [r for r in ledger.records(include_gone=True) if r.name == "db"]
    assert "is not the VM vmlease made" in (ledger.events(db.id)[-1].detail or "")


def test_another_machines_mark_is_not_ours_either(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    _, fake = shared
    fake.marks["web"] = "some-other-id"
    assert _run(tmp_path, fake)["web"][0] == "not ours"
    assert "web" in fake.vms


def test_an_unreadable_mark_falls_back_to_the_generated_name(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    ledger, fake = shared
    fake.unreadable = {"vmlease-deadsess-1", "db"}
    result = _run(tmp_path, fake)
    assert result["vmlease-deadsess-1"][0] == "deleted"
    assert result["db"][0] == "unconfirmed"
    assert "start it and run `vmlease cleanup` again" in result["db"][1]
    assert sorted(fake.vms) == ["db"]
    [row] = ledger.records()
    assert (row.name, row.state) == ("db", VMState.FAILED)
    # Once the user starts it, the mark is read and the VM goes.
    fake.unreadable.clear()
    assert _run(tmp_path, fake) == {"db": ("deleted", "")}


def test_a_chosen_name_without_a_recorded_mark_is_never_deleted(
    open_ledger: Callable[[str], Ledger], tmp_path: Path
) -> None:
    # The owner died between asking for the VM and marking it: the machine of
    # that name may be the user's, which made the create fail.
    ledger = open_ledger("ledger.sqlite3")
    fake = SharedFake(vms={"db": "running", "vmlease-deadsess-1": "running"})
    owner = dead_owner()
    for name in ("db", "vmlease-deadsess-1"):
        ledger.transition(
            ledger.claim(name=name, backend="shared", owner=owner, spec="{}").id,
            VMState.CREATING,
        )
    result = _run(tmp_path, fake)
    assert result["db"][0] == "unconfirmed"
    assert "no mark was recorded" in result["db"][1]
    assert result["vmlease-deadsess-1"][0] == "deleted"
    assert sorted(fake.vms) == ["db"]
    # The user deletes it (or it never existed): the next cleanup forgets the row.
    del fake.vms["db"]
    assert _run(tmp_path, fake) == {"db": ("already gone", "")}
    assert ledger.records() == []


def test_a_dry_run_says_what_the_check_would_decide(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    ledger, fake = shared
    fake.replace("db")
    del fake.vms["web"]
    result = _run(tmp_path, fake, dry_run=True)
    assert {n: a for n, (a, _) in result.items()} == {
        "vmlease-deadsess-1": "would delete",
        "vmlease-deadsess-2": "would delete",
        "db": "not ours",
        "web": "already gone",
    }
    assert "delete" not in fake.ops()
    assert len(ledger.records()) == 4


def test_cleanup_all_keeps_the_second_check(
    shared: tuple[Ledger, SharedFake], tmp_path: Path
) -> None:
    _, fake = shared
    fake.replace("web")
    result = _run(tmp_path, fake, everything=True, confirm=lambda _r: True)
    assert result["web"][0] == "not ours"
    assert list(fake.vms) == ["web"]


def test_a_vm_marked_just_before_its_owner_died_is_known_by_its_mark(
    open_ledger: Callable[[str], Ledger], tmp_path: Path
) -> None:
    ledger = open_ledger("ledger.sqlite3")
    row = ledger.claim(name="db", backend="shared", owner=dead_owner(), spec="{}")
    fake = SharedFake(vms={"db": "running"}, marks={"db": mark_prefix(row) + "f00d"})
    assert _run(tmp_path, fake) == {"db": ("deleted", "")}
    # The mark of another row (another session's VM of the same name) is not enough.
    other = ledger.claim(name="db", backend="shared", owner=dead_owner(), spec="{}")
    fake = SharedFake(vms={"db": "running"}, marks={"db": f"vmlease:deadsess:{other.id + 1}:ab"})
    assert _run(tmp_path, fake)["db"][0] == "unconfirmed"


def test_cleanup_settles_rows_whose_vm_is_gone_but_never_one_being_made(
    world: tuple[Ledger, FakeBackend], tmp_path: Path
) -> None:
    ledger, fake = world
    # The live owner's VM went while the ledger could not record it (a full disk).
    del fake.vms["vmlease-live-1"]
    making = ledger.claim(
        name="vmlease-live-2", backend="fake", owner=current_owner("live"), spec="{}"
    )
    ledger.transition(making.id, VMState.CREATING)  # not made yet: must stay
    outcomes = cleanup(tmp_path, known={"fake": fake})
    assert sorted((o.name, o.why, o.action) for o in outcomes) == [
        ("vmlease-dead-1", "orphaned", "deleted"),
        ("vmlease-live-1", "missing", "already gone"),
    ]
    assert [(r.name, r.state) for r in ledger.records()] == [("vmlease-live-2", VMState.CREATING)]
