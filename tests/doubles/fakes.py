"""Hand-written recording fakes for unit tests of policy. Not a backend for users."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmlease import ImageNotFound, SnapshotNotFound, VMAlreadyExists, VMNotFound
from vmlease._spec import VMSpec
from vmlease.backends import Backend, BackendVM, Capabilities, ExecResult


@dataclass
class Call:
    op: str
    name: str
    args: tuple[object, ...] = ()


@dataclass
class FakeBackend(Backend):
    """Records every call; VMs are entries in a dict.

    ``fail`` maps an operation name to an exception to raise from it every
    time, or to a list of exceptions to raise from its next calls, one each;
    ``on_create`` runs inside ``create`` (to look at the ledger at that moment).
    """

    name = "fake"
    images: tuple[str, ...] = ("tiny",)
    vms: dict[str, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    fail: dict[str, BaseException | list[BaseException]] = field(default_factory=dict)
    on_create: Callable[[str], None] | None = None

    def _do(self, op: str, name: str, *args: object) -> None:
        self.calls.append(Call(op, name, args))
        failure = self.fail.get(op)
        if isinstance(failure, list):
            if failure:
                raise failure.pop(0)
        elif failure is not None:
            raise failure

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]

    def check_spec(self, spec: VMSpec) -> None:
        self._do("check_spec", "", spec)
        if spec.image not in self.images:
            raise ImageNotFound(f"no image {spec.image!r}")

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        if name in self.vms:
            self.calls.append(Call("create", name, (spec,)))
            raise VMAlreadyExists(f"{name} already exists")
        if self.on_create is not None:
            self.on_create(name)
        self.vms[name] = "running"  # a create that fails late may still leave the VM
        self._do("create", name, spec)

    def wait_ready(self, name: str, timeout_s: float) -> None:
        self._do("wait_ready", name, timeout_s)

    def start(self, name: str, *, timeout_s: float = 120.0) -> None:
        self._do("start", name)
        self.vms[name] = "running"

    def stop(self, name: str, timeout_s: float) -> None:
        self._do("stop", name)
        self.vms[name] = "stopped"

    def delete(self, name: str, *, timeout_s: float = 60.0) -> None:
        self._do("delete", name)
        if name not in self.vms:
            raise VMNotFound(name)
        del self.vms[name]

    def list(self, *, timeout_s: float = 30.0) -> list[BackendVM]:
        return [BackendVM(n, s, {}) for n, s in sorted(self.vms.items())]

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
        self._do("exec", name, tuple(argv))
        if argv[0] == "false":
            return ExecResult(1, b"", b"failed\n")
        if argv[0] == "sleep":
            return ExecResult(137, b"", b"", timed_out=True)
        return ExecResult(0, (stdin or b"") + " ".join(argv).encode(), b"")

    def put(self, name: str, local: Path, remote: str, *, timeout_s: float = 300.0) -> None:
        self._do("put", name, local, remote)

    def get(self, name: str, remote: str, local: Path, *, timeout_s: float = 300.0) -> None:
        self._do("get", name, remote, local)
        local.write_bytes(b"from " + remote.encode())


@dataclass
class SnapshottingFake(FakeBackend):
    """A FakeBackend that also records snapshots (a dict of tags per VM)."""

    capabilities = Capabilities(snapshots=True)
    snapshots: dict[str, set[str]] = field(default_factory=dict)

    def snapshot(self, name: str, tag: str, *, timeout_s: float = 120.0) -> None:
        self._do("snapshot", name, tag)
        self.snapshots.setdefault(name, set()).add(tag)

    def restore(self, name: str, tag: str, *, timeout_s: float = 120.0) -> None:
        self._do("restore", name, tag)
        if tag not in self.snapshots.get(name, set()):
            raise SnapshotNotFound(f"{name} has no snapshot {tag}")


@dataclass
class ResettingFake(SnapshottingFake):
    """A SnapshottingFake whose VMs also reset without a snapshot when
    ``resettable``, as QEMU VMs of a mapped booted state do (a booted one cannot)."""

    capabilities = Capabilities(snapshots=True, resets=True)
    resettable: bool = True

    def reset(self, name: str, *, timeout_s: float = 120.0) -> None:
        self._do("reset", name)

    def can_reset(self, name: str) -> bool:
        return self.resettable and name in self.vms


@dataclass
class SharedFake(FakeBackend):
    """A FakeBackend whose VMs share a namespace with the user's, as OrbStack's do.

    ``marks`` holds each VM's identity (a VM made outside vmlease has none);
    names in ``unreadable`` cannot be asked for theirs (a stopped instance).
    """

    name = "shared"
    capabilities = Capabilities(shared_namespace=True)
    marks: dict[str, str] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)

    def mark(self, name: str, token: str, *, timeout_s: float = 60.0) -> str | None:
        self._do("mark", name, token)
        self.marks[name] = token
        return token

    def identity(self, name: str, *, timeout_s: float = 30.0) -> str | None:
        self._do("identity", name)
        if name not in self.vms:
            raise VMNotFound(f"{name} does not exist")
        if name in self.unreadable:
            return None
        return self.marks.get(name, "")

    def replace(self, name: str) -> None:
        """The user deletes the VM ``name`` and makes one of their own with that name."""
        self.marks.pop(name, None)
        self.vms[name] = "running"
