"""Backend instances by name, made on first use and closed together.

The reaper, the sweep, ``vmlease cleanup`` and ``vmlease ls`` meet rows of
any backend in the ledger; each backend is built once per pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vmlease.backends import _registry
from vmlease.backends._base import Backend

__all__ = ["Backends"]


class Backends:
    """Backend instances by name, made on first use for a state directory.

    ``known`` supplies instances already at hand (a session's own backend),
    so a backend built with special options is used as it is; those are
    not closed by :meth:`close`.
    """

    def __init__(self, state_dir: Path, known: Mapping[str, Backend] | None = None) -> None:
        self._state_dir = state_dir
        self._known = dict(known or {})
        self._made: dict[str, Backend] = {}

    def __call__(self, name: str) -> Backend:
        if name in self._known:
            return self._known[name]
        if name not in self._made:
            self._made[name] = _registry.get(name, state_dir=self._state_dir)
        return self._made[name]

    def close(self) -> None:
        for backend in self._made.values():
            backend.close()
        self._made.clear()
