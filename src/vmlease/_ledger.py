"""The ownership ledger: which VMs vmlease made, for whom, and where they are in life.

SQLite in WAL mode, one file in the state directory, shared by every process
of the user on this machine. A row is written *before* a backend is asked to
create the VM, so a create that times out but later succeeds still has an
owner on record. Every state change is a row in ``events`` as well.

A name is unique among the rows that are not ``gone``: the name of a deleted
VM may be chosen again, and its history stays. A generated name is never
handed out twice, so a name in a log or an event always means one VM.

Writes that read first (claiming a name) use ``BEGIN IMMEDIATE`` so two
processes cannot both see a name free. Waiting for another writer is bounded
by ``busy_timeout_s``; "database is locked" never reaches a user as such.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmlease._errors import LedgerError, NameInUse
from vmlease._identity import Owner
from vmlease._paths import free_space

__all__ = ["Event", "Ledger", "Record", "VMState"]

_SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    session_id TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start_time INTEGER NOT NULL,
    owner_boot_id TEXT NOT NULL,
    owner_host TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL,
    instance_id TEXT,
    forwards TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS vms_live_name ON vms(backend, name) WHERE state != 'gone';
CREATE INDEX IF NOT EXISTS vms_session ON vms(session_id);
CREATE INDEX IF NOT EXISTS vms_name ON vms(backend, name);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id),
    state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_vm ON events(vm_id);
"""
#: What turns a ledger of each older schema into the next one.
_UPGRADES = {
    1: "ALTER TABLE vms ADD COLUMN instance_id TEXT",  # what Backend.mark returned
    2: "CREATE INDEX IF NOT EXISTS vms_name ON vms(backend, name)",  # every name ever used
    3: "ALTER TABLE vms ADD COLUMN forwards TEXT",  # forwarded ports: {guest: host}
}


class VMState(enum.StrEnum):
    """Where a VM is in its life. Every change is recorded."""

    INTENDED = "intended"  # row written, backend not asked yet
    CREATING = "creating"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    DELETING = "deleting"
    KEPT = "kept"  # left running on purpose (--vm-keep); no session owns it any more
    GONE = "gone"
    FAILED = "failed"  # the error is kept; the VM may still need deleting


