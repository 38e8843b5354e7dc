from __future__ import annotations

import pytest

from vmlease import InvalidSpec, VMSpec


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
