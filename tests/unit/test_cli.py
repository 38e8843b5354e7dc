from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.doubles.fakes import SharedFake
from vmlease._identity import current_owner
from vmlease._ledger import Ledger
from vmlease.backends import _registry
from vmlease.cli import main


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMLEASE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(tmp_path / "images"))
    return tmp_path / "state"


def test_ls_with_no_ledger_is_empty_and_creates_nothing(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"vms": []}
    assert main(["ls"]) == 0
    assert capsys.readouterr().out == "no VMs\n"
    assert not state.exists()


def test_ls_on_a_corrupt_ledger_says_so_and_keeps_the_file(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state.mkdir()
    (state / "ledger.sqlite3").write_bytes(b"garbage" * 1000)
    assert main(["ls"]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err
    assert "Traceback" not in err
    assert (state / "ledger.sqlite3").read_bytes() == b"garbage" * 1000


def test_building_an_unknown_image_is_refused(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["image", "build", "windows"]) == 2
    assert "it builds: debian-12, debian-13, tiny" in capsys.readouterr().err


def test_image_ls_with_no_images_says_how_to_build(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["image", "ls"]) == 0
    assert "vmlease image build tiny" in capsys.readouterr().out
    assert main(["image", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"images": []}


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def _orphan(state: Path, name: str, backend: str) -> None:
    """A ledger row for ``name`` whose owner ran before the last reboot."""
    state.mkdir()
    ledger = Ledger(state / "ledger.sqlite3")
    owner = dataclasses.replace(current_owner("gone"), boot_id="an-earlier-boot")
    ledger.claim(name=name, backend=backend, owner=owner, spec="{}")
    ledger.close()


def test_cleanup_exits_1_when_a_delete_fails(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dead owner's VM on a backend that is no longer installed cannot be deleted.
    _orphan(state, "vmlease-old-1", "retired")
    assert main(["cleanup"]) == 1
    out = capsys.readouterr().out
    assert "vmlease-old-1" in out
    assert "failed" in out
    assert "unknown backend 'retired'" in out
    assert main(["cleanup", "--json"]) == 1
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert (result["why"], result["action"]) == ("orphaned", "failed")


def test_cleanup_exits_1_and_says_why_when_a_vm_cannot_be_proven_ours(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _orphan(state, "db", "shared")
    fake = SharedFake(vms={"db": "running"})
    monkeypatch.setattr(_registry, "get", lambda name, **_options: fake)
    assert main(["cleanup"]) == 1
    out = capsys.readouterr().out
    assert "unconfirmed" in out
    assert "cannot confirm that 'db' on shared is the VM vmlease made" in out
    assert fake.vms == {"db": "running"}


def test_cleanup_rejects_a_bad_max_age(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["cleanup", "--max-age", "-3"])
    assert info.value.code == 2
    assert "more than 0 seconds" in capsys.readouterr().err


def test_a_table_wider_than_the_terminal_is_cut_to_fit() -> None:
    from vmlease._present import table as _table

    rows = [["vmlease-abc-1", "running", "r" + "x" * 60], ["b", "stopped", "short"]]
    whole = _table(["NAME", "STATE", "SESSION"], rows)
    assert "x" * 60 in whole  # no width given and not a terminal: every cell whole
    fitted = _table(["NAME", "STATE", "SESSION"], rows, width=50)
    assert max(len(line) for line in fitted.splitlines()) <= 50
    assert "…" in fitted
    assert "vmlease-abc-1" in fitted  # narrow columns keep their cells


def test_long_waits_reach_the_terminal_as_lines() -> None:
    import logging

    from vmlease.pytest_plugin import _TerminalProgress

    lines: list[str] = []

    class Reporter:
        def write_line(self, line: str) -> None:
            lines.append(line)

    handler = _TerminalProgress(Reporter())
    logger = logging.getLogger("vmlease.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("%s: booting it", "vm-1")
    finally:
        logger.removeHandler(handler)
    assert lines == ["vmlease: vm-1: booting it"]
