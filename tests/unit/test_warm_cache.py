"""Booted-state keys and the cache's publish, discard and prune rules (no QEMU)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from vmlease import BackendError, ConfigError
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image, add_user
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._disks import OWN_BYTES, check_memory
from vmlease.backends.qemu._launch import Accel, LaunchConfig, RamFile, qemu_argv, with_ram
from vmlease.backends.qemu._states import MemoryMode, WarmCache, memory_mode, warm_key


def _image(tmp_path: Path, build_id: str = "b1") -> Image:
    path = tmp_path / "tiny" / build_id
    path.mkdir(parents=True, exist_ok=True)
    return Image(
        name="tiny",
        build_id=build_id,
        path=path,
        kernel=path / "vmlinux",
        initrd=path / "initrd.cpio",
        disk=path / "disk.qcow2",
        cmdline="console=ttyS0",
        min_memory_mb=128,
        tcg_cpu="qemu64",
        size_bytes=0,
        info={},
    )


CONFIG = LaunchConfig(qemu="/usr/bin/qemu", accel=Accel.TCG, tsc_khz=2000000, version="7.2")

M = MemoryMode.MAPPED


def test_the_key_changes_with_everything_the_saved_guest_depends_on(tmp_path: Path) -> None:
    image = _image(tmp_path)
    spec = VMSpec()
    base = warm_key(CONFIG, spec, image, M)
    assert warm_key(CONFIG, spec, image, M) == base
    variants = [
        warm_key(CONFIG, VMSpec(cpus=2), image, M),
        warm_key(CONFIG, VMSpec(memory_mb=512), image, M),
        warm_key(dataclasses.replace(CONFIG, accel=Accel.KVM), spec, image, M),
        warm_key(dataclasses.replace(CONFIG, version="8.0"), spec, image, M),
        warm_key(dataclasses.replace(CONFIG, tsc_khz=2100000), spec, image, M),
        warm_key(dataclasses.replace(CONFIG, tcg_cpu="max"), spec, image, M),
        warm_key(CONFIG, spec, _image(tmp_path, "b2"), M),
        warm_key(CONFIG, spec, image, MemoryMode.STREAM),
    ]
    assert len({base, *variants}) == len(variants) + 1


def _state(cache: WarmCache, key: str, content: bytes) -> Path:
    tmp = cache.begin(key)
    for part in ("state", "disk.qcow2"):
        (tmp / part).write_bytes(content)
    return tmp


def test_a_state_is_found_only_once_committed_and_the_first_commit_wins(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "_warm")
    first = _state(cache, "k", b"first")
    second = _state(cache, "k", b"second")
    assert cache.find("k") is None
    assert cache.commit(first, "k", {"image_path": str(tmp_path)})
    assert not cache.commit(second, "k", {"image_path": str(tmp_path)})
    assert not second.exists()
    found = cache.find("k")
    assert found is not None
    assert found.state.read_bytes() == b"first"
    cache.discard("k")
    assert cache.find("k") is None
    assert list(cache.root.iterdir()) == []


def test_prune_drops_states_of_removed_builds_and_old_leftovers(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "_warm")
    kept_image = _image(tmp_path, "kept")
    gone_image = _image(tmp_path, "gone")
    cache.commit(_state(cache, "kept", b"x"), "kept", {"image_path": str(kept_image.path)})
    cache.commit(_state(cache, "gone", b"x"), "gone", {"image_path": str(gone_image.path)})
    gone_image.path.rmdir()
    fresh_tmp = _state(cache, "writing", b"x")
    old_tmp = _state(cache, "abandoned", b"x")
    os.utime(old_tmp, (0, 0))

    removed = cache.prune()
    assert sorted(r.name for r in removed) == sorted(["gone", old_tmp.name])
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(["kept", fresh_tmp.name])
    assert json.loads((cache.root / "kept" / "meta.json").read_text())["key"] == "kept"


@pytest.mark.parametrize(("setting", "on"), [("on", True), ("off", False), (" OFF ", False)])
def test_the_environment_turns_warm_start_on_and_off(
    tmp_path: Path, setting: str, on: bool
) -> None:
    env = {"VMLEASE_QEMU_WARM": setting}
    backend = QemuBackend(state_dir=tmp_path, image_dir=tmp_path, env=env)
    assert (backend.warm is not None) is on


def test_a_wrong_warm_setting_says_what_it_takes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VMLEASE_QEMU_WARM must be 'on' or 'off'"):
        QemuBackend(state_dir=tmp_path, env={"VMLEASE_QEMU_WARM": "yes"})


def test_a_state_a_vm_lies_on_is_neither_pruned_nor_discarded(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "_warm", keep_per_image=1)
    image = _image(tmp_path, "img")
    meta: dict[str, object] = {"image": "img", "image_path": str(image.path)}
    cache.commit(_state(cache, "used", b"x"), "used", meta)
    cache.commit(_state(cache, "newer", b"x"), "newer", meta)
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    (vm_dir / "vm.json").write_text("{}")
    add_user(cache.root / "used", vm_dir)
    os.utime(cache.root / "used", (0, 0))  # the least recently used of two, one kept
    assert cache.prune(keep_per_image=1) == []
    cache.discard("used")  # would not load: moved aside, kept while the VM runs on it
    [aside] = [p for p in cache.root.iterdir() if p.name.startswith(".used.discard")]
    os.utime(aside, (0, 0))
    assert cache.prune() == []
    (vm_dir / "vm.json").unlink()  # the VM is gone
    assert [p.name for p in cache.prune()] == [aside.name]
    assert not aside.exists()


def test_memory_is_mapped_unless_the_setting_or_an_old_qemu_says_stream() -> None:
    seven = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    assert memory_mode({}, seven)[0] is MemoryMode.MAPPED
    assert memory_mode({}, "QEMU emulator version 10.0.2")[0] is MemoryMode.MAPPED
    mode, why = memory_mode({}, "QEMU emulator version 4.2.1")
    assert mode is MemoryMode.STREAM
    assert "4.2" in why
    assert memory_mode({"VMLEASE_QEMU_MEMORY": " Stream "}, seven)[0] is MemoryMode.STREAM
    with pytest.raises(ConfigError, match="VMLEASE_QEMU_MEMORY must be 'mapped' or 'stream'"):
        memory_mode({"VMLEASE_QEMU_MEMORY": "shared"}, seven)


def test_memory_goes_in_a_file_only_where_asked_and_is_private_to_started_vms(
    tmp_path: Path,
) -> None:
    argv = qemu_argv(CONFIG, Path("/vm"), "n", VMSpec(memory_mb=384), _image(tmp_path))
    assert "memory-backend-ram,id=ram0,size=384M" in argv
    assert with_ram(argv, None) == argv
    booting = with_ram(argv, RamFile(Path("/s/ram"), shared=True))
    started = with_ram(argv, RamFile(Path("/s/ram"), shared=False))
    assert "memory-backend-file,id=ram0,size=384M,mem-path=/s/ram,share=on" in booting
    assert "memory-backend-file,id=ram0,size=384M,mem-path=/s/ram,share=off" in started
    assert len(started) == len(argv)
    assert [a for a in started if "memory-backend-ram" in a] == []


def test_a_vm_of_a_mapped_state_is_charged_the_memory_it_holds_of_its_own() -> None:
    spec = VMSpec(memory_mb=2048)
    check_memory(spec, mapped=True, available=OWN_BYTES)
    check_memory(spec, mapped=True, available=None)  # unknown: not refused
    with pytest.raises(BackendError, match=r"not enough memory .* 2048 MB: .*--vm-max"):
        check_memory(spec, mapped=False, available=OWN_BYTES + 1024 * 2**20)
    check_memory(spec, mapped=False, available=OWN_BYTES + 2048 * 2**20)


def test_each_vms_start_keeps_its_own_phase_times() -> None:
    from vmlease.backends.qemu._starts import Starts

    starts = Starts(None, None, lambda: "qemu-img", None, None)  # type: ignore[arg-type]
    starts.lap("a", "", first=True)
    starts.lap("b", "", first=True)
    starts.lap("a", "kill")
    starts.lap("b", "launch")
    starts.lap("a", "launch")
    assert list(starts.timings("a")) == ["kill", "launch"]
    assert list(starts.timings("b")) == ["launch"]
    starts.forget("a")
    assert starts.timings("a") == {}
