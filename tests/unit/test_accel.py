from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.doubles.runner import ScriptedRunner
from vmlease import ConfigError
from vmlease._runner import Completed
from vmlease._spec import host_arch
from vmlease.backends.qemu._accel import choose_accel, emulator, probe_kvm

kvm_usable = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="the probe needs a /dev/kvm this user may open",
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


class TimedRunner:
    """Runs nothing: each accelerator's boot sector 'takes' the seconds given."""

    def __init__(self, seconds: dict[str, float], exit_code: int = 131) -> None:
        self.seconds = seconds
        self.exit_code = exit_code
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        accel = argv[argv.index("-accel") + 1]
        self.now += self.seconds[accel]
        return Completed(tuple(argv), self.exit_code, "", "")


@pytest.fixture
def kvm_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /dev/kvm that this user may open."""
    device = tmp_path / "kvm"
    device.touch()
    monkeypatch.setattr("os.access", lambda _path, _mode: True)
    return device


def test_kvm_that_runs_the_probe_about_as_fast_as_tcg_is_used(kvm_device: Path) -> None:
    runner = TimedRunner({"kvm": 0.09, "tcg": 0.06})
    works, reason = probe_kvm("qemu", runner, clock=runner.clock, device=kvm_device)
    assert works, reason


def test_kvm_far_slower_than_emulation_is_not_used_and_says_why(kvm_device: Path) -> None:
    runner = TimedRunner({"kvm": 1.22, "tcg": 0.06})
    works, reason = probe_kvm("qemu", runner, clock=runner.clock, device=kvm_device)
    assert not works
    assert "1.22 s where emulation took 0.06 s" in reason


def test_kvm_that_cannot_run_the_guest_is_not_used(kvm_device: Path) -> None:
    runner = TimedRunner({"kvm": 0.1, "tcg": 0.06}, exit_code=1)
    works, reason = probe_kvm("qemu", runner, clock=runner.clock, device=kvm_device)
    assert not works
    assert "could not run a KVM guest" in reason


def test_a_kvm_device_the_user_may_not_open_says_how_to_join_its_group(
    kvm_device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.access", lambda _path, _mode: False)
    works, reason = probe_kvm("qemu", TimedRunner({}), device=kvm_device)
    assert not works
    assert "usermod -aG kvm" in reason


def test_a_guest_of_another_architecture_is_emulated_without_a_probe(tmp_path: Path) -> None:
    runner = ScriptedRunner(0)
    foreign = "aarch64" if host_arch() == "x86_64" else "x86_64"
    env = {"VMLEASE_QEMU_ACCEL": "kvm"}  # this machine's own guests only
    accel, reason = choose_accel("q", "v", runner, tmp_path, env, arch=foreign)
    assert (accel, runner.calls) == ("tcg", [])
    assert "KVM runs only this machine's architecture" in reason


@kvm_usable
def test_an_arm64_host_probes_kvm_with_a_power_off_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vmlease.backends.qemu._accel.host_arch", lambda: "aarch64")
    runner = ScriptedRunner(0)
    assert choose_accel("q", "v", runner, tmp_path, {}, arch="aarch64")[0] == "kvm"
    assert "virt" in runner.calls[0]
    assert "-kernel" in runner.calls[0]


def test_each_architecture_has_its_emulator_and_its_own_setting() -> None:
    host = host_arch()
    foreign = "aarch64" if host == "x86_64" else "x86_64"
    assert emulator(foreign, {}) == f"qemu-system-{foreign}"
    assert emulator(foreign, {"VMLEASE_QEMU": "/my/qemu"}) == f"qemu-system-{foreign}"
    assert emulator(host, {"VMLEASE_QEMU": "/my/qemu"}) == "/my/qemu"
    named = {f"VMLEASE_QEMU_{foreign.upper()}": "/my/other"}
    assert emulator(foreign, named) == "/my/other"
