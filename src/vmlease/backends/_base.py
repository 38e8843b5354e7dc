"""The backend contract: primitives a VM provider implements.

A backend knows how to create, start, stop, delete, list, run commands and
copy files. It does not retry, write the ledger, poll or time anything: the
session does that once for every backend. Optional operations are declared in
:class:`Capabilities`; an undeclared one raises UnsupportedOperation.

All times are in seconds.
"""

from __future__ import annotations

import abc
import builtins
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmlease._checks import Check
from vmlease._errors import BackendError, UnsupportedOperation
from vmlease._identity import Owner
from vmlease._naming import validate_name
from vmlease._spec import VMSpec
from vmlease._ssh import SSHInfo
from vmlease._timeouts import DEFAULT

__all__ = ["Backend", "BackendVM", "Capabilities", "ExecResult", "Fault", "Retry"]

#: Runs one attempt (and those after it, while they fail transiently) under a
#: session's retry policy: how a backend's own retryable steps are retried.
Retry = Callable[[Callable[[], Any]], Any]


class Fault(enum.Enum):
    """How a backend judges a failure."""

    TRANSIENT = "transient"  # trying again may work, and is safe
    PERMANENT = "permanent"  # surface it at once


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers beyond the required primitives."""

    #: ``snapshot`` and ``restore`` work; without them the ``vm`` fixture
    #: gives each test a fresh VM instead of restoring one.
    snapshots: bool = False
    #: ``reset`` works for some of the backend's VMs (``can_reset`` says which):
    #: back to the moment the VM was made, without a snapshot.
    resets: bool = False
    #: ``stop`` and ``start`` work (a VM keeps its disk in between).
    stop_start: bool = True
    #: ``forward`` works: a guest TCP port reachable from 127.0.0.1 on the host.
    forwards: bool = False
    #: ``ssh`` works for VMs of images with an SSH server.
    ssh: bool = False
    #: Private networks (``VMSpec.networks``), ``set_link`` and ``network_control``.
    networks: bool = False
    #: The backend's VMs live among the user's own (OrbStack, Multipass), so a
    #: VM that has a name the ledger recorded may still not be ours: before
    #: deleting it, cleanup checks its ``identity`` (see :meth:`Backend.mark`).
    shared_namespace: bool = False


@dataclass(frozen=True, slots=True)
class BackendVM:
    """A VM as the backend reports it.

    Attributes:
        name: the VM's name.
        state: ``running``, ``stopped`` or another backend word.
        detail: backend-specific facts (pid, accelerator, image ...).
    """

    name: str
    state: str
    detail: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command did. Output is raw bytes; exit_code is 128+N when killed by signal N."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class Backend(abc.ABC):
    """A VM provider. Subclasses set ``name`` and ``capabilities``."""

    name: str = "?"
    capabilities: Capabilities = Capabilities()

    def serve(self, owner: Owner, *, lease_s: float) -> None:  # noqa: B027 - optional hook
        """Who the VMs this object creates from now on belong to, and their lease
        in seconds. A session says so once, before its first create; a backend
        that keeps ownership with its VMs (libvirt's metadata) writes it there."""

    def validate_name(self, name: str) -> str:
        """Check ``name`` against the backend's rule (by default vmlease's common rule)."""
        return validate_name(name)

    @abc.abstractmethod
    def check_spec(self, spec: VMSpec) -> None:
        """Raise ImageNotFound or InvalidSpec if ``spec`` cannot be created here. Cheap."""

    def preflight(self, *, cheap: bool = False) -> list[Check]:
        """Whether this backend can work here: its program, its daemon, its
        accelerator. ``cheap`` checks start no process and take milliseconds
        (a session runs them when it starts); the others may probe."""
        return []

    def classify(self, exc: BaseException) -> Fault:
        """Whether ``exc``, raised by one of this backend's operations, is worth
        retrying. By default a BackendError says so itself (``transient``);
        a backend that learns more from an error's text overrides this."""
        if isinstance(exc, BackendError) and exc.transient:
            return Fault.TRANSIENT
        return Fault.PERMANENT

    @abc.abstractmethod
    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        """Create and start the VM; may return before it is ready (see wait_ready).

        Raises VMAlreadyExists if the backend already has a VM of that name,
        BackendTimeout if creating takes longer than ``timeout_s`` (the VM
        may still appear later; the session handles that).
        """

    @abc.abstractmethod
    def wait_ready(self, name: str, timeout_s: float) -> None:
        """Block until the VM answers commands; BootError if it cannot within ``timeout_s``."""

    @abc.abstractmethod
    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        """Start a stopped VM (wait_ready follows)."""

    @abc.abstractmethod
    def stop(self, name: str, timeout_s: float) -> None:
        """Shut the VM down, keeping its disk."""

    @abc.abstractmethod
    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        """Destroy the VM and everything the backend kept for it. VMNotFound if unknown."""

    @abc.abstractmethod
    def list(self, *, timeout_s: float = DEFAULT.list_s) -> list[BackendVM]:
        """Every VM the backend has, ours or not."""

    @abc.abstractmethod
    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: bytes | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout_s: float | None,
    ) -> ExecResult:
        """Run ``argv`` in the guest. A command that outlives ``timeout_s`` is killed
        and reported with ``timed_out=True``; a missing command exits 127. The
        call returns (or raises) within ``timeout_s`` plus ``DEFAULT.answer_s``."""

    @abc.abstractmethod
    def put(
        self, name: str, local: Path, remote: str, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        """Copy the local file ``local`` to ``remote`` in the guest (binary-safe)."""

    @abc.abstractmethod
    def get(
        self, name: str, remote: str, local: Path, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        """Copy ``remote`` from the guest to the local file ``local`` (binary-safe)."""

    def mark(self, name: str, token: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """Make the new VM ``name`` recognisable as vmlease's, once it answers.

        Returns what :meth:`identity` will report for this VM while it
        exists (a backend's instance id, or ``token`` kept in the guest), for
        the ledger to keep; None when the backend has nothing to offer
        (its namespace is vmlease's alone).
        """
        return None

    def identity(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """What :meth:`mark` returned for the VM now called ``name``.

        ``""`` when that VM carries no mark (it is not one vmlease made), None
        when the backend cannot tell just now (a stopped instance, an
        unreachable guest); VMNotFound when there is no such VM.
        """
        return None

    def forward(self, name: str, guest_port: int, *, timeout_s: float = DEFAULT.forward_s) -> int:
        """Make TCP ``guest_port`` in VM ``name`` reachable on 127.0.0.1 (never 0.0.0.0);
        returns the host port, chosen by the kernel so that nothing races for it.
        Forwarding a port twice returns the same host port."""
        raise UnsupportedOperation(f"the {self.name} backend cannot forward ports")

    def ssh(self, name: str, *, timeout_s: float = DEFAULT.forward_s) -> SSHInfo:
        """How to reach VM ``name`` with SSH (its port 22 forwarded, its host key known)."""
        raise UnsupportedOperation(f"the {self.name} backend cannot reach VMs with SSH")

    def set_link(
        self, name: str, network: str, up: bool, *, timeout_s: float = DEFAULT.forward_s
    ) -> None:
        """Cut (``up=False``) or restore VM ``name``'s link to its private ``network``."""
        raise UnsupportedOperation(f"the {self.name} backend has no private networks")

    def network_control(
        self, network: str, request: Mapping[str, Any], *, timeout_s: float = DEFAULT.forward_s
    ) -> dict[str, Any]:
        """Ask private ``network`` for a fault (``partition``, ``heal``, ``impair``)."""
        raise UnsupportedOperation(f"the {self.name} backend has no private networks")

    def console_tail(self, name: str, lines: int = 40) -> str:
        """The last lines the VM wrote to its console, for diagnosis ("" if none)."""
        return ""

    def snapshot(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Save the VM's memory and disk state as ``tag``."""
        raise UnsupportedOperation(f"the {self.name} backend cannot take snapshots")

    def restore(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Bring the VM back to the state saved as ``tag``."""
        raise UnsupportedOperation(f"the {self.name} backend cannot restore snapshots")

    def reset(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        """Bring VM ``name`` back to the moment it was made and ready (memory, disk,
        name, SSH key, forwards), without a snapshot; snapshots taken since are
        gone. UnsupportedOperation for a VM ``can_reset`` says no to."""
        raise UnsupportedOperation(f"the {self.name} backend cannot reset a VM without a snapshot")

    def can_reset(self, name: str) -> bool:
        """Whether ``reset`` works for VM ``name`` (see ``Capabilities.resets``)."""
        return False

    def keep(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> None:  # noqa: B027 - optional hook
        """VM ``name`` is kept for a person: from now on it must outlive this
        process, until its lease runs out or ``vmlease cleanup`` deletes it. A
        backend whose VMs end with their creator's connection (libvirt's
        autodestroy) detaches it here."""

    def sweep(self, *, dry_run: bool = False) -> builtins.list[str]:
        """Delete the VMs this backend can prove abandoned wherever they were made
        (libvirt: vmlease domains whose lease ran out, on every host); returns
        their names (with ``dry_run``, those it would delete). By default none:
        the ledger's owners decide."""
        return []

    def import_image(
        self, name: str, source: str, *, boot_vm: str, retry: Retry, **options: Any
    ) -> Path:
        """Import the cloud image at ``source`` (a URL or a file) as image ``name``
        and return where it now is. Its first boot is this backend's VM
        ``boot_vm``, which a session owns; ``retry`` runs each download attempt
        under the session's policy. The options are the backend's own."""
        raise UnsupportedOperation(
            f"the {self.name} backend cannot import images; import them with the qemu "
            "backend, whose image cache the libvirt backend uploads from"
        )

    def imported_by(self) -> tuple[str, dict[str, object]] | None:
        """The backend (its name and options) whose imports fill this one's image cache,
        if another one's do; None if this one imports, or nothing does."""
        return None

    def image_usage(self) -> builtins.list[dict[str, object]]:
        """What the backend's image cache holds, image by image (``vmlease image
        ls``): each image's name, current build, builds and saved states, with
        their sizes."""
        raise UnsupportedOperation(f"the {self.name} backend keeps no image cache")

    def prune_images(
        self, *, dry_run: bool = False, everything: bool = False
    ) -> builtins.list[dict[str, object]]:
        """Remove what no VM can use from the image cache (``vmlease image
        prune``); returns what went (with ``dry_run``, what would): each one's
        kind, name, size and why."""
        raise UnsupportedOperation(f"the {self.name} backend keeps no image cache")

    def injected_faults(self) -> int:
        """How many faults a fault-injecting wrapper has injected so far (0 for a
        real backend), for a run's summary."""
        return 0

    def visit(self) -> None:  # noqa: B027 - optional hook
        """From now on this object reaches VMs that another process owns (``vmlease
        exec``, a connector): a backend with a second way into its guests takes
        it, so that its commands and the owner's run side by side."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections this object holds (the VMs keep running)."""
