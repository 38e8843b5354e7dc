"""The libvirt backend: VMs as domains on libvirt hosts, local or remote.

One room with its parts:

- ``_backend.py``: ``LibvirtBackend``, the primitives;
- ``_leases.py``: leases written, renewed, kept, and swept when they run out;
- ``_agents.py``: the agent over libvirt streams; savevm and loadvm;
- ``_domains.py``: where VMs are, finding and destroying their domains;
- ``_states.py``: booted states on each host; ``_preflight.py``: doctor's checks;
- ``_hosts.py``: connections with keepalive, the storage pool, images
  uploaded once per host by content, placement;
- ``_domain.py``: a VM's domain XML; ``_lease.py``: the ownership it carries;
- ``_stream.py``: a libvirt stream as a socket, for the agent channel.

It uses the guest layer's images and agent protocol (``backends/guest``).
``LibvirtBackend`` loads on first use, and the ``libvirt`` binding only when a
host is used (``pip install 'vmlease[libvirt]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmlease.backends.libvirt._backend import LibvirtBackend

__all__ = ["LibvirtBackend"]


def __getattr__(name: str) -> Any:
    if name != "LibvirtBackend":
        raise AttributeError(f"module 'vmlease.backends.libvirt' has no attribute {name!r}")
    from vmlease.backends.libvirt._backend import LibvirtBackend

    globals()[name] = LibvirtBackend
    return LibvirtBackend
