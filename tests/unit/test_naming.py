from __future__ import annotations

import multiprocessing

import pytest

from vmlease import InvalidName
from vmlease._naming import (
    MAX_NAME_LENGTH,
    is_generated,
    new_session_id,
    validate_name,
    vm_name,
)


@pytest.mark.parametrize("name", ["a", "db", "test-db", "vmlease-abc-1", "A1", "x" * 63])
def test_valid_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "-abc", "abc-", "a_b", "a.b", "a b", "ä", "x" * 64, "abc\n"],
)
def test_invalid_names_state_the_rule(name: str) -> None:
    with pytest.raises(InvalidName, match="letters, digits and hyphens"):
        validate_name(name)


def test_non_string_name_is_rejected() -> None:
    with pytest.raises(InvalidName, match="must be a string"):
        validate_name(42)


def test_generated_names_follow_the_rule_even_with_long_parts() -> None:
    sid = new_session_id()
    for prefix in ("vmlease", "p" * 80, "trailing-"):
        for tag in ("", "gw12", "t" * 40):
            name = vm_name(prefix, sid, 123456, tag)
            assert validate_name(name) == name
            assert len(name) <= MAX_NAME_LENGTH
            assert name.endswith("-123456")


def test_generated_names_carry_session_and_counter() -> None:
    assert vm_name("vmlease", "k3x9q2mz0a", 4, "gw1") == "vmlease-k3x9q2mz0a-gw1-4"


def test_generated_names_are_recognised_by_their_session() -> None:
    sid = new_session_id()
    for prefix in ("vmlease", "p" * 80, "my-suite"):
        for tag in ("", "gw3", "t" * 40):
            assert is_generated(vm_name(prefix, sid, 17, tag), sid)
    other = new_session_id()
    assert not is_generated(vm_name("vmlease", sid, 1), other)


@pytest.mark.parametrize(
    "name",
    [
        "test-db",  # chosen by a user
        "vmlease-k3x9q2mz0a",  # no counter
        "vmlease-k3x9q2mz0a-",
        "vmlease-k3x9q2mz0a-gw1-x",
        "k3x9q2mz0a-1",  # no prefix
        "vmlease-xk3x9q2mz0a-1",  # the id inside a longer word
        "vmlease-k3x9q2mz0ax-1",
    ],
)
def test_other_names_are_not_taken_for_generated_ones(name: str) -> None:
    assert not is_generated(name, "k3x9q2mz0a")
    assert not is_generated(name, "")


def _names(n: int) -> list[str]:
    return [vm_name("vmlease", new_session_id(), 1) for _ in range(n)]


def test_session_ids_do_not_collide_across_processes() -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        batches = pool.map(_names, [5000] * 4)
    names = [n for batch in batches for n in batch]
    assert len(set(names)) == len(names)
