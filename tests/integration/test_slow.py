"""Slow scenarios: scripts/test-slow runs them (pytest -m slow)."""

from __future__ import annotations

import pytest

from tests.support.killing import run_trials


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fifty_sigkills_leak_nothing() -> None:
    trials = run_trials(50, seed=1)
    assert [t for t in trials if t.leaked] == []
    assert all(t.reap_s is not None and t.reap_s <= 10.0 for t in trials)
