"""What a VM should be: the validated request a session hands a backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from vmlease._errors import InvalidSpec

__all__ = ["MAX_CPUS", "MAX_MEMORY_MB", "VMSpec"]

MAX_CPUS = 256
MAX_MEMORY_MB = 1024 * 1024


def _positive_int(field: str, value: object, maximum: int) -> int:
    # bool is an int subclass: True cpus is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{field} must be a whole number, not {value!r}")
    if value < 1:
        raise InvalidSpec(f"{field} must be at least 1, not {value}")
    if value > maximum:
        raise InvalidSpec(f"{field} must be at most {maximum}, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class VMSpec:
    """A VM request.

    Attributes:
        image: image name as the backend knows it (``tiny`` on QEMU).
        cpus: virtual CPUs.
        memory_mb: memory in MiB.
    """

    image: str = "tiny"
    cpus: int = 1
    memory_mb: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image.strip():
            raise InvalidSpec(f"image must be a non-empty string, not {self.image!r}")
        _positive_int("cpus", self.cpus, MAX_CPUS)
        _positive_int("memory_mb", self.memory_mb, MAX_MEMORY_MB)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VMSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
