"""The QEMU backend: the embedded default. No daemon; KVM when it works, TCG otherwise.

One room with its parts:

- ``_backend.py``: ``QemuBackend``, the primitives;
- ``_processes.py``: QEMU processes, their pids and pidfds, the agent channel;
- ``_states.py``: booted states (saving a just-booted guest, starting from it);
- ``_launch.py``: the command line; ``_accel.py``: KVM or TCG;
- ``_qmp.py``: the QMP client; ``_agent.py``: the host side of the guest agent;
- ``images/``: the image recipes, the image cache, the agent's source.

``QemuBackend`` loads on first use, so the command line can list and build
images without loading the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmlease.backends.qemu._backend import QemuBackend

__all__ = ["QemuBackend"]


def __getattr__(name: str) -> Any:
    if name != "QemuBackend":
        raise AttributeError(f"module 'vmlease.backends.qemu' has no attribute {name!r}")
    from vmlease.backends.qemu._backend import QemuBackend

    globals()[name] = QemuBackend
    return QemuBackend
