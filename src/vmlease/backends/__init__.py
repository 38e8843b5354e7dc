"""Backends: where VMs come from.

Backends register under the entry-point group ``vmlease.backends``; the
built-in ones register the same way (see ``pyproject.toml``), so a third-party
backend is installed like any plugin and named like a built-in one.
"""

from __future__ import annotations

from vmlease.backends._base import Backend, BackendVM, Capabilities, ExecResult, Fault
from vmlease.backends._cache import Backends
from vmlease.backends._registry import available, get

__all__ = [
    "Backend",
    "BackendVM",
    "Backends",
    "Capabilities",
    "ExecResult",
    "Fault",
    "available",
    "get",
]
