"""What QEMU's human monitor answers to ``savevm`` and ``loadvm``.

Both QEMU-based backends take and restore snapshots through the human
monitor (QMP has no synchronous equivalent in every QEMU they support):
QEMU's own, or libvirt's ``qemuMonitorCommand``. The answer is empty on
success and a sentence otherwise; this reads it the same way for both.
"""

from __future__ import annotations

from vmlease._errors import BackendError, SnapshotNotFound

__all__ = ["snapshot_outcome"]


def snapshot_outcome(name: str, command: str, said: str) -> None:
    """Raise what ``said``, the monitor's answer to ``command`` in VM ``name``,
    reports: SnapshotNotFound for a tag the VM has not got, BackendError for
    any other failure; nothing when it is empty."""
    said = said.strip()
    if not said:
        return
    if "does not exist" in said or "not found" in said.lower():
        raise SnapshotNotFound(f"VM {name}: {said}")
    raise BackendError(f"VM {name}: {command} failed: {said}")
