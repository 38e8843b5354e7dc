"""Bad input on real QEMU: a clear error, nothing created, nothing left running."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.ledger import ledger_of, ledger_records
from vmlease import backends
from vmlease._runner import SubprocessRunner
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._accel import probe_kvm

# What each bad input raises, and the words in its message that say what to do.
# ``session`` rows are keyword arguments for Session, ``create`` rows for
# Session.create, ``env`` rows environment variables for a session that
# then creates a VM.
BAD_INPUT: list[tuple[str, str, dict[str, object], type[Exception], str]] = [
    # specs
    (
        "unknown image",
        "create",
        {"image": "no-such-image"},
        vmlease.ImageNotFound,
        "vmlease image build tiny",
    ),
    ("no cpus", "create", {"cpus": 0}, vmlease.InvalidSpec, "cpus must be at least 1"),
    ("half a cpu", "create", {"cpus": 2.5}, vmlease.InvalidSpec, "whole number"),
    (
        "negative memory",
        "create",
        {"memory_mb": -5},
        vmlease.InvalidSpec,
        "memory_mb must be at least 1",
    ),
    ("memory as text", "create", {"memory_mb": "1G"}, vmlease.InvalidSpec, "whole number"),
    ("too little memory", "create", {"memory_mb": 32}, vmlease.InvalidSpec, "at least 96"),
    (
        "negative boot timeout",
        "create",
        {"boot_timeout_s": -1},
        vmlease.ConfigError,
        "positive number",
    ),
    # names
    (
        "name starts with a digit",
        "create",
        {"name": "9lives"},
        vmlease.InvalidName,
        "starting with a letter",
    ),
    (
        "name with a space",
        "create",
        {"name": "has space"},
        vmlease.InvalidName,
        "letters, digits and hyphens",
    ),
    ("name too long", "create", {"name": "a" * 64}, vmlease.InvalidName, "1 to 63 characters"),
    ("name not a string", "create", {"name": 42}, vmlease.InvalidName, "must be a string"),
    ("prefix", "session", {"name_prefix": "-x"}, vmlease.InvalidName, "starting with a letter"),
    ("session id", "session", {"session_id": "Bad Id"}, vmlease.InvalidName, "invalid session id"),
    # options
    (
        "unknown backend",
        "session",
        {"backend": "vmware"},
        vmlease.ConfigError,
        "installed backends: libvirt, multipass, orbstack, qemu",
    ),
    (
        "backend option",
        "session",
        {"backend_options": {"turbo": True}},
        vmlease.ConfigError,
        "does not take these options",
    ),
    (
        "zero boot timeout",
        "session",
        {"boot_timeout_s": 0},
        vmlease.ConfigError,
        "positive number of seconds",
    ),
    (
        "negative lease",
        "session",
        {"max_age_s": -1},
        vmlease.ConfigError,
        "positive number of seconds",
    ),
    ("no VMs allowed", "session", {"max_vms": 0}, vmlease.ConfigError, "at least 1"),
    ("retry as text", "session", {"retry": "fast"}, vmlease.ConfigError, "vmlease.RetryPolicy"),
    # environment
    (
        "accelerator",
        "env",
        {"VMLEASE_QEMU_ACCEL": "warp"},
        vmlease.ConfigError,
        "must be 'kvm' or 'tcg'",
    ),
    (
        "warm start setting",
        "env",
        {"VMLEASE_QEMU_WARM": "sometimes"},
        vmlease.ConfigError,
        "VMLEASE_QEMU_WARM must be 'on' or 'off'",
    ),
    (
        "qemu program",
        "env",
        {"VMLEASE_QEMU": "/nonexistent/qemu"},
        vmlease.BackendUnavailable,
        "apt-get install qemu-system-x86",
    ),
    (
        "cpu model",
        "env",
        {"VMLEASE_QEMU_CPU": "bogus-cpu"},
        vmlease.BackendError,
        "-cpu help` lists",
    ),
    (
        "image directory",
        "env",
        {"VMLEASE_IMAGE_DIR": "/nonexistent/images"},
        vmlease.ImageNotFound,
        "vmlease image build tiny",
    ),
]


@pytest.mark.parametrize(
    ("where", "given", "error", "says"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUT],
)
def test_bad_input_gets_a_clear_error_and_creates_nothing(
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    given: dict[str, object],
    error: type[Exception],
    says: str,
) -> None:
    if where == "env":
        for key, value in given.items():
            monkeypatch.setenv(key, str(value))

    def attempt() -> None:
        session_kwargs = given if where == "session" else {}
        with vmlease.Session(state_dir=state, **session_kwargs) as session:  # type: ignore[arg-type]
            session.create(**(given if where == "create" else {}))  # type: ignore[arg-type]

    with pytest.raises(error, match=re.escape(says)) as info:
        attempt()
    assert isinstance(info.value, vmlease.VMLeaseError)
    assert [r.state for r in ledger_records(state)] in ([], [vmlease.VMState.GONE])
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
    with pytest.raises(vmlease.BackendUnavailable, match="`apt-get install qemu-system-x86`"):
        vmlease.Session(state_dir=state, backend_options=options)  # fails fast, at the start
    assert ledger_records(state) == []
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
        [row] = ledger_of(session).records(include_gone=True)
        assert row.state is vmlease.VMState.GONE
        assert row.error is not None
        assert "no memory" in row.error
    assert_nothing_left(state)


def test_the_kvm_probe_answers_quickly_whatever_kvm_does() -> None:
    start = time.monotonic()
    _works, reason = probe_kvm("qemu-system-x86_64", SubprocessRunner())
    assert time.monotonic() - start < 10
    assert reason


@pytest.mark.parametrize(
    ("backend", "options", "says"),
    [
        ("orbstack", {"arch": "arm64"}, "does not take these options"),
        ("multipass", {"disk_gb": 0}, "disk_gb must be at least 1"),
        ("multipass", {"cloud_init": Path("/nonexistent/user-data")}, "is not a file"),
        ("multipass", {"ram": "1G"}, "does not take these options"),
    ],
)
def test_bad_backend_options_are_refused_before_anything_runs(
    state: Path, backend: str, options: dict[str, object], says: str
) -> None:
    with pytest.raises(vmlease.ConfigError, match=re.escape(says)):
        backends.get(backend, state_dir=state, **options)
    assert not (state / "ledger.sqlite3").exists()
