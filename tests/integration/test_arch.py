"""Guests of another architecture: arm64 VMs emulated on this x86_64 host, and
what each backend does with a spec's ``arch``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import vmlease
from tests.doubles.tools import Double
from vmlease._inventory import inventory
from vmlease._spec import host_arch
from vmlease.backends.guest.images import Image


def test_an_arm64_vm_runs_arm64_programs_and_starts_from_its_booted_state(
    session: vmlease.Session, tiny_arm64_image: Image, state: Path, tmp_path: Path
) -> None:
    first = session.create("tiny", arch="arm64")
    assert first.run(["uname", "-m"], check=True).stdout.strip() == "aarch64"
    assert first.spec.arch == "aarch64"
    started = time.monotonic()
    second = session.create("tiny", arch="aarch64")
    took = time.monotonic() - started
    assert second.run(["uname", "-m"], check=True).stdout.strip() == "aarch64"
    # From the state the first one saved, not a boot of its own (a boot takes seconds).
    assert took < 2.0, f"the second arm64 VM took {took:.2f} s to start"
    rows = {r.record.name: r for r in inventory(state)}
    assert rows[second.name].arch == "aarch64"
    assert rows[second.name].start == "mapped state"

    second.run(["sh", "-c", "echo changed > /root/mark"], check=True)
    second.reset()
    assert second.run(["cat", "/root/mark"]).exit_code != 0
    second.snapshot("base")
    second.run(["sh", "-c", "echo changed > /root/mark"], check=True)
    second.restore("base")
    assert second.run(["cat", "/root/mark"]).exit_code != 0

    data = bytes(range(256)) * 64
    (tmp_path / "in.bin").write_bytes(data)
    second.put(tmp_path / "in.bin", "/srv/data.bin")
    second.get("/srv/data.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data


def test_an_arch_nobody_knows_is_refused_before_anything_is_made(
    session: vmlease.Session, state: Path
) -> None:
    with pytest.raises(vmlease.InvalidSpec, match="arch must be one of x86_64, amd64"):
        session.create("tiny", arch="sparc")
    assert inventory(state, include_gone=True) == []


def test_orbstack_is_given_the_arch_by_debians_name(double: Double, state: Path) -> None:
    with vmlease.Session(backend="orbstack", state_dir=state) as session:
        session.create("debian:bookworm", arch="x86_64")
        [create] = [c for c in double.calls("orbctl") if c[0] == "create"]
        assert create[:3] == ["create", "--arch", "amd64"]


@pytest.mark.parametrize(
    ("backend", "says"),
    [
        ("orbstack", "OrbStack runs arm64 machines only on Apple silicon"),
        ("multipass", "Multipass runs only this machine's architecture (x86_64)"),
    ],
)
def test_an_arch_the_backend_cannot_run_is_refused_before_anything_is_made(
    double: Double, state: Path, backend: str, says: str
) -> None:
    if host_arch() != "x86_64":
        pytest.skip("an x86_64 host refuses arm64 guests on these backends")
    with (
        vmlease.Session(backend=backend, state_dir=state) as session,
        pytest.raises(vmlease.InvalidSpec, match=re.escape(says)),
    ):
        session.create("debian:bookworm" if backend == "orbstack" else "24.04", arch="arm64")
    tool = "orbctl" if backend == "orbstack" else "multipass"
    assert [c for c in double.calls(tool) if c[0] in ("create", "launch")] == []
    assert inventory(state, include_gone=True) == []


@pytest.mark.parametrize(
    ("backend", "image", "tool_image"),
    [
        ("orbstack", "ubuntu:22.04", "ubuntu:jammy"),
        ("orbstack", "fedora-44", "fedora:44"),
        ("multipass", "ubuntu-22.04", "22.04"),
    ],
)
def test_a_catalog_name_means_the_tools_own_image_of_that_release(
    double: Double, state: Path, backend: str, image: str, tool_image: str
) -> None:
    with vmlease.Session(backend=backend, state_dir=state) as session:
        vm = session.create(image)
        assert vm.spec.image == vmlease_name(image)
    tool = "orbctl" if backend == "orbstack" else "multipass"
    [create] = [c for c in double.calls(tool) if c[0] in ("create", "launch")]
    assert tool_image in create


def test_multipass_refuses_a_release_it_has_no_image_of_before_anything_is_made(
    double: Double, state: Path
) -> None:
    with (
        vmlease.Session(backend="multipass", state_dir=state) as session,
        pytest.raises(vmlease.InvalidSpec, match="has no image of Fedora 44"),
    ):
        session.create("fedora-44")
    assert [c for c in double.calls("multipass") if c[0] == "launch"] == []
    assert inventory(state, include_gone=True) == []


def vmlease_name(image: str) -> str:
    return {"ubuntu:22.04": "ubuntu-22.04"}.get(image, image)
