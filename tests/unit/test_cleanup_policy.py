"""Ownership-only deletion, checked with a recording fake backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fakes import FakeBackend
from tests.support.ledger import dead_owner
from vmlease import LedgerError
from vmlease._cleanup import Status, cleanup, status
from vmlease._identity import current_owner
from vmlease._ledger import Ledger, Record, VMState


@pytest.fixture
def world(tmp_path: Path) -> tuple[Ledger, FakeBackend]:
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
    return ledger, fake


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


def test_status_classification(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
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
    assert status(rows["a"], now=1000.0) is Status.ALIVE
    assert status(rows["a"], now=2000.0) is Status.EXPIRED
    assert status(rows["a"], now=rows["a"].created_at + 11, max_age_s=10) is Status.EXPIRED
    assert status(rows["b"], now=1000.0) is Status.ORPHANED
    assert status(rows["c"], now=1000.0) is Status.UNKNOWN
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
