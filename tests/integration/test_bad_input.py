"""Bad input on real QEMU: a clear error, nothing created, nothing left running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import vmlease
from vmlease._proc import SubprocessRunner
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._accel import probe_kvm

from .conftest import assert_nothing_left


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"image": "ubuntu-24.04"}, vmlease.ImageNotFound, "images there: tiny"),
        ({"cpus": 0}, vmlease.InvalidSpec, "cpus must be at least 1"),
        ({"cpus": 2.5}, vmlease.InvalidSpec, "whole number"),
        ({"memory_mb": -5}, vmlease.InvalidSpec, "memory_mb must be at least 1"),
        ({"memory_mb": "1G"}, vmlease.InvalidSpec, "whole number"),
        ({"memory_mb": 32}, vmlease.InvalidSpec, "at least 96"),
        ({"name": "9lives"}, vmlease.InvalidName, "starting with a letter"),
        ({"name": "has space"}, vmlease.InvalidName, "letters, digits and hyphens"),
    ],
)
def test_bad_requests_create_nothing(
    session: vmlease.Session,
    state: Path,
    kwargs: dict[str, object],
    error: type[Exception],
    says: str,
) -> None:
    with pytest.raises(error, match=says):
        session.create(**kwargs)  # type: ignore[arg-type]
    assert session.ledger.records(include_gone=True) == []
    assert_nothing_left(state)


def test_an_unknown_image_says_how_to_build_one(session: vmlease.Session) -> None:
    with pytest.raises(vmlease.ImageNotFound) as info:
        session.create(image="nonexistent")
    assert "vmlease image build tiny" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        {"env": {"PATH": "/nonexistent"}},  # a machine without QEMU
        {"qemu_binary": "qemu-system-x86_64-typo"},
    ],
)
def test_a_missing_qemu_binary_gives_the_install_command(
    state: Path, options: dict[str, object]
) -> None:
    with vmlease.Session(state_dir=state, backend_options=options) as session:
        with pytest.raises(vmlease.BackendUnavailable, match="`apt-get install qemu-system-x86`"):
            session.create()
        assert session.ledger.records(include_gone=True) == []
    assert_nothing_left(state)


def test_qemu_failing_to_start_is_recorded_and_cleaned(state: Path, tmp_path: Path) -> None:
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "QEMU emulator version 7.2"; exit 0; }\n'
        'echo "qemu: cannot start: no memory" >&2\n'
        "exit 1\n"
    )
    fake_qemu.chmod(0o755)
    backend = QemuBackend(
        state_dir=state, qemu_binary=str(fake_qemu), env={"VMLEASE_QEMU_ACCEL": "tcg"}
    )
    with vmlease.Session(backend=backend, state_dir=state) as session:
        with pytest.raises(vmlease.BackendError, match="cannot start: no memory"):
            session.create()
        [row] = session.ledger.records(include_gone=True)
        assert row.state is vmlease.VMState.GONE
        assert row.error is not None
        assert "no memory" in row.error
    assert_nothing_left(state)


def test_the_kvm_probe_answers_quickly_whatever_kvm_does() -> None:
    start = time.monotonic()
    _works, reason = probe_kvm("qemu-system-x86_64", SubprocessRunner())
    assert time.monotonic() - start < 10
    assert reason
