"""Building as a normal user: what blocks it is named with its fix; sudo's builds
are handed to the user whose cache they are in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.doubles.runner import ScriptedRunner
from vmlease._paths import give_to_sudo_user, sudo_user
from vmlease.backends.guest.images._rootless import NAMESPACE, as_root, blockers, has_subids


def _etc(tmp_path: Path, subuid: str, subgid: str) -> Path:
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text(subgid)
    return tmp_path


def test_root_needs_nothing_and_probes_nothing(tmp_path: Path) -> None:
    runner = ScriptedRunner(1)
    assert blockers(runner, _etc(tmp_path, "", ""), uid=0) == []
    assert runner.calls == []


def test_missing_subordinate_ids_are_named_with_the_usermod_line(tmp_path: Path) -> None:
    runner = ScriptedRunner(0)
    found = blockers(runner, _etc(tmp_path, "someone:100000:65536\n", ""), uid=54321)
    text = "; ".join(map(str, found))
    assert "usermod --add-subuids 100000-165535" in text
    assert "usermod --add-subgids 100000-165535" in text
    assert runner.calls == []  # nothing to probe until the ids are there


def test_a_namespace_the_kernel_refuses_names_the_sysctl(tmp_path: Path) -> None:
    etc = _etc(tmp_path, "54321:100000:65536\n", "54321:100000:65536\n")
    runner = ScriptedRunner(1, "unshare: write failed /proc/self/uid_map: Operation not permitted")
    [blocker] = blockers(runner, etc, uid=54321)
    assert "Operation not permitted" in blocker.what
    assert blocker.fix.startswith("sudo sysctl -w ")
    assert runner.calls == [[*NAMESPACE, "true"]]


def test_a_user_with_ids_and_namespaces_is_not_blocked(tmp_path: Path) -> None:
    etc = _etc(tmp_path, "54321:100000:65536\n", "54321:100000:65536\n")
    assert blockers(ScriptedRunner(0), etc, uid=54321) == []


def test_subordinate_ranges_must_be_whole(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("bob:100000:1000\nbob:bad\n")
    assert not has_subids(tmp_path / "subuid", "bob", 1000)
    assert has_subids(tmp_path / "subuid", "bob", 1000, need=1000)


def test_packing_runs_in_the_namespace_only_for_a_normal_user() -> None:
    argv = as_root(["mke2fs", "-V"])
    if os.geteuid() == 0:
        assert argv[0].endswith("mke2fs")
    else:
        assert argv[: len(NAMESPACE)] == list(NAMESPACE)
    assert argv[-1] == "-V"


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files over needs root")
def test_a_build_under_sudo_in_a_users_cache_is_handed_to_the_user(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 54321, 54321)
    (cache / "images/tiny/b1").mkdir(parents=True)  # made by root, as a build would be
    (cache / "images/tiny/b1/manifest.json").write_text("{}")
    (cache / "images/tiny/current").symlink_to("b1")
    env = {"SUDO_UID": "54321", "SUDO_GID": "54321"}
    assert sudo_user(env) == (54321, 54321)
    give_to_sudo_user(cache / "images", env)
    owners = {p.lstat().st_uid for p in [cache, *cache.rglob("*")]}
    assert owners == {54321}


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files over needs root")
def test_roots_own_cache_is_never_handed_over(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    give_to_sudo_user(tmp_path / "images", {"SUDO_UID": "54321", "SUDO_GID": "54321"})
    assert (tmp_path / "images").stat().st_uid == 0
    assert sudo_user({"SUDO_UID": "0", "SUDO_GID": "0"}) is None
    assert sudo_user({}) is None
