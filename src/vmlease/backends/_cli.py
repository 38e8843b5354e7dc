"""What backends that drive a command-line tool share (OrbStack's ``orbctl``, ``multipass``).

Such a backend runs its tool with argument lists (never a shell), turns a
non-zero exit into an error by matching the tool's message against a table
(:class:`Rule`), and copies files through a staging path in the guest, since
the tools copy as an unprivileged user while vmlease's commands run as root.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._checks import Check, Severity
from vmlease._distros import catalog, lookup
from vmlease._errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BootError,
    ChannelError,
    GuestFileError,
    InvalidSpec,
    VMNotFound,
)
from vmlease._runner import Completed, Runner, SubprocessRunner, find_program
from vmlease._spec import VMSpec
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import Backend, ExecResult

__all__ = ["MARK_PATH", "BinaryRunner", "CliBackend", "Rule", "env_argv", "run_binary"]

#: Where a VM made by vmlease on a backend without labels keeps its mark.
MARK_PATH = "/var/lib/vmlease/instance"
_NO_MARK = "-"


@dataclass(frozen=True, slots=True)
class Rule:
    """A tool message and what it means.

    Attributes:
        pattern: a regular expression searched for in the tool's stderr and
            stdout ("" matches any message).
        error: the error class to raise.
        transient: whether trying again may work and is safe (None: as the
            error class says, e.g. a BackendTimeout is transient).
        hint: what the user should do, added to the message.
        exit_code: if set, the rule applies only to this exit status.
    """

    pattern: str
    error: type[BackendError]
    transient: bool | None = None
    hint: str = ""
    exit_code: int | None = None


def env_argv(env: Mapping[str, str] | None) -> list[str]:
    """``env NAME=VALUE ...`` to put before a guest command, or nothing."""
    return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


class BinaryRunner:
    """Runs a program with bytes in and out; the exec path of CLI backends."""

    def __call__(
        self, argv: Sequence[str], *, stdin: bytes | None, timeout_s: float | None
    ) -> tuple[int | None, bytes, bytes]:
        return run_binary(argv, stdin=stdin, timeout_s=timeout_s)


def run_binary(
    argv: Sequence[str], *, stdin: bytes | None, timeout_s: float | None
) -> tuple[int | None, bytes, bytes]:
    """(exit code or None on timeout, stdout, stderr); a missing program exits 127."""
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or b"", exc.stderr or b""
    except OSError as exc:
        return 127, b"", f"{argv[0]}: {exc.strerror}".encode()
    return proc.returncode, proc.stdout, proc.stderr


class CliBackend(Backend):
    """Base for backends that drive a command-line tool.

    Subclasses set ``program`` (the default tool name), ``install_hint``,
    ``rules``, ``start_hint`` (how to start the tool's daemon) and
    ``default_image``.

    Args:
        program: the tool to run (default the subclass's; also ``$VMLEASE_<NAME>_BIN``).
        runner: runs the tool for text results (injected for tests).
        binary_runner: runs the tool for commands in the guest (bytes in and out).
        env: environment to read settings and PATH from.
        state_dir: accepted like every backend's; the tool keeps its own state.
    """

    program = "?"
    install_hint = ""
    start_hint = ""
    rules: tuple[Rule, ...] = ()
    ready_poll_s = 0.2
    #: What the image ``tiny`` (the QEMU backend's default) means for this tool.
    default_image = "?"
    #: Which of a catalog entry's names is this tool's (``Distro.orbstack``).
    catalog_field = ""

    def __init__(
        self,
        *,
        program: str | None = None,
        runner: Runner | None = None,
        binary_runner: BinaryRunner | None = None,
        env: Mapping[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        del state_dir
        self._env = dict(os.environ if env is None else env)
        self._program = (
            program or self._env.get(f"VMLEASE_{self.name.upper()}_BIN") or type(self).program
        )
        self._run = runner or SubprocessRunner()
        self._run_binary = binary_runner or BinaryRunner()

    def image_ref(self, spec: VMSpec) -> str:
        """The tool's name for ``spec``'s image: its own image of a catalog name
        (``ubuntu-22.04``); InvalidSpec if it has none; any other name as it is."""
        if spec.image == "tiny":
            return self.default_image
        distro = lookup(spec.image, self._env)
        if distro is None:
            return spec.image
        ref: str | None = getattr(distro, self.catalog_field, None)
        if ref is None:
            offered = sorted(
                d.name for d in catalog(self._env).values() if getattr(d, self.catalog_field)
            )
            raise InvalidSpec(
                f"the {self.name} backend has no image of {distro.title} ({distro.name}): "
                f"it offers {', '.join(offered)} from the catalog. The qemu and libvirt "
                "backends import the distribution's cloud image"
            )
        return ref

    # -- the tool ----------------------------------------------------------

    def tool(self) -> str:
        """The tool's full path; BackendUnavailable (saying how to install it) if missing."""
        path = find_program(self._program, self._env)
        if path is None:
            raise BackendUnavailable(
                f"{self._program} not found: the {self.name} backend needs it; {self.install_hint}"
            )
        return path

    def call(self, args: Sequence[str], *, timeout_s: float, subject: str = "") -> Completed:
        """Run the tool with ``args``; the result if it exits 0, else the matching error."""
        argv = [self.tool(), *args]
        done = self._run(argv, timeout_s=timeout_s)
        if done.returncode is None:
            raise BackendTimeout(
                f"`{self.program} {' '.join(args[:2])}` took longer than {timeout_s:g} s",
                command=argv,
                stderr=done.stderr,
            )
        if done.returncode != 0:
            raise self.error(argv, done.returncode, done.stderr or done.stdout, subject)
        return done

    def error(self, argv: Sequence[str], code: int, text: str, subject: str = "") -> BackendError:
        """The error for a failed run of the tool, from the first rule its message matches."""
        message = text.strip()[-2000:] or f"exit status {code}"
        what = f"{self.name}: {subject + ': ' if subject else ''}{message}"
        for rule in self.rules:
            if rule.exit_code is not None and rule.exit_code != code:
                continue
            if re.search(rule.pattern, text, re.IGNORECASE | re.MULTILINE):
                hint = f"; {rule.hint}" if rule.hint else ""
                return rule.error(
                    what + hint,
                    command=argv,
                    exit_code=code,
                    stderr=text,
                    transient=rule.transient,
                )
        return BackendError(what, command=argv, exit_code=code, stderr=text)

    def daemon_check(self, probe: Callable[[], object]) -> Check:
        """A pre-flight check that the tool's daemon answers ``probe``."""
        label = f"{self.name}: daemon"
        try:
            probe()
        except BackendUnavailable as exc:
            return Check(label, Severity.FAIL, str(exc), BackendUnavailable)
        except BackendError as exc:
            return Check(
                label,
                Severity.FAIL,
                f"{self.program} does not answer ({exc}); start it with `{self.start_hint}`",
                BackendUnavailable,
            )
        return Check(label, Severity.OK, f"{self.program} answers")

    def preflight(self, *, cheap: bool = False) -> list[Check]:
        """The tool is installed; unless ``cheap``, its daemon answers ``list``."""
        checks = [self.program_check()]
        if cheap or checks[0].status is Severity.FAIL:
            return checks
        checks.append(self.daemon_check(lambda: self.list(timeout_s=15.0)))
        return checks

    def wait_ready(self, name: str, timeout_s: float) -> None:
        """Until ``true`` runs in the guest, polling; BootError with the last failure."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while True:
            try:
                done = self.run_in_guest(name, ["true"], timeout_s=max(1.0, timeout_s))
                if done.exit_code == 0:
                    return
                last = ChannelError(done.stderr.decode(errors="replace").strip())
            except BackendError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise BootError(f"{self.name}: {name} did not answer `true`: {last}")
            time.sleep(self.ready_poll_s)

    def program_check(self) -> Check:
        label = f"{self.name}: {self._program}"
        try:
            return Check(label, Severity.OK, self.tool())
        except BackendUnavailable as exc:
            return Check(label, Severity.FAIL, str(exc), BackendUnavailable)

    # -- commands and files --------------------------------------------------

    def exec_argv(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None
    ) -> list[str]:
        """The tool's arguments that run ``argv`` as root in VM ``name``."""
        raise NotImplementedError

    def run_in_guest(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        full = [self.tool(), *self.exec_argv(name, argv, env, cwd)]
        code, out, err = self._run_binary(full, stdin=stdin, timeout_s=timeout_s)
        if code is None:
            return ExecResult(exit_code=124, stdout=out, stderr=err, timed_out=True)
        return ExecResult(exit_code=code, stdout=out, stderr=err)

    def _checked(self, name: str, argv: Sequence[str], what: str, timeout_s: float) -> None:
        done = self.run_in_guest(name, argv, timeout_s=timeout_s)
        if done.exit_code != 0:
            raise GuestFileError(
                f"VM {name}: {what} failed: {done.stderr.decode(errors='replace').strip()}"
            )

    # -- ownership -----------------------------------------------------------

    def mark(self, name: str, token: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """Write ``token`` to :data:`MARK_PATH` in the guest (atomically) and return it."""
        script = 'mkdir -p "${1%/*}" && printf "%s\\n" "$2" > "$1.part" && mv -f "$1.part" "$1"'
        done = self._script(name, script, token, timeout_s=timeout_s)
        if done.exit_code != 0:
            raise GuestFileError(
                f"VM {name}: writing {MARK_PATH} failed: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        return token

    def identity(self, name: str, *, timeout_s: float = DEFAULT.mark_s) -> str | None:
        """The token in the guest's :data:`MARK_PATH`; "" if it has none, None if
        the guest cannot be asked (stopped, unreachable)."""
        script = 'if [ -f "$1" ]; then cat "$1"; else echo "$2"; fi'
        try:
            done = self._script(name, script, _NO_MARK, timeout_s=timeout_s)
        except VMNotFound:
            raise
        except BackendError:
            return None
        if done.exit_code != 0 or done.timed_out:
            return None
        text = done.stdout.decode(errors="replace").strip()
        return "" if text == _NO_MARK else text

    def _script(self, name: str, script: str, arg: str, *, timeout_s: float) -> ExecResult:
        """``script`` run by sh in the guest as root, with $1 the mark's path, $2 ``arg``."""
        argv = ["sh", "-c", script, "sh", MARK_PATH, arg]
        return self.exec(name, argv, stdin=None, env=None, cwd=None, timeout_s=timeout_s)

    def copy_in(self, name: str, local: Path, staged: str, timeout_s: float) -> None:
        """Copy ``local`` to the staging path ``staged`` in the guest (as the tool's user)."""
        raise NotImplementedError

    def copy_out(self, name: str, staged: str, local: Path, timeout_s: float) -> None:
        """Copy the staging path ``staged`` from the guest to ``local``."""
        raise NotImplementedError

    def staging_path(self) -> str:
        # A path in the guest, unguessable, removed after use.
        return f"/tmp/.vmlease-{secrets.token_hex(8)}"  # noqa: S108

    def put(
        self, name: str, local: Path, remote: str, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        if not local.is_file():
            raise GuestFileError(f"cannot copy {local} into VM {name}: not a file")
        deadline = time.monotonic() + timeout_s
        staged = self.staging_path()
        mode = f"{local.stat().st_mode & 0o7777:o}"
        try:
            self.copy_in(name, local, staged, _left(deadline))
            # Written beside the target and renamed over it: the file appears whole or not at all.
            script = (
                'cp "$1" "$2.vmlease-part" && chmod "$3" "$2.vmlease-part" '
                '&& mv -f "$2.vmlease-part" "$2"'
            )
            argv = ["sh", "-c", script, "sh", staged, remote, mode]
            self._checked(name, argv, f"writing {remote}", _left(deadline))
        finally:
            self.run_in_guest(name, ["rm", "-f", staged], timeout_s=_left(deadline))

    def get(
        self, name: str, remote: str, local: Path, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        deadline = time.monotonic() + timeout_s
        staged = self.staging_path()
        try:
            script = 'cp "$1" "$2" && chmod 0644 "$2"'
            argv = ["sh", "-c", script, "sh", remote, staged]
            self._checked(name, argv, f"reading {remote}", _left(deadline))
            self.copy_out(name, staged, local, _left(deadline))
        finally:
            self.run_in_guest(name, ["rm", "-f", staged], timeout_s=_left(deadline))

    def raise_channel(self, name: str, result: ExecResult, why: str) -> None:
        raise ChannelError(
            f"VM {name}: {why}: {result.stderr.decode(errors='replace').strip()[-500:]}",
            exit_code=result.exit_code,
            transient=True,
        )


def _left(deadline: float) -> float:
    """What is left until ``deadline``, at least a second (to clean up after a late step)."""
    return max(1.0, deadline - time.monotonic())
