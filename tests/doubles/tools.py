"""Putting the command-line doubles of ``orbctl`` and ``multipass`` on PATH for a test.

The doubles (tests/doubles/) are test doubles, not the real tools: see
their docstrings and tests/data/README.md for what they do and do not prove.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmlease.backends.qemu import QemuBackend

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"orbstack": "orbctl", "multipass": "multipass"}


def write_wrappers(bin_dir: Path) -> Path:
    for tool in TOOLS.values():
        script = bin_dir / tool
        script.write_text(
            "#!/bin/sh\n"
            f"PYTHONPATH={shlex.quote(str(REPO))} "
            f'exec {shlex.quote(sys.executable)} -m tests.doubles.{tool} "$@"\n'
        )
        script.chmod(0o755)
    return bin_dir


class Double:
    """The doubles' state directory for one test."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def inject(self, tool: str, command: str, **fault: Any) -> None:
        """Make the next ``fault["times"]`` (default 1) runs of ``tool command`` fail."""
        path = self.home / "faults.json"
        faults = json.loads(path.read_text()) if path.exists() else []
        faults.append({"tool": tool, "command": command, "times": 1, **fault})
        self.home.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(faults))

    def calls(self, tool: str) -> list[list[str]]:
        path = self.home / "calls.log"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [row[1:] for row in rows if row[0] == tool]

    def machines(self) -> dict[str, Any]:
        path = self.home / "machines.json"
        return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="session")
def doubles_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wrappers(tmp_path_factory.mktemp("doubles-bin"))


@pytest.fixture
def double(doubles_bin: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Double]:
    """Doubles on PATH with a state directory inside this test's (checked empty after)."""
    home = state / "double"
    monkeypatch.setenv("VMLEASE_DOUBLE_DIR", str(home))
    monkeypatch.setenv("PATH", f"{doubles_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    yield Double(home)
    # Whatever machines a test left (foreign ones it made on purpose included) go.
    backend = QemuBackend(state_dir=home)
    for vm in backend.list():
        backend.delete(vm.name)
    backend.close()
