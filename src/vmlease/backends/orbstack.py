"""The OrbStack backend: Linux machines on macOS through ``orbctl``.

Verified against a command-line double built from OrbStack's documented
commands and messages (``tests/doubles``), not against a real installation:
see docs/backends/orbstack.md for what that leaves open.

OrbStack machines have no labels and share one namespace with the user's
own: what is ours is what the ledger says, and before deleting a machine
cleanup also checks that its id is the one recorded when vmlease made it.
Machines share OrbStack's CPUs and memory: a spec's ``cpus`` and
``memory_mb`` are not per machine here. A spec's ``arch`` is passed on
(``--arch arm64``): Apple silicon runs amd64 machines through Rosetta, an
Intel Mac runs amd64 only, which ``check_spec`` says before anything is made.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmlease._errors import (
    BackendError,
    BackendTimeout,
    InvalidSpec,
    VMAlreadyExists,
    VMNotFound,
)
from vmlease._spec import VMSpec, debian_arch, host_arch
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import BackendVM, Capabilities, ExecResult
from vmlease.backends._cli import CliBackend, Rule, env_argv

__all__ = ["OrbStackBackend"]

_START = "orbctl start"
_RULES = (
    Rule(r"machine not found|no such machine", VMNotFound),
    Rule(r"already exists", VMAlreadyExists),
    # The daemon's JSON-RPC errors: a dropped connection or a timeout is worth another try.
    Rule(
        r"\[-32098\].*(connection refused|connection reset|broken pipe|timed? ?out|EOF)",
        BackendError,
        transient=True,
    ),
    Rule(r"crashed on startup|failed to start", BackendError, transient=True),
    Rule(
        r"OrbStack is not running|not running.*orbctl start|connect: no such file",
        BackendError,
        transient=True,
        hint=f"start OrbStack with `{_START}`",
    ),
    Rule(r"timed? ?out", BackendTimeout),
)

#: ``tiny`` names the QEMU backend's image; here it means this small standard one.
DEFAULT_IMAGE = "debian:bookworm"


class OrbStackBackend(CliBackend):
    """VMs as OrbStack machines.

    Args:
        user: the machine's default user (commands run as root regardless).
        program, runner, binary_runner, env: see :class:`CliBackend`
            (``$VMLEASE_ORBSTACK_BIN`` names another ``orbctl``).
    """

    name = "orbstack"
    program = "orbctl"
    install_hint = "install OrbStack from https://orbstack.dev (it provides orbctl)"
    start_hint = _START
    rules = _RULES
    default_image = DEFAULT_IMAGE
    catalog_field = "orbstack"
    capabilities = Capabilities(snapshots=False, stop_start=True, shared_namespace=True)

    def __init__(self, *, user: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._user = user

    # -- set-up ----------------------------------------------------------

    def check_spec(self, spec: VMSpec) -> None:
        if spec.arch not in ("x86_64", "aarch64"):
            raise InvalidSpec(f"OrbStack runs arm64 and amd64 machines, not {spec.arch}")
        if spec.arch == "aarch64" and host_arch() == "x86_64":
            raise InvalidSpec(
                "OrbStack runs arm64 machines only on Apple silicon, and this Mac is "
                "x86_64: use arch='amd64', or the qemu backend, which emulates arm64"
            )
        ref = self.image_ref(spec)
        distro, _, version = ref.partition(":")
        if not distro or not distro.replace("-", "").isalnum() or (version and " " in version):
            raise InvalidSpec(
                f"image {spec.image!r} is not an OrbStack image: give `distro` or "
                "`distro:version` (e.g. `debian:bookworm`, `ubuntu:noble`)"
            )

    # -- lifecycle ---------------------------------------------------------

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        args = ["create", "--arch", debian_arch(spec.arch)]
        if self._user:
            args += ["--user", self._user]
        args += [self.image_ref(spec), name]
        self.call(args, timeout_s=timeout_s, subject=f"creating {name}")

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self.call(["start", name], timeout_s=timeout_s, subject=f"starting {name}")

    def stop(self, name: str, timeout_s: float) -> None:
        # Always with a name: a bare `orbctl stop` stops all of OrbStack.
        if not name:
            raise ValueError("stop needs a machine name")
        self.call(["stop", name], timeout_s=timeout_s, subject=f"stopping {name}")

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        if not name:
            raise ValueError("delete needs a machine name")
        self.call(["delete", "--force", name], timeout_s=timeout_s, subject=f"deleting {name}")

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> list[BackendVM]:
        done = self.call(["list", "--format", "json"], timeout_s=timeout_s)
        return parse_list(done.stdout)

    def info(self, name: str, *, timeout_s: float = DEFAULT.list_s) -> BackendVM:
        done = self.call(["info", name, "--format", "json"], timeout_s=timeout_s, subject=name)
        return parse_info(done.stdout)

    # -- ownership -----------------------------------------------------------

    def mark(self, name: str, token: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """OrbStack gives every machine its own id: that is the mark (``token`` is unused)."""
        return self.identity(name, timeout_s=timeout_s) or None

    def identity(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """The machine's id (a new machine of the same name has another)."""
        return self.info(name, timeout_s=timeout_s).detail.get("id") or None

    # -- commands and files --------------------------------------------------

    def exec_argv(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None
    ) -> builtins.list[str]:
        args = ["run", "--machine", name, "--user", "root"]
        if cwd:
            args += ["--workdir", cwd]
        return [*args, *env_argv(env), *argv]

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
        result = self.run_in_guest(name, argv, stdin=stdin, env=env, cwd=cwd, timeout_s=timeout_s)
        text = result.stderr.decode(errors="replace")
        if result.exit_code != 0 and not result.timed_out and "machine not found" in text:
            raise self.error([self.program, "run"], result.exit_code, text, name)
        if result.exit_code != 0 and "[-32098]" in text:
            # The daemon failed before the command ran: nothing ran, so it may be retried.
            self.raise_channel(name, result, "orbctl could not reach the machine")
        return result

    def copy_in(self, name: str, local: Path, staged: str, timeout_s: float) -> None:
        self.call(
            ["push", "--machine", name, str(local), staged], timeout_s=timeout_s, subject=name
        )

    def copy_out(self, name: str, staged: str, local: Path, timeout_s: float) -> None:
        self.call(
            ["pull", "--machine", name, staged, str(local)], timeout_s=timeout_s, subject=name
        )


def _record(raw: Mapping[str, Any]) -> BackendVM:
    image = raw.get("image") or {}
    detail = {
        "id": str(raw.get("id", "")),
        "image": ":".join(str(image.get(k, "")) for k in ("distro", "version") if image.get(k)),
        "arch": str(image.get("arch", "")),
    }
    return BackendVM(str(raw["name"]), str(raw.get("state", "unknown")), detail)


def parse_list(text: str) -> list[BackendVM]:
    """Machines from ``orbctl list --format json`` (an array; ``null`` or empty when none)."""
    stripped = text.strip()
    if not stripped or stripped == "null":
        return []
    try:
        data = json.loads(stripped)
        return [_record(item) for item in data]
    except (ValueError, TypeError, KeyError) as exc:
        raise BackendError(f"orbstack: cannot read `orbctl list` output: {exc}") from exc


def parse_info(text: str) -> BackendVM:
    """One machine from ``orbctl info NAME --format json`` (``{"record": {...}, ...}``)."""
    try:
        data = json.loads(text)
        return _record(data.get("record", data))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"orbstack: cannot read `orbctl info` output: {exc}") from exc
