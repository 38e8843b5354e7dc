"""The docs' examples run: docs/migrating.md (pytest modules, a script, shell) and
docs/guide.md (code against a debian-12 VM)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vmlease
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(600)
DOCS = Path(__file__).parents[2] / "docs"
_BLOCK = re.compile(r"<!-- run: ([\w -]+?) -->\n```\w+\n(.*?)```", re.S)


def _examples(kind: str, doc: str = "migrating.md") -> list[str]:
    return [code for found, code in _BLOCK.findall((DOCS / doc).read_text()) if found == kind]


def _env(state: Path, image: Image) -> dict[str, str]:
    return {
        **os.environ,
        "VMLEASE_STATE_DIR": str(state),
        "VMLEASE_IMAGE_DIR": str(image.path.parent.parent),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def test_the_guide_has_examples_of_each_kind() -> None:
    assert len(_examples("pytest")) >= 3
    assert _examples("python")
    assert len(_examples("sh")) >= 2


def test_the_pytest_examples_pass(
    pytester: pytest.Pytester, state: Path, tiny_image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in _env(state, tiny_image).items():
        monkeypatch.setenv(key, value)
    for name in (
        "VMLEASE_KEEP",
        "VMLEASE_IMAGE",
        "VMLEASE_BACKEND",
        "VMLEASE_NETWORK",
        "VMLEASE_ARCH",
    ):
        monkeypatch.delenv(name, raising=False)
    examples = _examples("pytest")
    pytester.makepyfile(**{f"test_example_{i}": code for i, code in enumerate(examples)})
    tests = sum(code.count("\ndef test_") + code.startswith("def test_") for code in examples)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=500)
    # the parametrized clean-VM test counts twice
    result.assert_outcomes(passed=tests + 1)


@pytest.mark.parametrize("kind", ["python", "sh"])
def test_the_script_examples_run(state: Path, tiny_image: Image, kind: str) -> None:
    for code in _examples(kind):
        argv = [sys.executable, "-c", code] if kind == "python" else ["bash", "-ec", code]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_env(state, tiny_image),
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"


def test_the_guides_examples_run_against_a_debian_vm(
    debian_image: Image, session: vmlease.Session
) -> None:
    examples = _examples("with a debian-12 vm", "guide.md")
    assert examples
    vm = session.create(image="debian-12")
    for code in examples:
        exec(code, {"vm": vm})  # noqa: S102 - the guide's own example, run as written
