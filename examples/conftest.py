"""The example suite's VMs: one vmlease Session for the run, a fresh VM per test.

This is what a project's tests/conftest.py looks like with vmlease instead of
a hand-written create/retry/cleanup helper.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from vmlease._inventory import inventory

INSTALLER = Path(__file__).parent / "installer" / "install.sh"
_SESSIONS: list[vmlease.Session] = []


@pytest.fixture(scope="session")
def vm_session() -> Iterator[vmlease.Session]:
    with vmlease.Session(backend="qemu") as session:
        _SESSIONS.append(session)
        yield session


@pytest.fixture
def vm(vm_session: vmlease.Session) -> Iterator[vmlease.VM]:
    """A fresh tiny VM with the installer copied in; deleted after the test."""
    with vm_session.create(image="tiny", cpus=1, memory_mb=256) as machine:
        machine.put(INSTALLER, "/usr/local/bin/install-hello")
        yield machine


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SESSIONS:
        return
    session = _SESSIONS[0]
    stats = session.stats()
    write = terminalreporter.write_line
    terminalreporter.section("vmlease report")
    boot = stats.ops.get("boot")
    run = stats.ops.get("exec")
    write(f"session {stats.session_id}: {stats.created} VMs created, {stats.deleted} deleted")
    if boot:
        write(f"boot to ready: median {boot.median_s:.2f} s, total {boot.total_s:.1f} s")
    if run:
        write(f"commands: {run.count}, median round trip {run.median_s * 1000:.1f} ms")
    copies = sum(stats.ops[op].count for op in ("put", "get") if op in stats.ops)
    write(f"files copied: {copies}")
    mine = [r for r in inventory(session.state_dir) if r.record.owner.session_id == session.id]
    if mine:
        write(f"LEFT BEHIND: {', '.join(r.record.name for r in mine)}")
    else:
        write("left behind: nothing (vmlease ls shows no VM of this session)")
