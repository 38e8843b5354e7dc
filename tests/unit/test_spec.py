from __future__ import annotations

from pathlib import Path

import pytest

from tests.doubles.fakes import FakeBackend
from vmlease import ConfigError, InvalidSpec, Session, VMSpec
from vmlease._spec import Network, debian_arch, host_arch


def test_defaults() -> None:
    spec = VMSpec()
    assert (spec.image, spec.cpus, spec.memory_mb) == ("tiny", 1, 256)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpus", 0, "at least 1"),
        ("cpus", -2, "at least 1"),
        ("cpus", 1.5, "whole number"),
        ("cpus", "2", "whole number"),
        ("cpus", True, "whole number"),
        ("cpus", 100000, "at most"),
        ("memory_mb", 0, "at least 1"),
        ("memory_mb", -256, "at least 1"),
        ("memory_mb", 256.0, "whole number"),
        ("memory_mb", None, "whole number"),
        ("image", "", "non-empty"),
        ("image", None, "non-empty"),
        ("user", "", "user name"),
        ("user", "Root", "user name"),
        ("user", "a b", "user name"),
        ("user", "x;reboot", "user name"),
        ("user", "u" * 33, "user name"),
        ("user", 0, "user name"),
    ],
)
def test_bad_fields_are_rejected_with_the_field_named(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message) as info:
        VMSpec(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_json_round_trip() -> None:
    spec = VMSpec(image="tiny", cpus=2, memory_mb=512, disk_gb=8, user="deploy_1")
    assert VMSpec.from_json(spec.to_json()) == spec


def test_a_request_is_laid_over_the_defaults_and_none_keeps_them() -> None:
    base = VMSpec(image="debian-12", memory_mb=512, network=Network.NONE)
    asked = base.asking({"cpus": 2, "memory_mb": None, "network": "user"})
    assert asked == VMSpec(image="debian-12", cpus=2, memory_mb=512, network=Network.USER)
    assert VMSpec.of(image=None, network="restricted").network is Network.RESTRICTED


def test_a_request_for_a_field_a_vm_does_not_have_names_the_fields_it_has() -> None:
    with pytest.raises(
        InvalidSpec, match="a VM has no colour; it takes alias, arch, cpus, disk_gb, image"
    ):
        VMSpec().asking({"colour": "blue"})
    with pytest.raises(InvalidSpec, match="memory_mb must be at least 1"):
        VMSpec().asking({"memory_mb": 0})


def test_a_session_takes_a_spec_whole_or_by_keywords_not_both(tmp_path: Path) -> None:
    with Session(backend=FakeBackend(), state_dir=tmp_path) as session:
        vm = session.create(spec=VMSpec(cpus=2, memory_mb=300))
        assert (vm.spec.cpus, vm.spec.memory_mb) == (2, 300)
        with pytest.raises(ConfigError, match=r"whole .* or by keywords, not both"):
            session.create(cpus=2, spec=VMSpec())
        with pytest.raises(ConfigError, match="spec must be a VMSpec"):
            session.create(spec={"cpus": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "recorded"),
    [("amd64", "x86_64"), ("x86_64", "x86_64"), ("arm64", "aarch64"), ("AArch64", "aarch64")],
)
def test_an_arch_is_recorded_by_the_kernels_name(given: str, recorded: str) -> None:
    assert VMSpec.of(arch=given).arch == recorded
    assert VMSpec.from_json(VMSpec.of(arch=given).to_json()).arch == recorded


def test_a_spec_without_an_arch_is_this_machines() -> None:
    assert VMSpec().arch == host_arch() == VMSpec.of(arch=None).arch
    # A record written before arch existed is read as this machine's.
    assert VMSpec.from_json('{"image": "tiny", "cpus": 1, "memory_mb": 256}').arch == host_arch()
    assert debian_arch("aarch64") == "arm64"
    assert host_arch("arm64") == "aarch64"


@pytest.mark.parametrize("bad", ["sparc", "", 64, "arm"])
def test_an_unknown_arch_names_the_choices(bad: object) -> None:
    if bad == "":
        assert VMSpec.of(arch=bad).arch == host_arch()
        return
    with pytest.raises(InvalidSpec, match="arch must be one of x86_64, amd64, aarch64, arm64"):
        VMSpec.of(arch=bad)


def test_a_spec_names_the_private_networks_it_joins_and_reads_them_back() -> None:
    spec = VMSpec.of(networks=["lan", "backend-1"])
    assert spec.networks == ("lan", "backend-1")
    assert VMSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("networks", "says"),
    [
        ("lan", "a list of network names"),
        (["LAN"], "cannot name a network"),
        (["lan", "lan"], "twice"),
        (["a", "b", "c", "d", "e"], "at most 4"),
        ([7], "cannot name a network"),
    ],
)
def test_networks_a_spec_cannot_join_are_refused(networks: object, says: str) -> None:
    with pytest.raises(InvalidSpec, match=says):
        VMSpec.of(networks=networks)


def test_a_vm_on_a_network_may_go_by_an_alias_there() -> None:
    spec = VMSpec.of(networks=["lan"], alias="server-1")
    assert spec.alias == "server-1"
    assert VMSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("alias", "networks", "says"),
    [
        ("Server", ["lan"], "alias must be a host name"),
        ("-web", ["lan"], "alias must be a host name"),
        ("web-", ["lan"], "alias must be a host name"),
        ("a" * 64, ["lan"], "alias must be a host name"),
        ("web.lan", ["lan"], "alias must be a host name"),
        (7, ["lan"], "alias must be a host name"),
        ("web", [], "give networks"),
    ],
)
def test_aliases_a_spec_cannot_have_are_refused(alias: object, networks: object, says: str) -> None:
    with pytest.raises(InvalidSpec, match=says):
        VMSpec.of(networks=networks, alias=alias)
