from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from vmlease import LedgerError, NameInUse
from vmlease._identity import Owner
from vmlease._ledger import _SCHEMA_VERSION, Ledger, VMState

OWNER = Owner(session_id="s1", pid=123, start_time=456, boot_id="b", host="h")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    clock = iter(range(1000, 100000)).__next__
    opened = Ledger(tmp_path / "ledger.sqlite3", clock=lambda: float(clock()))
    yield opened
    opened.close()


def test_claim_writes_an_intended_row_with_the_owner(ledger: Ledger) -> None:
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}", expires_at=5.0)
    got = ledger.get(rec.id)
    assert got is not None
    assert got.state is VMState.INTENDED
    assert got.owner == OWNER
    assert got.expires_at == 5.0
    assert [e.state for e in ledger.events(rec.id)] == [VMState.INTENDED]


def test_every_transition_is_an_event(ledger: Ledger) -> None:
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    for state in (VMState.CREATING, VMState.READY, VMState.DELETING, VMState.GONE):
        ledger.transition(rec.id, state)
    events = ledger.events(rec.id)
    assert [e.state for e in events] == [
        VMState.INTENDED,
        VMState.CREATING,
        VMState.READY,
        VMState.DELETING,
        VMState.GONE,
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_failure_keeps_the_error(ledger: Ledger) -> None:
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    ledger.transition(rec.id, VMState.FAILED, error="BootError: no answer")
    got = ledger.get(rec.id)
    assert got is not None
    assert got.state is VMState.FAILED
    assert got.error == "BootError: no answer"
    assert ledger.events(rec.id)[-1].detail == "BootError: no answer"


def test_a_live_name_cannot_be_claimed_twice(ledger: Ledger) -> None:
    ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    with pytest.raises(NameInUse, match="vm1"):
        ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    # Another backend has its own names.
    ledger.claim(name="vm1", backend="other", owner=OWNER, spec="{}")


def test_a_failed_row_still_holds_its_name(ledger: Ledger) -> None:
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    ledger.transition(rec.id, VMState.FAILED, error="x")
    with pytest.raises(NameInUse):
        ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")


def test_a_gone_name_can_be_used_again_and_history_stays(ledger: Ledger) -> None:
    first = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    ledger.transition(first.id, VMState.GONE)
    second = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    assert second.id != first.id
    assert [r.id for r in ledger.records()] == [second.id]
    assert [r.id for r in ledger.records(include_gone=True)] == [first.id, second.id]
    assert ledger.find("qemu", "vm1") == ledger.get(second.id)


def test_a_generated_name_is_never_given_out_twice(ledger: Ledger) -> None:
    def name(counter: int) -> str:
        return f"vmlease-s1-{counter}"

    one = ledger.claim(name=name, backend="qemu", owner=OWNER, spec="{}")
    two = ledger.claim(name=name, backend="qemu", owner=OWNER, spec="{}")
    assert (one.name, two.name) == ("vmlease-s1-1", "vmlease-s1-2")
    # Another process of the session deletes its VM; a claim that starts
    # from a lower counter steps over the deleted VM's name as well.
    ledger.transition(one.id, VMState.GONE)
    three = ledger.claim(name=name, backend="qemu", owner=OWNER, spec="{}", first=1)
    assert three.name == "vmlease-s1-3"
    # A chosen name is still free once its VM is gone.
    again = ledger.claim(name="vmlease-s1-1", backend="qemu", owner=OWNER, spec="{}")
    assert again.name == "vmlease-s1-1"


def test_records_filter_by_session_and_state(ledger: Ledger) -> None:
    other = Owner("s2", 1, 1, "b", "h")
    a = ledger.claim(name="a", backend="qemu", owner=OWNER, spec="{}")
    ledger.claim(name="b", backend="qemu", owner=other, spec="{}")
    ledger.transition(a.id, VMState.READY)
    assert [r.name for r in ledger.records(session_id="s1")] == ["a"]
    assert [r.name for r in ledger.records(states=[VMState.INTENDED])] == ["b"]


def test_the_ledger_file_is_wal(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    with closing(sqlite3.connect(tmp_path / "l.db")) as db, db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_ledger_is_an_error_when_it_must_exist(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_corrupt_ledger_is_a_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(LedgerError, match="corrupt"):
        Ledger(path)
    assert path.read_bytes() == garbage


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="newer vmlease"):
        Ledger(path)


def test_a_first_schema_ledger_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            """
            CREATE TABLE vms (
                id INTEGER PRIMARY KEY, name TEXT NOT NULL, backend TEXT NOT NULL,
                session_id TEXT NOT NULL, owner_pid INTEGER NOT NULL,
                owner_start_time INTEGER NOT NULL, owner_boot_id TEXT NOT NULL,
                owner_host TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
                error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
                expires_at REAL
            );
            CREATE TABLE events (
                id INTEGER PRIMARY KEY, vm_id INTEGER NOT NULL REFERENCES vms(id),
                state TEXT NOT NULL, at REAL NOT NULL, detail TEXT
            );
            INSERT INTO vms VALUES (1, 'old-1', 'multipass', 's0', 1, 2, 'b', 'h', '{}',
                                    'ready', NULL, 1.0, 1.0, NULL);
            PRAGMA user_version = 1;
            """
        )
    ledger = Ledger(path)
    [old] = ledger.records()
    assert (old.name, old.state, old.instance_id) == ("old-1", VMState.READY, None)
    ledger.set_instance_id(old.id, "vmlease:s0:1:ab")
    new = ledger.claim(name="new-1", backend="multipass", owner=OWNER, spec="{}")
    ledger.set_instance_id(new.id, "machine-id")
    ledger.close()
    again = Ledger(path)  # opening an upgraded ledger changes nothing
    assert [(r.name, r.instance_id) for r in again.records()] == [
        ("old-1", "vmlease:s0:1:ab"),
        ("new-1", "machine-id"),
    ]
    again.close()


def _upgrade_once(path: str) -> int:
    Ledger(Path(path)).close()
    return 0


def test_processes_upgrading_one_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE vms (id INTEGER PRIMARY KEY, name TEXT NOT NULL, backend TEXT NOT NULL,"
            " session_id TEXT NOT NULL, owner_pid INTEGER NOT NULL,"
            " owner_start_time INTEGER NOT NULL, owner_boot_id TEXT NOT NULL,"
            " owner_host TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL, error TEXT,"
            " created_at REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL);"
            "PRAGMA user_version = 1;"
        )
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        assert pool.map(_upgrade_once, [str(path)] * 6) == [0] * 6
    with closing(sqlite3.connect(path)) as db, db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(vms)")]
        assert columns.count("instance_id") == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == _SCHEMA_VERSION
        indexes = [row[1] for row in db.execute("PRAGMA index_list(vms)")]
        assert "vms_name" in indexes


def _claim_many(args: tuple[str, int, int]) -> int:
    path, worker, count = args
    ledger = Ledger(Path(path))
    owner = Owner(f"w{worker}", worker, 0, "b", "h")
    for i in range(count):
        rec = ledger.claim(name=f"w{worker}-{i}", backend="qemu", owner=owner, spec="{}")
        ledger.transition(rec.id, VMState.READY)
    ledger.close()
    return count


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        done = pool.map(_claim_many, [(str(path), w, 150) for w in range(4)])
    ledger = Ledger(path)
    assert sum(done) == 600
    assert len(ledger.records(states=[VMState.READY])) == 600
    ledger.close()


def test_only_one_deleter_takes_a_row(ledger: Ledger) -> None:
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    assert ledger.take_for_deletion(rec.id, detail="reaper")
    assert not ledger.take_for_deletion(rec.id, detail="sweep")
    events = ledger.events(rec.id)
    assert (events[-1].state, events[-1].detail) == (VMState.DELETING, "reaper")
    ledger.transition(rec.id, VMState.GONE)
    assert not ledger.take_for_deletion(rec.id, detail="late")


def test_a_stale_deleting_claim_can_be_taken_over(tmp_path: Path) -> None:
    now = [1000.0]
    ledger = Ledger(tmp_path / "l.db", clock=lambda: now[0])
    rec = ledger.claim(name="vm1", backend="qemu", owner=OWNER, spec="{}")
    assert ledger.take_for_deletion(rec.id, detail="a deleter that then died")
    now[0] += 30
    assert not ledger.take_for_deletion(rec.id, detail="too soon", stale_after_s=60)
    now[0] += 60
    assert ledger.take_for_deletion(rec.id, detail="took over", stale_after_s=60)
    ledger.close()