@dataclass(frozen=True, slots=True)
class Record:
    """One VM as the ledger knows it. Times are seconds since the epoch."""

    id: int
    name: str
    backend: str
    owner: Owner
    spec: str
    state: VMState
    error: str | None
    created_at: float
    updated_at: float
    expires_at: float | None
    instance_id: str | None = None
    #: TCP ports forwarded from 127.0.0.1 on the host: guest port -> host port.
    forwards: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded state change."""

    state: VMState
    at: float
    detail: str | None


def _record(row: sqlite3.Row) -> Record:
    return Record(
        id=row["id"],
        name=row["name"],
        backend=row["backend"],
        owner=Owner(
            session_id=row["session_id"],
            pid=row["owner_pid"],
            start_time=row["owner_start_time"],
            boot_id=row["owner_boot_id"],
            host=row["owner_host"],
        ),
        spec=row["spec"],
        state=VMState(row["state"]),
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        instance_id=row["instance_id"],
        forwards={int(k): int(v) for k, v in json.loads(row["forwards"] or "{}").items()},
    )


class Ledger:
    """The ledger file at ``path``. Thread-safe; share one per process.

    Args:
        path: the SQLite file; its directory must exist.
        clock: wall-clock time in seconds (injected for tests).
        busy_timeout_s: how long to wait for another writer.
        create: create the file if it does not exist. With False, a missing
            ledger is a LedgerError (for commands that must not invent one).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
        create: bool = True,
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        if not create and not path.exists():
            raise LedgerError(f"no ledger at {path}: vmlease has not created any VM here yet")
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"the ledger at {path} cannot be opened ({exc})") from exc
        try:
            self._prepare(busy_timeout_s)
        except BaseException:
            self._db.close()  # a refused ledger leaves no open connection behind
            self._closed = True
            raise

    def _prepare(self, busy_timeout_s: float) -> None:
        """Settings, and the schema checked or brought up to date."""
        path = self.path
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._set_wal(busy_timeout_s)
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger at {path} was written by a newer vmlease "
                    f"(schema {version}); upgrade vmlease to use it"
                )
            if version < _SCHEMA_VERSION:
                self._upgrade()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise LedgerError(f"the ledger at {path} cannot be read ({exc})") from exc
            raise LedgerError(
                f"the ledger at {path} stayed locked for {busy_timeout_s:g} s ({exc}); "
                "another process holds it: find it with `fuser` and let it finish"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise LedgerError(
                f"the ledger at {path} cannot be read ({exc}); it may be corrupt. "
                "Move it aside to start a new one; VMs it recorded must then be "
                "deleted by hand"
            ) from exc

    def _upgrade(self) -> None:
        """Create the tables, or bring an older ledger's up to date, in one
        transaction; the version is read again inside it, since another
        process may have done the work meanwhile."""
        with self._write():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                else:
                    for step in range(version, _SCHEMA_VERSION):
                        self._db.execute(_UPGRADES[step])
                self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _set_wal(self, busy_timeout_s: float) -> None:
        """Switch to WAL. Processes opening a new ledger at once can get "database
        is locked" here without SQLite's busy handler being asked, so wait
        for the switch like for any other lock."""
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._closed = True

    def __del__(self) -> None:
        # An open connection is an open file: say so, on every Python (3.13's
        # sqlite3 says it too, later and less clearly), and close it.
        if not getattr(self, "_closed", True) and hasattr(self, "_db"):
            warnings.warn(
                f"unclosed ledger {self.path}", ResourceWarning, source=self, stacklevel=1
            )
            self._db.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Serialise this process's writers; SQLite serialises the others."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.DatabaseError):
                        self._db.execute("ROLLBACK")
                hint = ""
                if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                    hint = (
                        f" ({free_space(self.path.parent)} free there); free some space "
                        "(`vmlease image prune` removes unused images and saved states)"
                    )
                raise LedgerError(f"ledger write failed at {self.path}: {exc}{hint}") from exc

    def claim(
        self,
        *,
        name: str | Callable[[int], str],
        backend: str,
        owner: Owner,
        spec: str,
        expires_at: float | None = None,
        first: int = 1,
    ) -> Record:
        """Record the intent to create ``name``; raise NameInUse if a live row has it.

        ``name`` may instead be a function of a counter: then the first
        counter from ``first`` whose name no row has ever had is taken, in
        the same transaction, so processes that share a session never lose
        a race for a generated name, and none is given out again after its
        VM is deleted by another of them.
        """
        now = self._clock()
        with self._write():
            self._db.execute("BEGIN IMMEDIATE")

            def holder(candidate: str) -> sqlite3.Row | None:
                row: sqlite3.Row | None = self._db.execute(
                    "SELECT session_id, state FROM vms"
                    " WHERE backend = ? AND name = ? AND state != 'gone'",
                    (backend, candidate),
                ).fetchone()
                return row

            def used(candidate: str) -> bool:
                row = self._db.execute(
                    "SELECT 1 FROM vms WHERE backend = ? AND name = ? LIMIT 1",
                    (backend, candidate),
                ).fetchone()
                return row is not None

            if callable(name):
                counter = first
                candidate = name(counter)
                while used(candidate):
                    counter += 1
                    candidate = name(counter)
                name = candidate
            else:
                taken = holder(name)
                if taken is not None:
                    self._db.execute("ROLLBACK")
                    raise NameInUse(
                        f"a VM named {name!r} already exists on {backend} "
                        f"(session {taken['session_id']}, {taken['state']}); "
                        "choose another name or delete that VM first"
                    )
            cur = self._db.execute(
                "INSERT INTO vms (name, backend, session_id, owner_pid, owner_start_time,"
                " owner_boot_id, owner_host, spec, state, created_at, updated_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    backend,
                    owner.session_id,
                    owner.pid,
                    owner.start_time,
                    owner.boot_id,
                    owner.host,
                    spec,
                    VMState.INTENDED.value,
                    now,
                    now,
                    expires_at,
                ),
            )
            vm_id = cur.lastrowid
            self._db.execute(
                "INSERT INTO events (vm_id, state, at) VALUES (?, ?, ?)",
                (vm_id, VMState.INTENDED.value, now),
            )
            self._db.execute("COMMIT")
        return Record(
            id=vm_id or 0,
            name=name,
            backend=backend,
            owner=owner,
            spec=spec,
            state=VMState.INTENDED,
            error=None,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
        )

    def transition(
        self, vm_id: int, state: VMState, *, error: str | None = None, detail: str | None = None
    ) -> None:
        """Move the row ``vm_id`` to ``state`` and record the event."""
        now = self._clock()
        with self._write():
            self._db.execute("BEGIN IMMEDIATE")
            if error is not None:
                self._db.execute(
                    "UPDATE vms SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                    (state.value, error, now, vm_id),
                )
            else:
                self._db.execute(
                    "UPDATE vms SET state = ?, updated_at = ? WHERE id = ?",
                    (state.value, now, vm_id),
                )
            self._db.execute(
                "INSERT INTO events (vm_id, state, at, detail) VALUES (?, ?, ?, ?)",
                (vm_id, state.value, now, detail if detail is not None else error),
            )
            self._db.execute("COMMIT")

    def set_forwards(self, vm_id: int, forwards: dict[int, int]) -> None:
        """Record the VM's forwarded ports (guest port -> host port on 127.0.0.1)."""
        with self._write():
            self._db.execute(
                "UPDATE vms SET forwards = ?, updated_at = ? WHERE id = ?",
                (
                    json.dumps({str(k): v for k, v in sorted(forwards.items())}),
                    self._clock(),
                    vm_id,
                ),
            )

    def set_instance_id(self, vm_id: int, instance_id: str) -> None:
        """Keep what the backend's ``mark`` returned for ``vm_id``: cleanup compares it."""
        with self._write():
            self._db.execute(
                "UPDATE vms SET instance_id = ?, updated_at = ? WHERE id = ?",
                (instance_id, self._clock(), vm_id),
            )

    def note(self, vm_id: int, state: VMState, detail: str) -> None:
        """Record an event that does not change the state (a snapshot, a restore)."""
        with self._write():
            self._db.execute(
                "INSERT INTO events (vm_id, state, at, detail) VALUES (?, ?, ?, ?)",
                (vm_id, state.value, self._clock(), detail),
            )

    def take_for_deletion(self, vm_id: int, *, detail: str, stale_after_s: float = 60.0) -> bool:
        """Atomically mark ``vm_id`` as being deleted by the caller.

        False if the row is gone, or another process marked it ``deleting``
        less than ``stale_after_s`` ago (a deleter that died longer ago than
        that has given up its claim). So the session, the reaper, a sweep and
        ``vmlease cleanup`` never delete one VM at the same time.
        """
        now = self._clock()
        with self._write():
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE vms SET state = 'deleting', updated_at = ? WHERE id = ?"
                " AND (state NOT IN ('deleting', 'gone')"
                "      OR (state = 'deleting' AND updated_at < ?))",
                (now, vm_id, now - stale_after_s),
            )
            taken = cur.rowcount == 1
            if taken:
                self._db.execute(
                    "INSERT INTO events (vm_id, state, at, detail) VALUES (?, 'deleting', ?, ?)",
                    (vm_id, now, detail),
                )
            self._db.execute("COMMIT")
        return taken

    def get(self, vm_id: int) -> Record | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return _record(row) if row else None

    def find(self, backend: str, name: str) -> Record | None:
        """The live (not gone) row for ``name`` on ``backend``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM vms WHERE backend = ? AND name = ? AND state != 'gone'",
                (backend, name),
            ).fetchone()
        return _record(row) if row else None

    def records(
        self,
        *,
        session_id: str | None = None,
        include_gone: bool = False,
        states: Sequence[VMState] | None = None,
    ) -> list[Record]:
        """Rows, oldest first, filtered by session and state."""
        sql = "SELECT * FROM vms WHERE 1=1"
        args: list[object] = []
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        if not include_gone:
            sql += " AND state != 'gone'"
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(s.value for s in states)
        sql += " ORDER BY id"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_record(r) for r in rows]

    def events(self, vm_id: int) -> list[Event]:
        """The recorded state changes of one VM, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, at, detail FROM events WHERE vm_id = ? ORDER BY id", (vm_id,)
            ).fetchall()
        return [Event(VMState(r["state"]), r["at"], r["detail"]) for r in rows]
