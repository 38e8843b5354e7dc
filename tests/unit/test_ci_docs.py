"""docs/ci.md: its workflows parse, and every vmlease command they run exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from vmlease.cli import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the tools extra (ansible-core)")
DOC = Path(__file__).parents[2] / "docs" / "ci.md"
_SHELL = {"&&", "||", ";", "|"}


def _blocks() -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _vmlease_commands(text: str) -> list[list[str]]:
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line.replace("&&", " && "), comments=True)
        for at, word in enumerate(words):
            before = words[:at]
            start = max((i for i, w in enumerate(before) if w in _SHELL), default=-1)
            if word == "vmlease" and "install" not in before[start + 1 :]:  # not `pip install`
                rest = words[at + 1 :]
                end = next((i for i, w in enumerate(rest) if w in _SHELL), len(rest))
                found.append(rest[:end])
    return found


def test_the_doc_has_a_github_and_a_gitlab_workflow_that_parse() -> None:
    github, gitlab = _blocks()
    steps = github["jobs"]["test"]["steps"]
    assert any(step.get("uses", "").startswith("actions/cache") for step in steps)
    assert any(step.get("if") == "always()" for step in steps)
    assert "after_script" in gitlab["tests"]
    for block in (github, gitlab):
        text = "\n".join(_strings(block))
        assert "pytest -n auto" in text
        assert "vmlease cleanup" in text
        assert ".cache/vmlease" in text


def test_every_vmlease_command_in_the_workflows_exists() -> None:
    github, gitlab = _blocks()
    shell = [step["run"] for step in github["jobs"]["test"]["steps"] if "run" in step]
    shell += _strings([gitlab["tests"][k] for k in ("before_script", "script", "after_script")])
    commands = [c for text in shell for c in _vmlease_commands(text)]
    assert len(commands) >= 8
    for words in commands:
        parser = build_parser(for_images=bool(words) and words[0] == "image")
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"`vmlease {' '.join(words)}` in docs/ci.md is not a vmlease command")
