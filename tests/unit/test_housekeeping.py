"""The image cache is governed: what `vmlease image ls` shows and `image prune` removes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmlease.backends.guest.images import add_user, remove_user
from vmlease.backends.guest.images._steps import point_current
from vmlease.backends.qemu._housekeeping import prune, usage
from vmlease.backends.qemu._states import WarmCache
from vmlease.cli import main


def _build(images: Path, build_id: str, *, kernel: str = "k1.deb", age_s: float = 0) -> Path:
    path = images / "tiny" / build_id
    path.mkdir(parents=True)
    manifest = {
        "name": "tiny",
        "build_id": build_id,
        "kernel": "vmlinux",
        "initrd": "initrd.cpio",
        "disk": "disk.qcow2",
        "cmdline": "console=ttyS0",
        "min_memory_mb": 96,
        "info": {"kernel_package": kernel},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "disk.qcow2").write_bytes(b"d" * 4096)
    stamp = 1_000_000 - age_s
    os.utime(path / "manifest.json", (stamp, stamp))
    return path


def _state(images: Path, key: str, build: Path, used_at: float) -> None:
    cache = WarmCache(images / "_warm")
    tmp = cache.begin(key)
    (tmp / "state").write_bytes(b"m" * 8192)
    (tmp / "disk.qcow2").write_bytes(b"d" * 1024)
    assert cache.commit(tmp, key, {"image": "tiny", "image_path": str(build)})
    os.utime(images / "_warm" / key, (used_at, used_at))


def _vm_dir(root: Path, name: str) -> Path:
    vm_dir = root / name
    vm_dir.mkdir(parents=True)
    (vm_dir / "vm.json").write_text("{}")
    return vm_dir


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A cache: an old build a VM still uses, an old unused one, the current one,
    states of each, and downloads."""
    images = tmp_path / "images"
    used_old = _build(images, "old-used", kernel="k0.deb", age_s=200)
    unused_old = _build(images, "old-unused", kernel="kx.deb", age_s=100)
    current = _build(images, "new", kernel="k1.deb")
    point_current(current)
    add_user(used_old, _vm_dir(tmp_path / "qemu", "vm-on-old"))
    gone_vm = _vm_dir(tmp_path / "qemu", "vm-gone")
    add_user(unused_old, gone_vm)
    (gone_vm / "vm.json").unlink()  # deleted without telling the build
    _state(images, "s-old", unused_old, used_at=50)
    for i in range(4):
        _state(images, f"s-new-{i}", current, used_at=100 + i)
    (images / "_downloads").mkdir()
    for deb in ("k0.deb", "k1.deb", "kx.deb"):
        (images / "_downloads" / deb).write_bytes(b"p" * 100)
    return images


def test_prune_removes_what_no_vm_can_use_and_keeps_the_rest(images: Path) -> None:
    removed = prune(images, keep_states_per_image=2)
    got = sorted((r.what, r.name) for r in removed)
    assert got == [
        ("booted state", "s-new-0"),
        ("booted state", "s-new-1"),
        ("booted state", "s-old"),
        ("download", "kx.deb"),
        ("image build", "tiny/old-unused"),
    ]
    assert sorted(p.name for p in (images / "tiny").iterdir()) == ["current", "new", "old-used"]
    assert sorted(p.name for p in (images / "_warm").iterdir()) == ["s-new-2", "s-new-3"]
    assert sorted(p.name for p in (images / "_downloads").iterdir()) == ["k0.deb", "k1.deb"]
    assert prune(images, keep_states_per_image=2) == []


def test_a_dry_run_says_what_would_go_and_removes_nothing(images: Path) -> None:
    before = sorted(str(p) for p in images.rglob("*"))
    assert len(prune(images, dry_run=True, keep_states_per_image=2)) == 5
    assert sorted(str(p) for p in images.rglob("*")) == before


def test_everything_also_removes_current_builds_no_vm_uses(images: Path, tmp_path: Path) -> None:
    names = {r.name for r in prune(images, everything=True)}
    assert "tiny/new" in names
    assert "tiny/old-used" not in names
    remove_user(images / "tiny" / "old-used", tmp_path / "qemu" / "vm-on-old")
    assert "tiny/old-used" in {r.name for r in prune(images, everything=True)}


def test_usage_shows_each_image_its_builds_states_and_vms(images: Path) -> None:
    [tiny] = usage(images)
    assert tiny.current is not None
    assert tiny.current.image.build_id == "new"
    assert [len(b.users) for b in tiny.builds] == [0, 0, 1]  # newest first
    assert len(tiny.states) == 5
    assert tiny.states_bytes == 5 * (8192 + 1024) + sum(
        (images / "_warm" / s.key / "meta.json").stat().st_size for s in tiny.states
    )


def test_the_commands_print_tables_and_json(
    images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(images))
    monkeypatch.setenv("VMLEASE_QEMU_STATES", "2")
    assert main(["image", "ls"]) == 0
    table = capsys.readouterr().out
    assert "SAVED STATES" in table
    assert "5 (" in table
    assert main(["image", "prune", "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] is True
    assert len(data["removed"]) == 5
    assert main(["image", "prune"]) == 0
    assert "freed" in capsys.readouterr().out
    assert main(["image", "ls", "--json"]) == 0
    [tiny] = json.loads(capsys.readouterr().out)["images"]
    assert [b["build_id"] for b in tiny["builds"]] == ["new", "old-used"]
    assert len(tiny["states"]) == 2


def test_a_bad_states_setting_says_what_it_takes(
    images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(images))
    monkeypatch.setenv("VMLEASE_QEMU_STATES", "lots")
    assert main(["image", "prune"]) == 2
    assert "VMLEASE_QEMU_STATES must be a whole number" in capsys.readouterr().err
