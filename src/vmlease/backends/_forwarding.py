"""A backend that hands every operation to another: the base of wrappers.

A wrapper (fault injection, say) subclasses :class:`ForwardingBackend` and
overrides only the operations it changes. Its VMs are the inner backend's:
recorded, reaped and cleaned up under that backend's name.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmlease._checks import Check
from vmlease._identity import Owner
from vmlease._spec import VMSpec
from vmlease._ssh import SSHInfo
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import Backend, BackendVM, ExecResult, Fault, Retry

__all__ = ["ForwardingBackend"]


class ForwardingBackend(Backend):
    """Every operation of ``inner``, unchanged.

    Args:
        inner: the backend that does the work.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities

    def injected_faults(self) -> int:
        return self.inner.injected_faults()

    def serve(self, owner: Owner, *, lease_s: float) -> None:
        self.inner.serve(owner, lease_s=lease_s)

    def validate_name(self, name: str) -> str:
        return self.inner.validate_name(name)

    def classify(self, exc: BaseException) -> Fault:
        return self.inner.classify(exc)

    def check_spec(self, spec: VMSpec) -> None:
        self.inner.check_spec(spec)

    def preflight(self, *, cheap: bool = False) -> builtins.list[Check]:
        return self.inner.preflight(cheap=cheap)

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        self.inner.create(name, spec, timeout_s=timeout_s)

    def wait_ready(self, name: str, timeout_s: float) -> None:
        self.inner.wait_ready(name, timeout_s)

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self.inner.start(name, timeout_s=timeout_s)

    def stop(self, name: str, timeout_s: float) -> None:
        self.inner.stop(name, timeout_s)

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        self.inner.delete(name, timeout_s=timeout_s)

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> builtins.list[BackendVM]:
        return self.inner.list(timeout_s=timeout_s)

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
        return self.inner.exec(name, argv, stdin=stdin, env=env, cwd=cwd, timeout_s=timeout_s)

    def put(
        self, name: str, local: Path, remote: str, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        self.inner.put(name, local, remote, timeout_s=timeout_s)

    def get(
        self, name: str, remote: str, local: Path, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        self.inner.get(name, remote, local, timeout_s=timeout_s)

    def mark(self, name: str, token: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        return self.inner.mark(name, token, timeout_s=timeout_s)

    def identity(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        return self.inner.identity(name, timeout_s=timeout_s)

    def forward(self, name: str, guest_port: int, *, timeout_s: float = DEFAULT.forward_s) -> int:
        return self.inner.forward(name, guest_port, timeout_s=timeout_s)

    def ssh(self, name: str, *, timeout_s: float = DEFAULT.forward_s) -> SSHInfo:
        return self.inner.ssh(name, timeout_s=timeout_s)

    def set_link(
        self, name: str, network: str, up: bool, *, timeout_s: float = DEFAULT.forward_s
    ) -> None:
        self.inner.set_link(name, network, up, timeout_s=timeout_s)

    def network_control(
        self, network: str, request: Mapping[str, Any], *, timeout_s: float = DEFAULT.forward_s
    ) -> dict[str, Any]:
        return self.inner.network_control(network, request, timeout_s=timeout_s)

    def console_tail(self, name: str, lines: int = 40) -> str:
        return self.inner.console_tail(name, lines)

    def snapshot(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        self.inner.snapshot(name, tag, timeout_s=timeout_s)

    def restore(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        self.inner.restore(name, tag, timeout_s=timeout_s)

    def reset(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self.inner.reset(name, timeout_s=timeout_s)

    def can_reset(self, name: str) -> bool:
        return self.inner.can_reset(name)

    def keep(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> None:
        self.inner.keep(name, timeout_s=timeout_s)

    def sweep(self, *, dry_run: bool = False) -> builtins.list[str]:
        return self.inner.sweep(dry_run=dry_run)

    def import_image(
        self, name: str, source: str, *, boot_vm: str, retry: Retry, **options: Any
    ) -> Path:
        return self.inner.import_image(name, source, boot_vm=boot_vm, retry=retry, **options)

    def imported_by(self) -> tuple[str, dict[str, object]] | None:
        return self.inner.imported_by()

    def image_usage(self) -> builtins.list[dict[str, object]]:
        return self.inner.image_usage()

    def prune_images(
        self, *, dry_run: bool = False, everything: bool = False
    ) -> builtins.list[dict[str, object]]:
        return self.inner.prune_images(dry_run=dry_run, everything=everything)

    def visit(self) -> None:
        self.inner.visit()

    def close(self) -> None:
        self.inner.close()
