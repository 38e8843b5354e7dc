"""Test files that pytester runs against a backend (``BACKEND`` is its name)."""

from __future__ import annotations

#: Every fixture of the plugin, once each: 8 tests that pass.
EVERY_FIXTURE = """
import pytest


def test_vm(vm):
    vm.run(["sh", "-c", "echo x > /root/mark"], check=True)


def test_vm_is_clean(vm):
    assert vm.run(["test", "-e", "/root/mark"]).exit_code == 1


def test_worker_vm(worker_vm):
    worker_vm.run(["sh", "-c", "echo y > /root/shared"], check=True)


def test_worker_vm_keeps_state(worker_vm):
    assert worker_vm.run(["cat", "/root/shared"]).stdout == "y\\n"


@pytest.mark.vm(fresh=True, memory_mb=384)
def test_fresh(vm):
    assert vm.run(["echo", "fresh"]).stdout == "fresh\\n"


def test_factory(vm_factory):
    assert vm_factory().run(["echo", "hi"]).stdout == "hi\\n"


def test_pool(vm_pool):
    assert len({v.name for v in vm_pool(2)}) == 2


def test_session(vm_session):
    assert vm_session.backend.name == "BACKEND"
"""
