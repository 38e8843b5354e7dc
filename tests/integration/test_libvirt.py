"""The libvirt backend on private libvirt hosts of this machine, as if they were several.

Each host is a libvirtd in its own mount namespace (tests/support/libvirtd.py),
reached through its Unix socket, ``qemu+tcp://127.0.0.1`` and ``qemu+ssh://``
through a throwaway sshd. Runners are separate processes, killed or frozen
the way CI runners die.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import libvirt_cache
from tests.support.libvirtd import LibvirtDaemon, SSHGate, destroy_domain, foreign_domain
from tests.support.suites import EVERY_FIXTURE
from tests.support.visitors import check_side_by_side
from vmlease._checks import Severity
from vmlease._cleanup import cleanup
from vmlease._doctor import doctor
from vmlease._errors import BackendUnavailable, ChannelError, VMNotFound
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image
from vmlease.backends.libvirt import LibvirtBackend

pytestmark = pytest.mark.timeout(300)
RUNNER = Path(__file__).parents[1] / "support" / "libvirt_runner.py"


def domains(uri: str) -> dict[str, bool]:
    """Every domain on the host at ``uri``: name -> whether it carries vmlease's lease."""
    import libvirt

    from vmlease.backends.libvirt._lease import NAMESPACE

    conn = libvirt.open(uri)
    try:
        found = {}
        for dom in conn.listAllDomains(0):
            try:
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
                found[dom.name()] = True
            except libvirt.libvirtError:
                found[dom.name()] = False
        return found
    finally:
        conn.close()


def vm_volumes(daemon: LibvirtDaemon) -> list[str]:
    """The VM volumes (disk overlays, console logs, saved states) in the host's pool."""
    pool = daemon.root / "lib" / "vmlease"
    if not pool.is_dir():
        return []
    return sorted(
        p.name for p in pool.iterdir() if p.name.endswith((".disk.qcow2", ".console", ".save"))
    )


