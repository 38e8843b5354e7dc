"""Many processes at once: the VM limit, generated names, the ledger."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from tests.support import workers
from vmlease._ledger import Ledger, VMState
from vmlease.backends import available, get

pytestmark = pytest.mark.timeout(300)


def run_all(target: object, args: list[tuple[object, ...]]) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args]  # type: ignore[arg-type]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_never_more_than_n_vms_at_once_across_four_processes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    logs = [tmp_path / f"log{i}" for i in range(4)]
    run_all(workers.hold_vms, [(str(state), str(log), 8) for log in logs])
    edges = []
    for log in logs:
        for line in log.read_text().splitlines():
            began, ended = json.loads(line)
            edges += [(began, 1), (ended, -1)]
    assert len(edges) == 4 * 8 * 2
    at_once = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts on ties
        at_once += step
        peak = max(peak, at_once)
    assert peak == 2  # the limit was reached, never passed


def test_eight_processes_make_80000_distinct_names_valid_on_every_backend(
    tmp_path: Path,
) -> None:
    outs = [tmp_path / f"names{i}" for i in range(8)]
    run_all(workers.make_names, [(str(out), 10_000, i) for i, out in enumerate(outs)])
    names = [n for out in outs for n in out.read_text().splitlines()]
    assert len(names) == 80_000
    assert len(set(names)) == 80_000
    for backend_name in available():
        backend = get(backend_name, state_dir=tmp_path / "backend-state")
        for name in names:
            backend.validate_name(name)


def test_eight_processes_write_the_ledger_at_once_and_lose_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Some finish (and delete their VMs) while the others still make theirs.
    counts = [250, 500, 750, 1000, 1000, 1250, 1500, 1750]
    run_all(workers.claim_vms, [(str(state), "sharedsess", n) for n in counts])
    ledger = Ledger(state / "ledger.sqlite3")
    try:
        records = ledger.records(include_gone=True)
        assert len(records) == 8000
        assert len({r.name for r in records}) == 8000
        assert {r.state for r in records} == {VMState.GONE}
        assert all(len(ledger.events(r.id)) >= 4 for r in records[:50])
    finally:
        ledger.close()


def test_eight_processes_create_a_new_ledger_at_once(tmp_path: Path) -> None:
    for round_ in range(5):
        path = tmp_path / f"ledger{round_}.sqlite3"
        start_at = time.time() + 1.0
        run_all(workers.open_ledger, [(str(path), start_at) for _ in range(8)])
        ledger = Ledger(path)
        assert ledger.records() == []
        ledger.close()
