"""Every call of the Python API, on real VMs."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from tests.support.ledger import ledger_of
from vmlease import VMState
from vmlease._naming import validate_name
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu import QemuBackend


def test_create_run_delete(session: vmlease.Session, state: Path) -> None:
    vm = session.create(image="tiny", cpus=1, memory_mb=256)
    assert validate_name(vm.name) == vm.name
    assert vm.state is VMState.READY
    assert session.vms() == [vm]
    r = vm.run(["uname", "-r"])
    assert r.exit_code == 0
    assert r.stdout.strip().endswith("-cloud-amd64")
    assert r.stderr == ""
    assert 0 < r.duration_s < 30
    assert vm.run(["hostname"]).stdout.strip() == vm.name
    assert (state / "qemu" / vm.name / "console.log").is_file()
    vm.delete()
    assert vm.state is VMState.GONE
    assert session.vms() == []
    assert_nothing_left(state)
    ledger = ledger_of(session)
    states = [e.state for e in ledger.events(ledger.records(include_gone=True)[0].id)]
    assert states == [
        VMState.INTENDED,
        VMState.CREATING,
        VMState.READY,
        VMState.DELETING,
        VMState.GONE,
    ]


def test_two_cpus_and_more_memory_are_given(session: vmlease.Session) -> None:
    vm = session.create(cpus=2, memory_mb=384)
    assert vm.run(["nproc"]).stdout.strip() == "2"
    meminfo = vm.run(["cat", "/proc/meminfo"]).stdout
    total_kb = int(meminfo.split()[1])
    assert 300 * 1024 < total_kb <= 384 * 1024


def test_exit_codes_and_check(shared_vm: vmlease.VM) -> None:
    assert shared_vm.run(["sh", "-c", "exit 3"]).exit_code == 3
    with pytest.raises(vmlease.CommandFailed) as info:
        shared_vm.run(["sh", "-c", "echo to-stderr >&2; exit 3"], check=True)
    assert info.value.exit_code == 3
    assert info.value.stderr == "to-stderr\n"
    assert info.value.vm == shared_vm.name
    assert "to-stderr" in str(info.value)


def test_a_missing_command_exits_127_without_hanging(shared_vm: vmlease.VM) -> None:
    r = shared_vm.run(["no-such-command", "--flag"], timeout_s=30)
    assert r.exit_code == 127
    assert "no-such-command" in r.stderr
    with pytest.raises(vmlease.CommandFailed):
        shared_vm.run(["/no/such/path"], check=True, timeout_s=30)
    r = shared_vm.run(["/etc/hostname"], timeout_s=30)  # exists, not executable
    assert r.exit_code == 126


def test_killed_by_signal_is_128_plus_n(shared_vm: vmlease.VM) -> None:
    assert shared_vm.run(["sh", "-c", "kill -TERM $$"]).exit_code == 128 + signal.SIGTERM


def test_binary_stdin_and_output(shared_vm: vmlease.VM) -> None:
    data = bytes(range(256)) * 4096 + b"\0end"
    r = shared_vm.run(["cat"], input=data)
    assert r.stdout_bytes == data
    r = shared_vm.run(["sh", "-c", "printf '\\377\\000x'"])
    assert r.stdout_bytes == b"\xff\x00x"
    assert r.stdout == "\ufffd\x00x"  # text view replaces what is not UTF-8


def test_text_input_env_and_cwd(shared_vm: vmlease.VM) -> None:
    assert shared_vm.run(["cat"], input="héllo").stdout == "héllo"
    r = shared_vm.run(
        ["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi there"}, cwd="/tmp"
    )
    assert r.stdout == "hi there\n/tmp\n"
    r = shared_vm.run(["pwd"], cwd="/no/such/dir")
    assert r.exit_code != 0


def test_a_command_that_ignores_stdin_does_not_hang(shared_vm: vmlease.VM) -> None:
    r = shared_vm.run(["true"], input=os.urandom(2 * 1024 * 1024), timeout_s=60)
    assert r.exit_code == 0


def test_large_output(shared_vm: vmlease.VM) -> None:
    r = shared_vm.run(["sh", "-c", "head -c 5000000 /dev/zero; echo done >&2"])
    assert len(r.stdout_bytes) == 5_000_000
    assert r.stderr == "done\n"


def test_a_timeout_kills_the_command_and_the_vm_stays_usable(shared_vm: vmlease.VM) -> None:
    with pytest.raises(vmlease.CommandTimeout) as info:
        shared_vm.run(["sh", "-c", "echo started; sleep 30"], timeout_s=1)
    assert isinstance(info.value, TimeoutError)
    assert info.value.stdout == "started\n"
    assert shared_vm.run(["echo", "after"]).stdout == "after\n"
    assert "sleep 30" not in shared_vm.run(["ps"]).stdout


def test_background_children_do_not_hold_up_the_result(shared_vm: vmlease.VM) -> None:
    r = shared_vm.run(["sh", "-c", "sleep 60 > /dev/null 2>&1 & echo parent-done"], timeout_s=20)
    assert r.stdout == "parent-done\n"


def test_put_and_get_are_binary_safe_for_large_files(shared_vm: vmlease.VM, tmp_path: Path) -> None:
    data = os.urandom(12 * 1024 * 1024 + 7)
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    local.chmod(0o750)
    shared_vm.put(local, "/tmp/x.bin")
    r = shared_vm.run(["sha256sum", "/tmp/x.bin"])
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert shared_vm.run(["stat", "-c", "%a", "/tmp/x.bin"]).stdout.strip() == "750"
    back = tmp_path / "back.bin"
    shared_vm.get("/tmp/x.bin", back)
    assert back.read_bytes() == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    shared_vm.put(empty, "/tmp/empty")
    shared_vm.get("/tmp/empty", tmp_path / "empty-back")
    assert (tmp_path / "empty-back").read_bytes() == b""
    assert stat.S_ISREG((tmp_path / "empty-back").stat().st_mode)


def test_put_into_a_missing_directory_fails_and_leaves_nothing(
    shared_vm: vmlease.VM, tmp_path: Path
) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"data")
    with pytest.raises(vmlease.GuestFileError, match="/no/such/dir/f"):
        shared_vm.put(local, "/no/such/dir/f")
    with pytest.raises(vmlease.GuestFileError, match="directory"):
        shared_vm.put(local, "/tmp")
    assert shared_vm.run(["ls", "/tmp"]).stdout.count("vmlease-part") == 0


def test_put_does_not_clobber_on_failure_and_get_of_missing_leaves_no_file(
    shared_vm: vmlease.VM, tmp_path: Path
) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"precious")
    with pytest.raises(vmlease.GuestFileError, match="No such file"):
        shared_vm.get("/no/such/file", target)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    with pytest.raises(vmlease.GuestFileError, match="directory"):
        shared_vm.get("/etc", tmp_path / "etc")


def test_stop_start_keeps_the_disk(session: vmlease.Session, state: Path) -> None:
    vm = session.create()
    vm.run(["sh", "-c", "echo kept > /root/marker"], check=True)
    vm.stop()
    assert vm.state is VMState.STOPPED
    assert not list((state / "qemu" / vm.name).glob("*.sock"))
    with pytest.raises(vmlease.VMStateError, match="start"):
        vm.run(["true"])
    vm.start()
    assert vm.state is VMState.READY
    assert vm.run(["cat", "/root/marker"]).stdout == "kept\n"
    vm.stop()
    vm.delete()  # deleting a stopped VM works too
    assert vm.state is VMState.GONE


def test_a_vm_stopped_by_another_process_keeps_what_its_guest_wrote(state: Path) -> None:
    # `vmlease stop`, another xdist worker or a tool's daemon stops VMs it did
    # not start: the guest must still flush its last writes to the disk.
    maker = QemuBackend(state_dir=state)
    maker.create("lifecycle-writes", vmlease.VMSpec())
    maker.wait_ready("lifecycle-writes", 60.0)

    def run(backend: QemuBackend, argv: list[str]) -> vmlease.backends.ExecResult:
        return backend.exec(
            "lifecycle-writes", argv, stdin=None, env=None, cwd=None, timeout_s=30.0
        )

    assert run(maker, ["sh", "-c", "echo kept > /root/marker"]).exit_code == 0
    maker.close()
    other = QemuBackend(state_dir=state)
    try:
        other.stop("lifecycle-writes", 30.0)
        other.start("lifecycle-writes")
        other.wait_ready("lifecycle-writes", 60.0)
        assert run(other, ["cat", "/root/marker"]).stdout == b"kept\n"
    finally:
        other.delete("lifecycle-writes")
        other.close()


def test_leaving_the_block_deletes_every_vm_even_on_error(state: Path) -> None:
    made: list[vmlease.VM] = []

    def failing_test() -> None:
        with vmlease.Session(state_dir=state) as session:
            made.extend([session.create(), session.create()])
            made[1].stop()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_test()
    assert [vm.state for vm in made] == [VMState.GONE, VMState.GONE]
    assert_nothing_left(state)


def test_a_given_name_is_used_and_cannot_be_taken_twice(session: vmlease.Session) -> None:
    vm = session.create(name="test-db")
    assert vm.name == "test-db"
    assert vm.run(["hostname"]).stdout.strip() == "test-db"
    with pytest.raises(vmlease.NameInUse, match="test-db"):
        session.create(name="test-db")
    vm.delete()
    assert session.create(name="test-db").name == "test-db"


def test_a_boot_that_does_not_answer_in_time_is_cleaned_up(state: Path) -> None:
    # A VM started from a booted state answers before create returns: boot this one.
    backend = QemuBackend(state_dir=state, warm_start=False)
    with vmlease.Session(backend=backend, state_dir=state) as session:
        with pytest.raises(vmlease.BootError, match="console") as info:
            session.create(boot_timeout_s=0.05)
        assert "did not answer" in str(info.value)
        [row] = ledger_of(session).records(include_gone=True)
        assert row.state is VMState.GONE
        assert row.error is not None
        assert "BootError" in row.error
    assert_nothing_left(state)


def test_the_image_chooses_the_emulated_cpu_and_the_environment_overrides(
    state: Path, tiny_image: Image
) -> None:
    with vmlease.Session(state_dir=state) as session:
        backend = session.backend
        assert isinstance(backend, QemuBackend)
        if backend.launch_config().accel == "kvm":
            pytest.skip("KVM uses the host CPU; the emulated model does not apply")
        vm = session.create()
        model = vm.run(["grep", "-m1", "model name", "/proc/cpuinfo"]).stdout
        assert tiny_image.tcg_cpu == "qemu64"
        assert "QEMU Virtual CPU" in model
    override = QemuBackend(state_dir=state, env={**os.environ, "VMLEASE_QEMU_CPU": "max"})
    with vmlease.Session(backend=override, state_dir=state) as session:
        vm = session.create()
        model = vm.run(["grep", "-m1", "model name", "/proc/cpuinfo"]).stdout
        assert "QEMU TCG CPU" in model  # what -cpu max calls itself
