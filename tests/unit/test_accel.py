from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from vmlease import ConfigError
from vmlease._runner import Completed
from vmlease.backends.qemu._accel import choose_accel


class ScriptedRunner:
    def __init__(self, returncode: int | None, stderr: str = "") -> None:
        self.returncode = returncode
        self.stderr = stderr
        self.calls: list[list[str]] = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        self.calls.append(list(argv))
        return Completed(tuple(argv), self.returncode, "", self.stderr)


kvm_usable = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="the probe needs /dev/kvm to exist"
)


@pytest.mark.parametrize("value", ["kvm", "tcg", " TCG "])
def test_the_environment_decides_without_probing(tmp_path: Path, value: str) -> None:
    runner = ScriptedRunner(131)
    accel, reason = choose_accel("q", "v", runner, tmp_path, {"VMLEASE_QEMU_ACCEL": value})
    assert accel == value.strip().lower()
    assert "VMLEASE_QEMU_ACCEL" in reason
    assert runner.calls == []


def test_a_bad_environment_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'kvm' or 'tcg'"):
        choose_accel("q", "v", ScriptedRunner(131), tmp_path, {"VMLEASE_QEMU_ACCEL": "hvf"})


@kvm_usable
def test_a_probe_that_exits_as_expected_means_kvm(tmp_path: Path) -> None:
    runner = ScriptedRunner(131)
    assert choose_accel("q", "v", runner, tmp_path, {})[0] == "kvm"
    assert "-accel" in runner.calls[0]
    assert "kvm" in runner.calls[0]


@kvm_usable
@pytest.mark.parametrize(
    ("returncode", "stderr", "why"),
    [(None, "", "did not finish"), (134, "kvm_buf_set_msrs: Assertion failed", "Assertion")],
)
def test_a_hanging_or_crashing_probe_means_tcg(
    tmp_path: Path, returncode: int | None, stderr: str, why: str
) -> None:
    accel, reason = choose_accel("q", "v", ScriptedRunner(returncode, stderr), tmp_path, {})
    assert accel == "tcg"
    assert why in reason


@kvm_usable
def test_the_answer_is_cached_per_boot_and_qemu_version(tmp_path: Path) -> None:
    first = ScriptedRunner(None)
    assert choose_accel("q", "v1", first, tmp_path, {})[0] == "tcg"
    again = ScriptedRunner(131)
    accel, reason = choose_accel("q", "v1", again, tmp_path, {})
    assert (accel, again.calls) == ("tcg", [])
    assert "earlier" in reason
    assert choose_accel("q", "v2", again, tmp_path, {})[0] == "kvm"
