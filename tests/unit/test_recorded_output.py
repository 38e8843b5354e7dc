"""The backends read the recorded tool output, and the doubles print its shape.

tests/data/README.md says where each recorded file comes from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmlease._errors import BackendError
from vmlease.backends import multipass, orbstack
from vmlease.backends.multipass import MultipassBackend
from vmlease.backends.orbstack import OrbStackBackend

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]


def recorded(path: str) -> str:
    return (DATA / path).read_text()


def test_orbstack_list_and_info_are_read() -> None:
    machines = orbstack.parse_list(recorded("orbstack/list.json"))
    assert [(m.name, m.state) for m in machines] == [
        ("ubuntu", "running"),
        ("vmlease-k1hka7dnuo-1", "stopped"),
    ]
    assert machines[1].detail["image"] == "debian:bookworm"
    info = orbstack.parse_info(recorded("orbstack/info.json"))
    assert (info.name, info.state, info.detail["arch"]) == (
        "vmlease-k1hka7dnuo-1",
        "running",
        "arm64",
    )
    assert orbstack.parse_list("null") == []
    assert orbstack.parse_list("") == []


def test_multipass_list_and_info_are_read_with_numbers_as_numbers() -> None:
    instances = multipass.parse_list(recorded("multipass/list.json"))
    assert [(i.name, i.state) for i in instances] == [
        ("primary", "running"),
        ("vmlease-k1hka7dnuo-2", "stopped"),
        ("old-work", "deleted"),
    ]
    info = multipass.parse_info(recorded("multipass/info.json"), "vmlease-k1hka7dnuo-2")
    assert info["cpus"] == 2  # "2" in the output
    assert info["disk_total"] == 5116440064  # a string there too
    assert info["memory_total"] == 1002500096  # an int there
    assert info["state"] == "running"


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (orbstack.parse_list, "{not json"),
        (orbstack.parse_list, '[{"state": "running"}]'),
        (multipass.parse_list, '{"list": [{"state": "Running"}]}'),
        (lambda t: multipass.parse_info(t, "x"), '{"info": {}}'),
    ],
)
def test_unreadable_output_is_a_backend_error(parse: Any, text: str) -> None:
    with pytest.raises(BackendError, match="cannot read"):
        parse(text)


@pytest.mark.parametrize("kind", ["orbstack", "multipass"])
def test_recorded_messages_are_classified(kind: str) -> None:
    backend = OrbStackBackend() if kind == "orbstack" else MultipassBackend()
    for case in json.loads(recorded(f"{kind}/errors.json")):
        error = backend.error(["tool"], int(case["exit"]), case["stderr"])
        assert type(error).__name__ == case["error"], case["stderr"]
        assert error.transient is case["transient"], case["stderr"]


def shape(value: Any) -> Any:
    """The keys and value types of a JSON document, lists reduced to their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def double(tool: str, home: Path, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", f"tests.doubles.{tool}", *args],
        cwd=REPO,
        env={"VMLEASE_DOUBLE_DIR": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_doubles_print_the_recorded_shapes(tmp_path: Path) -> None:
    # Machine records only: listing and describing them starts no VM.
    orb, mp = tmp_path / "orb", tmp_path / "mp"
    orb.mkdir()
    mp.mkdir()
    orb_machine = {
        "id": "01HQ5A2C8D1E3F4G5H6J7K8M9N",
        "image": "debian:bookworm",
        "arch": "arm64",
        "user": "anna",
        "state": "running",
    }
    (orb / "machines.json").write_text(json.dumps({"vmlease-k1hka7dnuo-1": orb_machine}))
    mp_instance = {"image": "lts", "cpus": 2, "memory_mb": 956, "state": "Running"}
    (mp / "machines.json").write_text(json.dumps({"vmlease-k1hka7dnuo-2": mp_instance}))

    orb_list = double("orbctl", orb, "list", "--format", "json")
    assert shape(orb_list[0]) == shape(json.loads(recorded("orbstack/list.json"))[0])
    orb_info = double("orbctl", orb, "info", "vmlease-k1hka7dnuo-1", "--format", "json")
    assert shape(orb_info) == shape(json.loads(recorded("orbstack/info.json")))
    mp_list = double("multipass", mp, "list", "--format", "json")
    assert shape(mp_list) == shape(json.loads(recorded("multipass/list.json")))
    mp_info = double("multipass", mp, "info", "vmlease-k1hka7dnuo-2", "--format", "json")
    assert shape(mp_info) == shape(json.loads(recorded("multipass/info.json")))
