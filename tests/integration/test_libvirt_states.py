"""Booted states on libvirt hosts: the first VM of a key on a host boots and is
saved there, later ones start from it, through local and remote URIs, and
keep their autodestroy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import libvirt_cache
from tests.integration.test_libvirt import (
    Runner,
    domains,
    eventually,
    runners,  # noqa: F401 - a fixture
    sessions_vms_are_gone,
    vm_volumes,
)
from tests.support.libvirtd import LibvirtDaemon, missing_tools
from vmlease._spec import VMSpec
from vmlease.backends.libvirt import LibvirtBackend

pytestmark = pytest.mark.timeout(300)
STARTED = "started from booted state"


@pytest.fixture
def fresh_host() -> Iterator[LibvirtDaemon]:
    """A libvirt host of its own: no booted state on it yet."""
    why = missing_tools()
    if why:
        pytest.skip(f"libvirt: {why}")
    daemon = LibvirtDaemon(cache=libvirt_cache()).start()
    yield daemon
    left = daemon.qemu_pids()
    daemon.stop()
    assert not left, f"left behind on the host: qemu pids {left}"


def pool(daemon: LibvirtDaemon) -> Path:
    return daemon.root / "lib" / "vmlease"


def state_volumes(daemon: LibvirtDaemon) -> list[str]:
    found = pool(daemon)
    return sorted(p.name for p in found.iterdir() if p.name.startswith("state-"))


def console(daemon: LibvirtDaemon, name: str) -> str:
    return (pool(daemon) / f"{name}.console").read_text(errors="replace")


def run(backend: LibvirtBackend, name: str, *argv: str) -> str:
    done = backend.exec(name, list(argv), stdin=None, env=None, cwd=None, timeout_s=30)
    assert done.exit_code == 0, done
    return done.stdout.decode()


@contextlib.contextmanager
def libvirt_backend(uri: str, state: Path, **options: object) -> Iterator[LibvirtBackend]:
    """A backend on ``uri``; whatever VMs it still has at the end are deleted."""
    backend = LibvirtBackend(uris=[uri], state_dir=state, **options)  # type: ignore[arg-type]
    try:
        yield backend
    finally:
        for name in backend.leases.held():
            with contextlib.suppress(Exception):
                backend.delete(name)
        backend.close()


def make(backend: LibvirtBackend, name: str) -> None:
    backend.create(name, VMSpec())
    backend.wait_ready(name, 120)


def test_the_first_vm_on_a_host_is_saved_and_later_ones_start_from_it(
    fresh_host: LibvirtDaemon, state: Path
) -> None:
    with libvirt_backend(fresh_host.unix_uri, state) as backend:
        make(backend, "first")
        parts = state_volumes(fresh_host)
        assert [p.rsplit(".", 1)[1] for p in parts] == ["memory", "qcow2", "ready"], parts
        key = parts[0].split("-")[1]
        assert STARTED not in console(fresh_host, "first")
        # The saved VM runs on in an overlay of its own.
        run(backend, "first", "sh", "-c", "echo first > /root/mine && sync")
        make(backend, "second")
        make(backend, "third")
        for name in ("second", "third"):
            assert f"guest {name} up, {STARTED} {key}" in console(fresh_host, name)
            assert run(backend, name, "uname", "-n") == f"{name}\n"
        # A local connection hands QEMU the file itself.
        assert backend.hosts.hosts[0].passes_files is True
        # Each disk is the VM's own.
        run(backend, "second", "sh", "-c", "echo second > /root/mine && sync")
        assert run(backend, "first", "cat", "/root/mine") == "first\n"
        assert run(backend, "second", "cat", "/root/mine") == "second\n"
        assert run(backend, "third", "sh", "-c", "cat /root/mine || echo none") == "none\n"
        # Snapshots work on a VM started from a state.
        backend.snapshot("third", "clean")
        run(backend, "third", "touch", "/root/dirt")
        backend.restore("third", "clean")
        assert run(backend, "third", "sh", "-c", "ls /root/dirt || echo clean").endswith("clean\n")
        for name in ("first", "second", "third"):
            backend.delete(name)
    assert domains(fresh_host.unix_uri) == {}
    assert vm_volumes(fresh_host) == []
    assert state_volumes(fresh_host) == parts  # the state stays for the next run


def test_through_a_remote_uri_the_state_goes_through_a_stream(
    libvirt_daemon: LibvirtDaemon, state: Path
) -> None:
    with libvirt_backend(libvirt_daemon.tcp_uri, state) as backend:
        make(backend, "remote-a")  # saves the state, unless an earlier test did
        make(backend, "remote-b")
        assert STARTED in console(libvirt_daemon, "remote-b")
        assert backend.hosts.hosts[0].passes_files is False
        assert run(backend, "remote-b", "uname", "-n") == "remote-b\n"
        for name in ("remote-a", "remote-b"):
            backend.delete(name)
    assert vm_volumes(libvirt_daemon) == []


def test_a_vm_started_from_a_state_dies_with_its_runner(
    libvirt_daemon: LibvirtDaemon,
    state: Path,
    runners: list[Runner],  # noqa: F811
) -> None:
    with libvirt_backend(libvirt_daemon.unix_uri, state) as backend:
        make(backend, "saved-here")  # a state exists on the host from here on
        backend.delete("saved-here")
    runner = Runner(state, [libvirt_daemon.unix_uri])
    runners.append(runner)
    [name] = runner.names
    assert STARTED in console(libvirt_daemon, name)
    runner.proc.send_signal(signal.SIGKILL)
    took = eventually(sessions_vms_are_gone(libvirt_daemon, runner.names), 10.0)
    print(f"gone {took:.2f} s after SIGKILL")
    eventually(lambda: vm_volumes(libvirt_daemon) == [], 30.0)


def test_a_state_that_cannot_be_loaded_is_dropped_and_the_vm_boots(
    fresh_host: LibvirtDaemon, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with libvirt_backend(fresh_host.unix_uri, state) as backend:
        make(backend, "saver")
        [ready] = [p for p in state_volumes(fresh_host) if p.endswith(".ready")]
        base = ready.removesuffix(".ready")
        key_id = base.removeprefix("state-")
        # This runner's copy of the memory is damaged.
        local = backend.states.cache / f"{key_id}.memory"  # type: ignore[union-attr]
        make(backend, "fetcher")
        assert local.is_file()
        local.write_bytes(local.read_bytes()[: 1 << 20])
        with caplog.at_level(logging.WARNING, logger="vmlease.libvirt"):
            make(backend, "victim")
        assert "could not start from booted state" in caplog.text
        assert STARTED not in console(fresh_host, "victim")
        assert run(backend, "victim", "uname", "-n") == "victim\n"
        assert f"{base}.ready" not in state_volumes(fresh_host)  # no new VM starts from it
        # The next VM boots, and is saved as a new state.
        make(backend, "next")
        assert STARTED not in console(fresh_host, "next")
        assert [p for p in state_volumes(fresh_host) if p.endswith(".ready")] != []
        for name in ("saver", "fetcher", "victim", "next"):
            backend.delete(name)
    assert vm_volumes(fresh_host) == []


def test_a_state_whose_memory_cannot_be_fetched_leaves_the_vm_to_boot(
    fresh_host: LibvirtDaemon, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with libvirt_backend(fresh_host.unix_uri, state) as backend:
        make(backend, "saver")
        [memory] = [p for p in state_volumes(fresh_host) if p.endswith(".memory")]
        with (pool(fresh_host) / memory).open("r+b") as f:
            f.write(b"\0" * 16)  # no longer a libvirt save image
        with caplog.at_level(logging.WARNING, logger="vmlease.libvirt"):
            make(backend, "booted")
        assert "cannot fetch booted state" in caplog.text
        assert STARTED not in console(fresh_host, "booted")
        assert run(backend, "booted", "uname", "-n") == "booted\n"


def test_unfinished_states_are_swept_and_ready_ones_kept(
    fresh_host: LibvirtDaemon, state: Path
) -> None:
    with libvirt_backend(fresh_host.unix_uri, state) as backend:
        make(backend, "keeper")
        backend.delete("keeper")
        kept = state_volumes(fresh_host)
        # What a runner killed while saving leaves: a claim and unready parts.
        dead = ["state-00ff.claim", "state-00ff-dead.qcow2", "state-00ff-dead.memory"]
        for name in dead:
            (pool(fresh_host) / name).write_bytes(b"")
        fresh = "state-11ee-recent.qcow2"  # a save under way elsewhere
        (pool(fresh_host) / fresh).write_bytes(b"")
        an_hour_ago = time.time() - 3600
        for name in dead:
            os.utime(pool(fresh_host) / name, (an_hour_ago, an_hour_ago))
        backend.sweep()
    assert state_volumes(fresh_host) == sorted([*kept, fresh])


def test_image_builds_and_states_unused_for_a_week_are_swept_unless_a_vm_reads_them(
    fresh_host: LibvirtDaemon, state: Path
) -> None:
    week_ago = time.time() - 8 * 86400
    with libvirt_backend(fresh_host.unix_uri, state) as backend:
        make(backend, "saved")
        make(backend, "running")  # started from the state: reads it and the image
        current = sorted(p.name for p in pool(fresh_host).iterdir() if p.name.endswith(".ready"))
        # An older build of the image, and a state of it, last used a week ago.
        old = [f"tiny-0000000000000000dead.{k}" for k in ("qcow2", "vmlinux", "initrd", "ready")]
        old += [f"state-0000dead-00000000.{k}" for k in ("qcow2", "memory", "ready")]
        for name in old:
            (pool(fresh_host) / name).write_bytes(b"1")
        for name in [*old, *current]:
            os.utime(pool(fresh_host) / name, (week_ago, week_ago))
        backend.sweep()
        left = sorted(p.name for p in pool(fresh_host).iterdir())
        assert not set(old) & set(left)
        # Unused for a week too, but "running" reads them: kept.
        assert set(current) <= set(left)
        assert run(backend, "running", "uname", "-n") == "running\n"
        # Each use marks them used again.
        backend.delete("saved")
        make(backend, "again")
        for name in current:
            assert (pool(fresh_host) / name).stat().st_mtime > week_ago + 86400


@pytest.mark.slow
def test_with_warm_start_off_every_vm_boots(fresh_host: LibvirtDaemon, state: Path) -> None:
    with libvirt_backend(fresh_host.unix_uri, state, warm_start=False) as backend:
        make(backend, "cold-a")
        make(backend, "cold-b")
        assert STARTED not in console(fresh_host, "cold-b")
        assert state_volumes(fresh_host) == []
        for name in ("cold-a", "cold-b"):
            backend.delete(name)
