"""The Multipass backend: Ubuntu VMs through the ``multipass`` command.

Verified against a command-line double built from Multipass's documented
commands and messages (``tests/doubles``), not against a real installation:
see docs/backends/multipass.md for what that leaves open.

Multipass instances have no labels or ids and share one namespace with the
user's own: what is ours is what the ledger says, and before deleting an
instance cleanup also checks the mark vmlease wrote into it
(``/var/lib/vmlease/instance``) or, when it cannot be read, that the name is
one vmlease generated. Deleting is always
``multipass delete --purge NAME``: a bare ``multipass purge`` would also
wipe the user's own deleted-but-recoverable instances.
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
    ChannelError,
    InvalidSpec,
    VMAlreadyExists,
    VMNotFound,
)
from vmlease._spec import VMSpec, host_arch
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import BackendVM, Capabilities, ExecResult
from vmlease.backends._cli import CliBackend, Rule, env_argv

__all__ = ["MultipassBackend"]

_START = "sudo snap start multipass (Linux) or open the Multipass app (macOS, Windows)"
_RULES = (
    Rule(r"does not exist", VMNotFound),
    Rule(r"already exists", VMAlreadyExists),
    Rule(
        r"cannot connect to the multipass socket",
        BackendError,
        transient=True,
        hint=f"make sure multipassd runs: {_START}",
    ),
    Rule(r"is being prepared|is (starting|stopping|suspending|restarting)", BackendError, True),
    Rule(r"ssh connection failed|failed to (authenticate|connect)", ChannelError, True),
    Rule(r"timed out|timeout", BackendTimeout),
    # Multipass's return codes: 3 the daemon failed, 5 a timeout.
    Rule("", BackendError, transient=True, exit_code=3, hint=f"check multipassd: {_START}"),
    Rule("", BackendTimeout, exit_code=5),
)

#: ``tiny`` names the QEMU backend's image; here it means Multipass's current LTS.
DEFAULT_IMAGE = "lts"
_MIN_MEMORY_MB = 128
_SSH_FAILURE = 255


class MultipassBackend(CliBackend):
    """VMs as Multipass instances.

    Args:
        cloud_init: a cloud-init file passed to every ``launch``.
        disk_gb: disk size for new instances (Multipass's default otherwise).
        program, runner, binary_runner, env: see :class:`CliBackend`
            (``$VMLEASE_MULTIPASS_BIN`` names another ``multipass``).
    """

    name = "multipass"
    program = "multipass"
    install_hint = "install it with `sudo snap install multipass` (see https://multipass.run)"
    start_hint = _START
    rules = _RULES
    default_image = DEFAULT_IMAGE
    catalog_field = "multipass"
    ready_poll_s = 0.5
    capabilities = Capabilities(snapshots=False, stop_start=True, shared_namespace=True)

    def __init__(
        self, *, cloud_init: Path | None = None, disk_gb: int | None = None, **options: Any
    ) -> None:
        super().__init__(**options)
        if cloud_init is not None and not Path(cloud_init).is_file():
            raise InvalidSpec(f"cloud_init {cloud_init} is not a file")
        if disk_gb is not None and disk_gb < 1:
            raise InvalidSpec(f"disk_gb must be at least 1, not {disk_gb}")
        self._cloud_init = cloud_init
        self._disk_gb = disk_gb

    # -- set-up ----------------------------------------------------------

    def check_spec(self, spec: VMSpec) -> None:
        if spec.arch != host_arch():
            raise InvalidSpec(
                f"Multipass runs only this machine's architecture ({host_arch()}), not "
                f"arch={spec.arch!r}: use the qemu or libvirt backend, which emulate it"
            )
        if spec.memory_mb < _MIN_MEMORY_MB:
            raise InvalidSpec(
                f"memory_mb={spec.memory_mb} is below what Multipass accepts ({_MIN_MEMORY_MB})"
            )
        ref = self.image_ref(spec)
        if not ref or any(c.isspace() for c in ref):
            raise InvalidSpec(
                f"image {spec.image!r} is not a Multipass image: give a name from "
                "`multipass find` (e.g. `24.04`, `lts`)"
            )

    # -- lifecycle ---------------------------------------------------------

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        args = [
            "launch",
            self.image_ref(spec),
            "--name",
            name,
            "--cpus",
            str(spec.cpus),
            "--memory",
            f"{spec.memory_mb}M",
            # Multipass's own limit, a little inside ours so that it reports first.
            "--timeout",
            str(max(1, int(timeout_s) - 5)),
        ]
        if self._disk_gb is not None:
            args += ["--disk", f"{self._disk_gb}G"]
        if self._cloud_init is not None:
            args += ["--cloud-init", str(self._cloud_init)]
        self.call(args, timeout_s=timeout_s, subject=f"launching {name}")

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self.call(
            ["start", name, "--timeout", str(max(1, int(timeout_s) - 5))],
            timeout_s=timeout_s,
            subject=f"starting {name}",
        )

    def stop(self, name: str, timeout_s: float) -> None:
        if not name:
            raise ValueError("stop needs an instance name")
        self.call(["stop", name], timeout_s=timeout_s, subject=f"stopping {name}")

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        # One named instance, purged: never `multipass purge`, never `--all`.
        if not name or name.startswith("-"):
            raise ValueError(f"delete needs one instance name, not {name!r}")
        self.call(["delete", "--purge", name], timeout_s=timeout_s, subject=f"deleting {name}")

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> list[BackendVM]:
        done = self.call(["list", "--format", "json"], timeout_s=timeout_s)
        return parse_list(done.stdout)

    def info(self, name: str, *, timeout_s: float = DEFAULT.list_s) -> dict[str, Any]:
        done = self.call(["info", name, "--format", "json"], timeout_s=timeout_s, subject=name)
        return parse_info(done.stdout, name)

    # -- commands and files --------------------------------------------------

    def exec_argv(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None
    ) -> builtins.list[str]:
        args = ["exec", name]
        if cwd:
            args += ["--working-directory", cwd]
        # Commands run as the instance's user (ubuntu); vmlease's run as root.
        args += ["--", "sudo", "--non-interactive", "--"]
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
        if result.exit_code == 0 or result.timed_out:
            return result
        text = result.stderr.decode(errors="replace")
        if "exec failed" in text or "does not exist" in text or "is not running" in text:
            # Multipass's own failure, not the command's: it did not run.
            error = self.error([self.program, "exec"], result.exit_code, text, name)
            if isinstance(error, VMNotFound):
                raise error
            self.raise_channel(name, result, "multipass could not run the command")
        if result.exit_code == _SSH_FAILURE:
            # 255 is what ssh exits with when the connection fails, and also a
            # command's own status: ask the instance something that cannot fail.
            probe = self.run_in_guest(name, ["true"], timeout_s=30.0)
            if probe.exit_code != 0:
                self.raise_channel(name, result, "the SSH connection to the instance failed")
        return result

    def copy_in(self, name: str, local: Path, staged: str, timeout_s: float) -> None:
        self.call(["transfer", str(local), f"{name}:{staged}"], timeout_s=timeout_s, subject=name)

    def copy_out(self, name: str, staged: str, local: Path, timeout_s: float) -> None:
        self.call(["transfer", f"{name}:{staged}", str(local)], timeout_s=timeout_s, subject=name)


def _number(value: Any) -> int | None:
    """Multipass writes several numbers as strings ("1", "5116440064"), some as ints."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_list(text: str) -> list[BackendVM]:
    """Instances from ``multipass list --format json`` (``{"list": [...]}``)."""
    try:
        data = json.loads(text)
        found = []
        for item in data.get("list", []):
            detail = {
                "release": str(item.get("release", "")),
                "ipv4": ",".join(str(a) for a in item.get("ipv4", []) or []),
            }
            found.append(BackendVM(str(item["name"]), str(item.get("state", "")).lower(), detail))
        return found
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"multipass: cannot read `multipass list` output: {exc}") from exc


def parse_info(text: str, name: str) -> dict[str, Any]:
    """One instance from ``multipass info NAME --format json``, numbers as ints."""
    try:
        data = json.loads(text)
        raw = data["info"][name]
        memory = raw.get("memory") or {}
        disks = raw.get("disks") or {}
        return {
            "name": name,
            "state": str(raw.get("state", "")).lower(),
            "cpus": _number(raw.get("cpu_count")),
            "memory_total": _number(memory.get("total")),
            "memory_used": _number(memory.get("used")),
            "disk_total": sum(_number(d.get("total")) or 0 for d in disks.values()) or None,
            "release": str(raw.get("release", "")),
            "image_release": str(raw.get("image_release", "")),
            "ipv4": [str(a) for a in raw.get("ipv4", []) or []],
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"multipass: cannot read `multipass info` output: {exc}") from exc
