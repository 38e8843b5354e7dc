"""The layers of docs/architecture.md are import contracts: an upward import fails the build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(src: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [str(LINT), "--no-cache", *(a for c in contracts for a in ("--contract", c))]
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package where ``module`` (a path under vmlease/) also has ``line``."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "vmlease", src / "vmlease")
    target = src / "vmlease" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return src


def test_the_tree_keeps_every_contract() -> None:
    done = _lint(REPO / "src")
    assert done.returncode == 0, done.stdout


def test_the_ledger_importing_the_session_breaks_the_layers(tmp_path: Path) -> None:
    src = _copy_with(tmp_path, "_ledger.py", "from vmlease._session import Session  # noqa")
    done = _lint(src, "layers")
    assert done.returncode == 1
    assert "BROKEN" in done.stdout
    assert "vmlease._ledger -> vmlease._session" in done.stdout


def test_a_backend_importing_the_ledger_breaks_the_layers(tmp_path: Path) -> None:
    src = _copy_with(tmp_path, "backends/qemu/_launch.py", "import vmlease._ledger  # noqa")
    done = _lint(src, "layers")
    assert done.returncode == 1
    assert "vmlease.backends.qemu._launch -> vmlease._ledger" in done.stdout


def test_a_module_outside_every_layer_breaks_the_layers(tmp_path: Path) -> None:
    src = _copy_with(tmp_path, "_errors.py", "")
    (src / "vmlease" / "_unplaced.py").write_text('"""Not in any layer."""\n')
    done = _lint(src, "layers")
    assert done.returncode == 1
    assert "vmlease._unplaced" in done.stdout