def eventually(check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``check()`` holds; AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s")
        time.sleep(0.1)
    return time.monotonic() - start


class Runner:
    """A runner process with a session on some libvirt hosts."""

    def __init__(self, state: Path, uris: list[str], *args: str) -> None:
        argv = [sys.executable, str(RUNNER), str(state)]
        for uri in uris:
            argv += ["--uri", uri]
        self.proc = subprocess.Popen(
            [*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise AssertionError(f"runner failed: {line} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.names = line.split()[1:]

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for runner in made:
        runner.end()


@pytest.fixture
def second_host(libvirt_daemon: LibvirtDaemon) -> Iterator[LibvirtDaemon]:
    daemon = LibvirtDaemon(cache=libvirt_cache()).start()
    yield daemon
    left = daemon.qemu_pids()
    daemon.stop()
    assert not left, f"left behind on the second host: qemu pids {left}"


def sessions_vms_are_gone(daemon: LibvirtDaemon, names: list[str]) -> Callable[[], bool]:
    def gone() -> bool:
        present = domains(daemon.unix_uri)
        return not any(name in present for name in names)

    return gone


# -- the plugin, through each kind of URI -------------------------------------


@pytest.mark.parametrize("transport", ["tcp", pytest.param("ssh", marks=pytest.mark.slow)])
def test_every_fixture_works_through_a_remote_uri(
    libvirt_daemon: LibvirtDaemon,
    state: Path,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tiny_image: Image,
    transport: str,
) -> None:
    uri = libvirt_daemon.tcp_uri if transport == "tcp" else request.getfixturevalue("ssh_gate").uri
    monkeypatch.setenv("VMLEASE_STATE_DIR", str(state))
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(tiny_image.path.parent.parent))
    for name in ("VMLEASE_KEEP", "VMLEASE_IMAGE", "VMLEASE_BACKEND", "VMLEASE_MAX", "VMLEASE_ARCH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VMLEASE_LIBVIRT_URIS", raising=False)
    pytester.makepyfile(EVERY_FIXTURE.replace("BACKEND", "libvirt"))
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "faulthandler_timeout=120",
        "--vm-backend=libvirt",
        f"--vm-libvirt-uris={uri}",
        timeout=240,
    )
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*nothing left behind*"])
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []


# -- hosts and placement ---------------------------------------------------------


def test_vms_spread_over_hosts_by_free_memory_and_a_silent_host_is_skipped(
    libvirt_daemon: LibvirtDaemon,
    second_host: LibvirtDaemon,
    state: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    silent = "qemu+tcp://127.0.0.1:1/system"  # nothing listens there
    uris = [silent, libvirt_daemon.tcp_uri, second_host.tcp_uri]
    with (
        caplog.at_level(logging.WARNING, logger="vmlease.libvirt"),
        vmlease.Session(
            backend="libvirt", state_dir=state, backend_options={"uris": uris}
        ) as session,
    ):
        vms = [session.create(), session.create()]
        for vm in vms:
            assert vm.run(["echo", "up"]).stdout == "up\n"
        on_first = domains(libvirt_daemon.unix_uri)
        on_second = domains(second_host.unix_uri)
        # The memory the first VM took is no longer free there: the second goes elsewhere.
        assert (len(on_first), len(on_second)) == (1, 1), (on_first, on_second)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(silent in w and "skipping it" in w for w in warnings), warnings
    assert domains(libvirt_daemon.unix_uri) == domains(second_host.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == vm_volumes(second_host) == []


def test_a_run_fails_clearly_when_no_host_answers(state: Path) -> None:
    uris = ["qemu+tcp://127.0.0.1:1/system", "qemu+tcp://127.0.0.1:2/system"]
    started = time.monotonic()
    with (
        vmlease.Session(
            backend="libvirt", state_dir=state, backend_options={"uris": uris}
        ) as session,
        pytest.raises(BackendUnavailable, match="no libvirt host answers") as info,
    ):
        session.create()
    assert time.monotonic() - started < 30
    assert "127.0.0.1:1" in str(info.value)
    assert "127.0.0.1:2" in str(info.value)
    assert "VMLEASE_LIBVIRT_URIS" in str(info.value)


def test_doctor_checks_each_host(
    libvirt_daemon: LibvirtDaemon, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = "qemu+tcp://127.0.0.1:1/system"
    monkeypatch.setenv("VMLEASE_LIBVIRT_URIS", f"{libvirt_daemon.tcp_uri},{silent}")
    by_name = {c.name: c for c in doctor(state, "libvirt")}
    reach = by_name[f"libvirt: {libvirt_daemon.tcp_uri}"]
    assert reach.status is Severity.OK
    assert "QEMU driver" in reach.message
    assert by_name[f"libvirt: {libvirt_daemon.tcp_uri} kvm"].status in (Severity.OK, Severity.WARN)
    room = by_name[f"libvirt: {libvirt_daemon.tcp_uri} room"]
    assert "memory free" in room.message
    assert "pool vmlease" in room.message
    assert by_name[f"libvirt: {silent}"].status is Severity.FAIL
    assert by_name["libvirt: hosts"].message.startswith("1 of 2 hosts answer")


# -- ownership that outlives any one runner ----------------------------------


@pytest.mark.parametrize("transport", ["unix", "ssh"])
def test_a_killed_runners_vms_are_gone_within_10_s(
    libvirt_daemon: LibvirtDaemon,
    state: Path,
    runners: list[Runner],
    request: pytest.FixtureRequest,
    transport: str,
) -> None:
    uri = (
        libvirt_daemon.unix_uri if transport == "unix" else request.getfixturevalue("ssh_gate").uri
    )
    runner = Runner(state, [uri], "--count", "2")
    runners.append(runner)
    assert set(runner.names) <= set(domains(libvirt_daemon.unix_uri))
    runner.proc.send_signal(signal.SIGKILL)
    took = eventually(sessions_vms_are_gone(libvirt_daemon, runner.names), 10.0)
    print(f"gone {took:.2f} s after SIGKILL ({transport})")
    # Their disks go too: the runner host's reaper deletes what its ledger holds.
    eventually(lambda: vm_volumes(libvirt_daemon) == [], 30.0)


def test_a_frozen_runners_vms_are_gone_within_the_keepalive_bound(
    libvirt_daemon: LibvirtDaemon, state: Path, runners: list[Runner]
) -> None:
    runner = Runner(state, [libvirt_daemon.tcp_uri])
    runners.append(runner)
    runner.proc.send_signal(signal.SIGSTOP)
    interval, count = libvirt_daemon.keepalive
    bound = interval * (count + 1) + 5.0
    took = eventually(sessions_vms_are_gone(libvirt_daemon, runner.names), bound)
    print(f"gone {took:.2f} s after SIGSTOP (bound {bound:g} s)")
    runner.proc.send_signal(signal.SIGKILL)
    eventually(lambda: vm_volumes(libvirt_daemon) == [], 30.0)


def test_a_libvirtd_restart_fails_the_vm_clearly_and_the_session_carries_on(
    libvirt_daemon: LibvirtDaemon, state: Path
) -> None:
    with vmlease.Session(
        backend="libvirt", state_dir=state, backend_options={"uris": [libvirt_daemon.unix_uri]}
    ) as session:
        before = session.create()
        before.run(["true"], check=True)
        libvirt_daemon.restart()
        # libvirtd ends its clients' autodestroy domains when it stops; stopped
        # quickly enough, it has not yet, and its successor takes the running QEMU
        # back. Either way the first command after says so clearly, and a VM that
        # survived answers again on a new channel.
        said = ""
        try:
            before.run(["true"])
        except ChannelError as exc:
            said = str(exc)
        if "is gone" not in said:
            assert said == "" or "closed the channel" in said, said
            assert before.run(["echo", "still"]).stdout == "still\n"
        after = session.create()  # a new connection, a new VM
        assert after.run(["echo", "again"]).stdout == "again\n"
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []


def test_a_long_exec_and_the_owners_commands_run_side_by_side_under_libvirt(
    libvirt_daemon: LibvirtDaemon, state: Path
) -> None:
    uri = libvirt_daemon.unix_uri
    with vmlease.Session(
        backend="libvirt", state_dir=state, backend_options={"uris": [uri]}
    ) as session:
        check_side_by_side(session.create(), state, {"VMLEASE_LIBVIRT_URIS": uri})
    assert domains(uri) == {}


def test_a_stopped_libvirtd_ends_each_operation_at_its_deadline(
    libvirt_daemon: LibvirtDaemon, state: Path
) -> None:
    """libvirtd stopped (SIGSTOP) for less than its keepalive's bound: a command,
    a snapshot and a listing each fail at their deadline, naming the operation;
    once it goes on, so does the VM, and nothing is left."""
    uri = libvirt_daemon.unix_uri
    policy = vmlease.RetryPolicy(attempts=1, timeouts=vmlease.Timeouts(snapshot_s=2, list_s=2))
    with vmlease.Session(
        backend="libvirt", state_dir=state, backend_options={"uris": [uri]}, retry=policy
    ) as session:
        vm = session.create()
        vm.run(["true"], check=True)
        pid = libvirt_daemon.libvirtd_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(vmlease.ChannelError, match=rf"VM {vm.name}: command \['true'\]"):
                vm.run(["true"], timeout_s=3)
            took = time.monotonic() - started
            assert took < 5, f"{took:.1f} s"
            with pytest.raises(vmlease.BackendTimeout, match=f"VM {vm.name}: savevm"):
                vm.snapshot("s")
            with pytest.raises(vmlease.BackendTimeout, match="listing VMs"):
                session.backend.list(timeout_s=2)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert vm.run(["echo", "back"]).stdout == "back\n"
    assert domains(uri) == {}
    assert vm_volumes(libvirt_daemon) == []


def test_kept_vms_outlive_their_runner_until_the_lease_and_another_runner_reaps_them(
    libvirt_daemon: LibvirtDaemon,
    libvirt_uri: str,
    state: Path,
    state_root: Path,
    runners: list[Runner],
) -> None:
    runner = Runner(state, [libvirt_daemon.unix_uri], "--keep", "--max-age", "12")
    runners.append(runner)
    assert runner.proc.wait(60) == 0
    [name] = runner.names
    # The runner is gone; its kept VM runs on (no autodestroy), still answering.
    time.sleep(2)
    assert domains(libvirt_daemon.unix_uri) == {name: True}
    other = LibvirtBackend(uris=[libvirt_daemon.tcp_uri], state_dir=state_root / "other-runner")
    try:
        done = other.exec(name, ["echo", "kept"], stdin=None, env=None, cwd=None, timeout_s=10)
        assert done.stdout == b"kept\n"
        assert other.sweep() == []  # within its lease: left alone
        eventually(lambda: other.sweep(dry_run=True) == [name], 30.0)
    finally:
        other.close()
    # Another runner, with a ledger of its own that never heard of the VM, reaps it:
    # `vmlease cleanup --backend libvirt` says what it would delete, then does.
    env = {**os.environ, "VMLEASE_STATE_DIR": str(state_root / "other-runner")}
    said = subprocess.run(
        [sys.executable, "-m", "vmlease", "cleanup", "--backend", "libvirt", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert said.returncode == 0, said.stderr
    assert [(r["name"], r["action"]) for r in json.loads(said.stdout)["results"]] == [
        (name, "would delete")
    ]
    assert domains(libvirt_daemon.unix_uri) == {name: True}
    outcomes = cleanup(state_root / "other-runner", sweep=["libvirt"])
    assert [(o.name, o.action) for o in outcomes] == [(name, "deleted")]
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []
    # The first runner's own cleanup finds its row's VM gone.
    [mine] = cleanup(state)
    assert (mine.name, mine.action) == (name, "already gone")


def test_two_runners_racing_to_reap_one_domain_both_succeed(
    libvirt_daemon: LibvirtDaemon, state: Path, state_root: Path, runners: list[Runner]
) -> None:
    runner = Runner(state, [libvirt_daemon.unix_uri], "--keep", "--max-age", "3")
    runners.append(runner)
    assert runner.proc.wait(60) == 0
    time.sleep(3.5)
    reapers = [
        LibvirtBackend(uris=[libvirt_daemon.unix_uri], state_dir=state_root / f"reaper-{i}")
        for i in range(2)
    ]
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def reap(backend: LibvirtBackend) -> None:
        try:
            results.append(backend.sweep())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reap, args=(b,)) for b in reapers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for backend in reapers:
        backend.close()
    assert errors == []
    # Each domain was destroyed by exactly one of them; the other found it gone.
    assert sorted(name for found in results for name in found) == sorted(runner.names)
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []
    cleanup(state)


def test_a_foreign_domain_named_like_ours_is_never_touched(
    libvirt_daemon: LibvirtDaemon, libvirt_uri: str, state: Path, tiny_image: Image
) -> None:
    uri = libvirt_daemon.unix_uri
    name = "vmlease-zzzzzzzzzz-1"
    foreign_domain(uri, name, tiny_image.kernel, tiny_image.initrd)
    try:
        backend = LibvirtBackend(uris=[uri], state_dir=state)
        try:
            assert backend.sweep() == []
            with pytest.raises(vmlease.VMNotFound, match="not one vmlease made"):
                backend.delete(name)
            with pytest.raises(vmlease.VMNotFound, match="not one vmlease made"):
                backend.snapshot(name, "x")
            assert backend.identity(name) == ""
        finally:
            backend.close()
        assert cleanup(state, sweep=["libvirt"]) == []
        assert domains(uri) == {name: False}
    finally:
        destroy_domain(uri, name)


def test_images_are_uploaded_once_per_host(libvirt_daemon: LibvirtDaemon, state: Path) -> None:
    backend = LibvirtBackend(uris=[libvirt_daemon.unix_uri], state_dir=state)
    try:
        backend.create("upload-a", VMSpec())
        pool = libvirt_daemon.root / "lib" / "vmlease"
        bases = sorted(p.name for p in pool.iterdir() if p.name.startswith("tiny-"))
        assert {b.rsplit(".", 1)[1] for b in bases} == {"qcow2", "vmlinux", "initrd", "ready"}
        files = [b for b in bases if not b.endswith(".ready")]  # .ready is marked at each use
        mtimes = [(pool / b).stat().st_mtime_ns for b in files]
        backend.create("upload-b", VMSpec())
        assert sorted(p.name for p in pool.iterdir() if p.name.startswith("tiny-")) == bases
        assert [(pool / b).stat().st_mtime_ns for b in files] == mtimes
        for name in ("upload-a", "upload-b"):
            backend.wait_ready(name, 60)
    finally:
        for name in ("upload-a", "upload-b"):
            with contextlib.suppress(VMNotFound):
                backend.delete(name)
        backend.close()
    assert vm_volumes(libvirt_daemon) == []


def test_ssh_gate_is_real(ssh_gate: SSHGate) -> None:
    """The qemu+ssh tests go through sshd, not around it."""
    done = subprocess.run(
        [
            str(ssh_gate.root / "ssh"),
            "-i",
            str(ssh_gate.key),
            "-p",
            str(ssh_gate.port),
            "root@127.0.0.1",
            "echo",
            "through-sshd",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == "through-sshd", done.stderr


def test_a_debian_guest_runs_systemd_and_reaches_the_archive_under_libvirt(
    libvirt_daemon: LibvirtDaemon, state: Path, debian_image: Image
) -> None:
    backend_options = {"uris": [libvirt_daemon.tcp_uri]}
    with vmlease.Session(backend="libvirt", state_dir=state, backend_options=backend_options) as s:
        vm = s.create(image="debian-12", memory_mb=512)
        assert vm.run(["systemctl", "is-system-running"]).stdout.strip() in ("running", "degraded")
        assert vm.run(["hostname"]).stdout.strip() == vm.name
        # User-mode networking: the guest resolves the archive through the host.
        assert vm.run(["getent", "hosts", "deb.debian.org"]).exit_code == 0
        vm.snapshot("clean")
        vm.run(["touch", "/root/made"], check=True)
        vm.restore("clean")
        assert vm.run(["test", "-e", "/root/made"]).exit_code == 1
        # The first Debian VM on the host was saved; the next starts from it, up.
        again = s.create(image="debian-12", memory_mb=512)
        assert "started from booted state" in again.console_tail(200)
        assert again.run(["hostname"]).stdout.strip() == again.name
        assert again.run(["systemctl", "is-active", "ssh"]).stdout.strip() == "active"
        assert again.run(["getent", "hosts", "deb.debian.org"]).exit_code == 0
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []


def test_an_arm64_guest_runs_emulated_under_libvirt(
    libvirt_daemon: LibvirtDaemon, state: Path, tiny_arm64_image: Image
) -> None:
    backend_options = {"uris": [libvirt_daemon.unix_uri]}
    with vmlease.Session(backend="libvirt", state_dir=state, backend_options=backend_options) as s:
        vm = s.create(image="tiny", arch="arm64")
        assert vm.run(["uname", "-m"]).stdout.strip() == "aarch64"
        vm.snapshot("clean")
        vm.run(["touch", "/root/made"], check=True)
        vm.restore("clean")
        assert vm.run(["test", "-e", "/root/made"]).exit_code == 1
        again = s.create(image="tiny", arch="arm64")
        assert again.run(["uname", "-m"]).stdout.strip() == "aarch64"
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []
