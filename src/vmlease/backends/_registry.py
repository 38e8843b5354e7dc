"""Finding backends: the entry-point group ``vmlease.backends``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmlease._errors import ConfigError
from vmlease.backends._base import Backend

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = ["available", "get"]

_GROUP = "vmlease.backends"


def _entry_points() -> list[EntryPoint]:
    # importlib.metadata costs ~15 ms to import; only a session needs it.
    from importlib.metadata import entry_points

    return list(entry_points(group=_GROUP))


def available() -> list[str]:
    """Names of the installed backends."""
    return sorted({ep.name for ep in _entry_points()})


def get(name: str, **options: Any) -> Backend:
    """A new instance of the backend called ``name``, built with ``options``."""
    found = [ep for ep in _entry_points() if ep.name == name]
    if not found:
        names = ", ".join(available()) or "none"
        raise ConfigError(f"unknown backend {name!r}; installed backends: {names}")
    cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"the entry point for backend {name!r} is not a vmlease Backend")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(
            f"the {name} backend does not take these options: {exc}; "
            f"see the {name} backend's documentation for the ones it takes"
        ) from exc
