"""Starting VMs from a saved booted state, with real QEMU, in both memory modes:
mapped (the default) and stream (the fall back).

Each test gets its own image directory (the tiny image linked in), so its
booted states start empty and are its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.integration.conftest import assert_nothing_left
from vmlease.backends.qemu import QemuBackend


@pytest.fixture(params=["mapped", "stream"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(state: Path, images: Path, mode: str) -> Iterator[QemuBackend]:
    made = QemuBackend(state_dir=state, image_dir=images, env={"VMLEASE_QEMU_MEMORY": mode})
    yield made
    made.close()


def saved_states(images: Path) -> list[Path]:
    return [p for p in (images / "_warm").iterdir() if not p.name.startswith(".")]


def record(state: Path, vm: vmlease.VM) -> dict[str, object]:
    data: dict[str, object] = json.loads((state / "qemu" / vm.name / "vm.json").read_text())
    return data


def random_bytes(vm: vmlease.VM) -> str:
    return vm.run(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).stdout


def test_later_vms_start_from_the_first_ones_booted_state(
    state: Path, images: Path, backend: QemuBackend, mode: str
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        first = session.create()
        [saved] = (images / "_warm").iterdir()
        meta = json.loads((saved / "meta.json").read_text())
        assert meta["saved_from"] == first.name
        # Mapped: its QEMU wrote into the state's memory, so it starts again from the state.
        assert record(state, first).get("warm") == (saved.name if mode == "mapped" else None)
        assert (saved / "ram").is_file() == (mode == "mapped")
        first.run(["sh", "-c", "echo after-save > /root/first"])

        second = session.create()
        assert record(state, second)["warm"] == saved.name
        assert second.run(["hostname"]).stdout.strip() == second.name
        # Its own disk: nothing the first VM wrote after the save, and no sharing back.
        assert second.run(["test", "-e", "/root/first"]).exit_code == 1
        second.run(["sh", "-c", "echo mine > /root/second"], check=True)
        assert first.run(["test", "-e", "/root/second"]).exit_code == 1
        # Today's clock, not the saved one.
        guest_now = int(second.run(["date", "+%s"]).stdout)
        assert abs(guest_now - time.time()) < 5
        # Its console starts with the boot it was saved from, then says so.
        console = session.backend.console_tail(second.name, 200)
        assert f"vmlease: guest {first.name} up" in console
        assert f"vmlease: guest {second.name} up, started from booted state" in console

        third = session.create()
        assert record(state, third)["warm"] == saved.name
        assert random_bytes(second) != random_bytes(third)
    assert_nothing_left(state)


def test_a_started_vm_snapshots_restores_and_reboots_from_its_own_disk(
    state: Path, backend: QemuBackend
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        session.create().delete()  # leaves the booted state behind
        vm = session.create()
        assert "warm" in record(state, vm)
        vm.run(["sh", "-c", "echo kept > /root/kept"], check=True)
        vm.snapshot("clean")
        vm.run(["sh", "-c", "echo later > /root/later"], check=True)
        vm.restore("clean")
        assert vm.run(["test", "-e", "/root/later"]).exit_code == 1
        assert vm.run(["cat", "/root/kept"]).stdout == "kept\n"

        vm.stop()
        vm.start()
        assert vm.run(["cat", "/root/kept"]).stdout == "kept\n"
        assert vm.run(["hostname"]).stdout.strip() == vm.name
    assert_nothing_left(state)


def test_each_restore_gives_the_guest_fresh_randomness(shared_vm: vmlease.VM) -> None:
    shared_vm.snapshot("random")
    seen = set()
    for _ in range(3):
        shared_vm.restore("random")
        seen.add(random_bytes(shared_vm))
    assert len(seen) == 3


def test_a_state_that_does_not_load_is_replaced(
    state: Path, images: Path, backend: QemuBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        session.create().delete()
        [saved] = (images / "_warm").iterdir()
        stream = saved / "state"
        stream.write_bytes(stream.read_bytes()[:4096])

        with caplog.at_level(logging.WARNING, logger="vmlease.qemu"):
            vm = session.create()
        assert "could not start from booted state" in caplog.text
        assert vm.run(["hostname"]).stdout.strip() == vm.name
        [again] = saved_states(images)
        assert json.loads((again / "meta.json").read_text())["saved_from"] == vm.name
        assert session.create().run(["true"]).exit_code == 0
    assert_nothing_left(state)


def test_with_warm_start_off_every_vm_boots(state: Path, images: Path) -> None:
    backend = QemuBackend(state_dir=state, image_dir=images, env={"VMLEASE_QEMU_WARM": "off"})
    with vmlease.Session(backend=backend, state_dir=state) as session:
        for _ in range(2):
            vm = session.create()
            assert "warm" not in record(state, vm)
    assert not (images / "_warm").exists()
    assert_nothing_left(state)


def test_the_shape_of_a_vm_is_part_of_its_state(
    state: Path, images: Path, backend: QemuBackend
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        session.create().delete()
        bigger = session.create(memory_mb=384)
        states = saved_states(images)
        assert len(states) == 2
        saved_from = {json.loads((s / "meta.json").read_text())["saved_from"] for s in states}
        assert bigger.name in saved_from
        total_kb = int(bigger.run(["awk", "/MemTotal/ {print $2}", "/proc/meminfo"]).stdout)
        assert total_kb > 300_000
        again = session.create(memory_mb=384)
        assert "warm" in record(state, again)


def test_a_vm_is_recorded_under_its_build_and_its_saved_state_is_private(
    backend: QemuBackend, state: Path, images: Path
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        vm = session.create()
        build = Path(str(record(state, vm)["image"]))
        users = [link.readlink() for link in (build / ".users").iterdir()]
        assert state / "qemu" / vm.name in users
        [saved] = saved_states(images)
        assert saved.stat().st_mode & 0o777 == 0o700
        for part in saved.iterdir():
            if part.is_file():
                assert part.stat().st_mode & 0o777 == 0o600, part
        assert (saved / "state").is_file()
        vm.delete()
        users = [link.readlink() for link in (build / ".users").iterdir()]
        assert state / "qemu" / vm.name not in users
