"""The QEMU backend: the embedded default. No daemon; KVM when it works, TCG otherwise.

One room with its parts:

- ``_backend.py``: ``QemuBackend``, the primitives;
- ``_processes.py``: QEMU processes, their pids and pidfds, the agent channel;
- ``_states.py``: booted states (saving a just-booted guest, starting from it);
- ``_launch.py``: the command line; ``_accel.py``: KVM or TCG;
- ``_qmp.py``: the QMP client; ``_agent.py``: the host side of the guest agent;
- ``images/``: the image recipes, the image cache, the agent's source.
"""

from __future__ import annotations

from vmlease.backends.qemu._backend import QemuBackend

__all__ = ["QemuBackend"]
