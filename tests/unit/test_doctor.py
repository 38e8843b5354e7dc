"""`vmlease doctor` and the checks a session runs when it starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.ledger import dead_owner
from vmlease import BackendUnavailable, Session, VMState
from vmlease._checks import Severity, disk_check
from vmlease._doctor import doctor
from vmlease._ledger import Ledger
from vmlease.cli import main

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMLEASE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("VMLEASE_QEMU_ACCEL", "tcg")  # no KVM probe in unit tests
    for name in ("VMLEASE_QEMU", "VMLEASE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def by_name(checks: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in checks}


@needs_qemu
def test_a_ready_machine_passes_with_warnings_only(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    checks = by_name(report["checks"])
    assert checks["qemu: qemu-system-x86_64"]["status"] == "ok"
    assert checks["kvm"]["status"] == "warn"  # VMLEASE_QEMU_ACCEL=tcg
    assert "software emulation" in checks["kvm"]["message"]
    assert checks["image cache"]["status"] == "warn"  # an empty image directory
    assert "vmlease image build tiny" in checks["image cache"]["message"]
    assert checks["orphaned VMs"]["status"] == "ok"
    for where in ("state", "images"):  # the state directory and the image cache
        assert "free at" in checks[f"free disk ({where})"]["message"]


def test_a_missing_program_fails_with_the_install_command(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMLEASE_QEMU", "qemu-system-x86_64-missing")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  qemu: qemu-system-x86_64-missing" in out
    assert "apt-get install qemu-system-x86" in out
    assert out.rstrip().endswith("vmlease cannot make VMs here yet")


def test_an_unknown_backend_fails(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--backend", "vmware", "--json"]) == 1
    checks = by_name(json.loads(capsys.readouterr().out)["checks"])
    assert "installed backends" in checks["backend vmware"]["message"]


def test_a_state_directory_that_is_a_file_fails(state: Path) -> None:
    state.write_text("not a directory")
    checks = {c.name: c for c in doctor(state, "vmlease-no-such-backend")}
    assert checks["state directory"].status is Severity.FAIL
    assert "VMLEASE_STATE_DIR" in checks["state directory"].message


def test_a_state_directory_open_to_others_warns(state: Path) -> None:
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    [check] = [c for c in doctor(state, "qemu") if c.name == "state directory"]
    assert check.status is Severity.WARN
    assert f"chmod 700 {state}" in check.message


def test_vms_of_dead_owners_are_named_with_what_to_do(state: Path) -> None:
    state.mkdir(mode=0o700)
    ledger = Ledger(state / "ledger.sqlite3")
    row = ledger.claim(name="vmlease-dead-1", backend="qemu", owner=dead_owner(), spec="{}")
    ledger.transition(row.id, VMState.READY)
    ledger.close()
    [check] = [c for c in doctor(state, "qemu") if c.name == "orphaned VMs"]
    assert check.status is Severity.WARN
    assert "vmlease-dead-1 (orphaned)" in check.message
    assert "`vmlease cleanup`" in check.message


def test_low_disk_warns(tmp_path: Path) -> None:
    check = disk_check("state", tmp_path / "not" / "made" / "yet", low_bytes=2**62)
    assert check.status is Severity.WARN
    assert "vmlease cleanup" in check.message
    assert disk_check("state", tmp_path).status is Severity.OK


def test_a_session_fails_fast_before_recording_anything(state: Path) -> None:
    with pytest.raises(BackendUnavailable, match="apt-get install qemu-system-x86"):
        Session(state_dir=state, backend_options={"qemu_binary": "qemu-missing"}, reaper=False)
    assert not (state / "ledger.sqlite3").exists()
