"""The QEMU backend: the embedded default. No daemon; KVM when it works, TCG otherwise.

One room with its parts:

- ``_backend.py``: ``QemuBackend``, the primitives;
- ``_processes.py``: QEMU processes, their pids and pidfds, each VM's agent link;
- ``_states.py``: booted states (saving a just-booted guest, starting from it);
- ``_disks.py``, ``_reach.py``: disks and room; ``vm.json``, forwards and SSH;
- ``_launch.py``: the command line; ``_accel.py``: KVM or TCG;
- ``_qmp.py``: the QMP client; ``_preflight.py``: doctor's checks.

The images, the agent protocol and its channel pool are the guest layer's
(``backends/guest``), which the libvirt backend shares.

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
