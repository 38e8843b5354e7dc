"""Real VMs under injected faults: retries, adoption after a hung create, no leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from tests.support.ledger import ledger_records
from vmlease import BackendTimeout, RetryPolicy
from vmlease._ledger import VMState
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu import QemuBackend
from vmlease.testing import FlakyBackend

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


def ledger_states(state: Path) -> list[VMState]:
    return [r.state for r in ledger_records(state)]


def test_the_example_suite_passes_with_30_percent_faults_and_some_hangs(
    state: Path, tiny_image: Image, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    bound_s = 60.0
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "examples" / "pytest.ini"),
            str(REPO / "examples"),
            "--ignore",
            str(REPO / "examples" / "debian"),
            "--vm-faults=failure_rate=0.3,hang_rate=0.05,hang_s=0.5,seed=5",
            f"--vm-retry=attempts=10,total_s={bound_s:g}",
            f"--vm-report={report}",
        ],
        env={
            **os.environ,
            "VMLEASE_STATE_DIR": str(state),
            "VMLEASE_IMAGE_DIR": str(tiny_image.path.parent.parent),
        },
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "nothing left behind" in done.stdout
    figures = json.loads(report.read_text())
    assert figures["faults"] > 5
    assert sum(figures["retries"].values()) >= figures["faults"]
    assert max(figures["longest_op_s"].values()) <= bound_s
    assert set(ledger_states(state)) == {VMState.GONE}


def flaky_session(state: Path, **faults: object) -> tuple[vmlease.Session, FlakyBackend]:
    flaky = FlakyBackend(QemuBackend(state_dir=state), **faults)  # type: ignore[arg-type]
    policy = RetryPolicy(attempts=3, total_s=120).without_waits()
    return vmlease.Session(backend=flaky, state_dir=state, retry=policy), flaky


def test_a_hung_create_whose_vm_boots_is_adopted(state: Path) -> None:
    session, flaky = flaky_session(
        state, failure_rate=0.0, hang_rate=1.0, hang_s=0.2, operations=["create"]
    )
    with session:
        vm = session.create()
        assert vm.run(["echo", "adopted"]).stdout == "adopted\n"
        assert session.stats().adopted == 1
        assert flaky.calls["create"] == 2
        assert len(flaky.inner.list()) == 1
    assert ledger_states(state) == [VMState.GONE]


def test_hung_creates_whose_vms_never_answer_leave_nothing(state: Path) -> None:
    # Every create makes its VM and then hangs; every readiness check fails.
    session, flaky = flaky_session(
        state, failure_rate=0.0, hang_rate=1.0, hang_s=0.2, operations=["create", "wait_ready"]
    )
    with session, pytest.raises(BackendTimeout):
        session.create()
    assert flaky.inner.list() == []
    assert ledger_states(state) == [VMState.GONE]
