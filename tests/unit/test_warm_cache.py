"""Booted-state keys and the cache's publish, discard and prune rules (no QEMU)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from vmlease import ConfigError
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image
from vmlease.backends.qemu import QemuBackend
from vmlease.backends.qemu._launch import Accel, LaunchConfig
from vmlease.backends.qemu._states import WarmCache, warm_key


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


def test_the_key_changes_with_everything_the_saved_guest_depends_on(tmp_path: Path) -> None:
    image = _image(tmp_path)
    spec = VMSpec()
    base = warm_key(CONFIG, spec, image)
    assert warm_key(CONFIG, spec, image) == base
    variants = [
        warm_key(CONFIG, VMSpec(cpus=2), image),
        warm_key(CONFIG, VMSpec(memory_mb=512), image),
        warm_key(dataclasses.replace(CONFIG, accel=Accel.KVM), spec, image),
        warm_key(dataclasses.replace(CONFIG, version="8.0"), spec, image),
        warm_key(dataclasses.replace(CONFIG, tsc_khz=2100000), spec, image),
        warm_key(dataclasses.replace(CONFIG, tcg_cpu="max"), spec, image),
        warm_key(CONFIG, spec, _image(tmp_path, "b2")),
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
