"""The qemu backend's side of private networks (``guest/_segments.py``): each VM
directory links to its networks' directories as ``lanN``, so QEMU's path to
its port (a Unix socket, ``-netdev stream``) stays short, and a link is cut
with the human monitor's ``set_link``.
"""

from __future__ import annotations

from pathlib import Path

from vmlease._errors import BackendError
from vmlease.backends.guest._segments import LanOperations
from vmlease.backends.qemu._launch import lan_dir
from vmlease.backends.qemu._processes import monitor_command

__all__ = ["QemuLans"]


class QemuLans(LanOperations):
    """The qemu backend's private-network operations (mixed into it)."""

    def _dir(self, name: str) -> Path:
        raise NotImplementedError

    def _join(
        self, name: str, vm_dir: Path, networks: tuple[str, ...], alias: str | None
    ) -> list[str]:
        """VM ``name`` joins ``networks`` (known there as ``alias`` too): its directory
        links to each one's as ``lanN``; the MACs of its interfaces there."""
        ports = self.lans.join(name, networks, alias=alias)
        for index, port in enumerate(ports):
            (vm_dir / lan_dir(index)).symlink_to(port.network)
        return [port.mac for port in ports]

    def _set_link(self, name: str, index: int, up: bool, timeout_s: float) -> None:
        state = "on" if up else "off"
        outcome = monitor_command(self._dir(name), f"set_link lan{index} {state}", timeout_s)
        if outcome.strip():
            raise BackendError(f"VM {name}: set_link: {outcome.strip()}")
