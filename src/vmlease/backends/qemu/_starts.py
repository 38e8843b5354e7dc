"""Starting a QEMU VM from a saved booted state, and resetting one to it.

A start from a state is a new QEMU started ``-incoming defer`` that loads the
state and runs; the agent then tells the guest its name, today's time and
fresh randomness, and its private networks if it is on any (``Networks.wake``,
one exchange with the agent). From a mapped state (``_states.py``) the VM's
disk is a copy of the state's empty overlay and its memory the state's file,
mapped copy-on-write, so a start reads almost nothing: that is also how such
a VM is reset (:meth:`Starts.reset`): its QEMU is killed, its disk dropped,
and it starts from the state again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmlease._errors import (
    BackendError,
    BackendTimeout,
    BootError,
    UnsupportedOperation,
    VMLeaseError,
)
from vmlease._runner import Runner
from vmlease.backends.guest._segments import Networks
from vmlease.backends.guest.images import add_user, remove_user
from vmlease.backends.qemu._disks import overlay_for
from vmlease.backends.qemu._launch import CONSOLE_LOG, DISK, RamFile, with_ram
from vmlease.backends.qemu._mapped import publish
from vmlease.backends.qemu._processes import Processes, clear_runtime, kill_all
from vmlease.backends.qemu._reach import read_record, write_record
from vmlease.backends.qemu._states import MemoryMode, WarmCache, WarmState, load_state

__all__ = ["Starts", "state_of"]

log = logging.getLogger("vmlease.qemu")

#: How long the agent may take to answer once a VM runs from a state.
_WAKE_TIMEOUT_S = 10.0


def state_of(record: dict[str, Any]) -> WarmState | None:
    """The mapped state a VM (its ``vm.json``) started from, if it did."""
    if record.get("memory") != MemoryMode.MAPPED or not record.get("state"):
        return None
    path = Path(str(record["state"]))
    return WarmState(path.name, path)


class Starts:
    """Starts from saved states for one backend.

    Args:
        procs: the backend's processes.
        run: runs ``qemu-img``.
        qemu_img: finds ``qemu-img``.
        warm: the saved states (None when warm starts are off).
        lans: the backend's private networks, set at a VM's wake-up.
    """

    def __init__(
        self,
        procs: Processes,
        run: Runner,
        qemu_img: Callable[[], str],
        warm: WarmCache | None,
        lans: Networks,
    ) -> None:
        self._procs = procs
        self._lans = lans
        self._run = run
        self._qemu_img = qemu_img
        self.warm = warm
        # Where each VM's last start (or reset) spent its time, in seconds by phase,
        # in order, and when its last phase ended: each VM its own, since two
        # resets run at once.
        self._timings: dict[str, dict[str, float]] = {}
        self._laps: dict[str, float] = {}

    def lap(self, name: str, phase: str, *, first: bool = False) -> None:
        """Note that ``phase`` of VM ``name``'s start ended now (``first``: it begins)."""
        now = time.perf_counter()
        if first:
            self._timings[name] = {}
        else:
            timings = self._timings.setdefault(name, {})
            timings[phase] = timings.get(phase, 0.0) + now - self._laps.get(name, now)
        self._laps[name] = now

    def timings(self, name: str) -> dict[str, float]:
        """Where VM ``name``'s last start from a state (or reset) spent its time, by
        phase: what ``benchmarks/resets.py`` prints and the debug log says."""
        return dict(self._timings.get(name, {}))

    def forget(self, name: str) -> None:
        self._timings.pop(name, None)
        self._laps.pop(name, None)

    def start(
        self,
        name: str,
        launch: list[str],
        found: WarmState,
        deadline: float,
        *,
        fall_back: bool,
        timed: bool = False,
    ) -> bool:
        """Start VM ``name`` (whose ``vm.json`` is written) from ``found``; ``timed``:
        its ``timings`` go on from a reset's.

        With ``fall_back``, a failure that is the state's (it would not load)
        drops the state and returns False, leaving nothing behind, for the
        caller to boot instead; a launch that timed out (the host's fault) is
        raised either way, for the session to retry.
        """
        vm_dir = self._procs.dir(name)
        mapped = found.mode is MemoryMode.MAPPED
        if not timed:
            self.lap(name, "", first=True)
        try:
            if mapped:
                limit = max(1.0, deadline - time.monotonic())
                overlay = overlay_for(found, self._run, self._qemu_img(), limit)
                shutil.copyfile(overlay, vm_dir / DISK)
                add_user(found.path, vm_dir)  # no prune removes the state under this disk
            else:
                shutil.copyfile(found.disk, vm_dir / DISK)
            if not (vm_dir / CONSOLE_LOG).exists():  # a reset appends to its own
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(found.console, vm_dir / CONSOLE_LOG)
            argv = with_ram(launch, RamFile(found.ram, shared=False) if mapped else None)
            self.lap(name, "disk")
            self._procs.launch(
                name,
                [*argv, "-incoming", "defer"],
                max(1.0, deadline - time.monotonic()),
                qemu=argv[0],
            )
            self.lap(name, "launch")
            live = self._procs.attach(name)
            with live.lock:
                load_state(vm_dir, name, found, deadline)
                self.lap(name, "load")
                channel = self._procs.channel(name, live, max(1.0, deadline - time.monotonic()))
                self.lap(name, "connect")
                self._lans.wake(name, found.key, channel, _WAKE_TIMEOUT_S)
                self.lap(name, "wake")
        except BackendTimeout:
            raise
        except (VMLeaseError, OSError) as exc:
            if not fall_back:
                self._stop(name)
                raise BackendError(
                    f"VM {name} could not start from its booted state {found.path}: {exc}"
                ) from exc
            log.warning(
                "VM %s could not start from booted state %s (%s); booting it instead "
                "and saving a new state",
                name,
                found.path,
                exc,
            )
            remove_user(found.path, vm_dir)  # before the discard moves the state aside
            if self.warm is not None:
                self.warm.discard(found.key)
            self._stop(name)
            (vm_dir / DISK).unlink(missing_ok=True)
            (vm_dir / CONSOLE_LOG).unlink(missing_ok=True)
            return False
        record = read_record(vm_dir)
        record.update(warm=found.key, memory=str(found.mode), state=str(found.path))
        record.pop("boot_ram", None)
        record.pop("grown", None)  # the disk is the state's size again
        write_record(vm_dir, record)
        if self.warm is not None:
            self.warm.touch(found.key)  # the least recently used states go first
        return True

    def publish(
        self, name: str, key: str, ram: RamFile, meta: dict[str, object], deadline: float
    ) -> WarmState:
        """VM ``name`` booted on ``ram`` and its devices' state is written (see
        ``_mapped.py``): end its QEMU, which would go on writing into the state's
        memory, publish the state as ``key`` (``meta`` for its ``meta.json``), and
        start the VM from it like any later VM. Returns the state."""
        if self.warm is None:
            raise BackendError("warm starts are off: there is no saved state to publish")
        vm_dir = self._procs.dir(name)
        self._stop(name)
        publish(self.warm, ram, key, vm_dir, meta)
        found = self.warm.find(key)
        if found is None:
            raise BootError(f"VM {name}: its booted state {key} was saved but cannot be found")
        self.start(name, list(read_record(vm_dir)["argv"]), found, deadline, fall_back=False)
        return found

    def reset(self, name: str, deadline: float) -> WarmState:
        """Kill VM ``name``'s QEMU, drop its disk, and start it from its mapped state
        again; returns that state.

        UnsupportedOperation if it did not start from one (it was booted, or its
        state is a stream): then a snapshot is the way back.
        """
        vm_dir = self._procs.dir(name)
        record = read_record(vm_dir)
        found = state_of(record)
        if found is None:
            why = (
                "its saved booted state holds memory as a stream"
                if record.get("warm")
                else "it was booted, not started from a saved booted state"
            )
            raise UnsupportedOperation(
                f"VM {name} cannot be reset by a new start: {why}; use a snapshot "
                "(vm.snapshot() after it is made, vm.restore() to go back)"
            )
        if not found.ram.is_file():
            raise BackendError(f"VM {name} cannot be reset: its booted state {found.path} is gone")
        self.lap(name, "", first=True)
        self._stop(name)
        (vm_dir / DISK).unlink(missing_ok=True)
        self.lap(name, "kill")
        self.start(name, list(record["argv"]), found, deadline, fall_back=False, timed=True)
        return found

    def _stop(self, name: str) -> None:
        """End VM ``name``'s QEMU at once (its disk is disposable) and forget it."""
        self._procs.forget(name)
        vm_dir = self._procs.dir(name)
        kill_all(vm_dir)
        clear_runtime(vm_dir)
