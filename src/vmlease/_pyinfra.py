"""pyinfra's ``@vmlease`` connector: ``pyinfra @vmlease/NAME deploy.py``.

Registered under pyinfra's ``pyinfra.connectors`` entry point (install
``vmlease[pyinfra]``). Commands and files go over vmlease's own channel to
the guest agent, so the guest needs neither SSH nor a network. ``@vmlease``
alone stands for every running VM vmlease owns (``VMLEASE_STATE_DIR``'s), or
as ``pyinfra`` finds them.

A VM vmlease does not own, or that has gone, is a connection error naming the
VM and ``vmlease ls``. From Python, ``run_pyinfra(vm, "deploy.py")`` runs a
deploy against a test's VM in one call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pyinfra.api.exceptions import ConnectError, InventoryError
from pyinfra.connectors.base import BaseConnector
from pyinfra.connectors.util import (
    CommandOutput,
    OutputLine,
    execute_command_with_sudo_retry,
    make_unix_command_for_host,
)

from vmlease._attach import Attached, live_names
from vmlease._errors import VMLeaseError
from vmlease._paths import state_dir

if TYPE_CHECKING:
    from pyinfra.api.arguments import ConnectorArguments

    from vmlease._vm import VM

__all__ = ["VMLeaseConnector", "run_pyinfra"]


class VMLeaseConnector(BaseConnector):
    """Reaches a VM vmlease owns through its agent."""

    handles_execution = True

    @staticmethod
    def make_names_data(name: str | None = None) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
        names = [name] if name else live_names(state_dir())
        if not names:
            raise InventoryError(
                f"vmlease owns no running VM in {state_dir()}; `vmlease ls` lists its VMs"
            )
        for vm in names:
            yield f"@vmlease/{vm}", {"vmlease_name": vm}, ["@vmlease"]

    def connect(self) -> None:
        name = self.host.data.vmlease_name
        try:
            self._vm = Attached(state_dir(), name)
        except VMLeaseError as exc:
            raise ConnectError(f"VM {name}: {exc} (`vmlease ls` lists vmlease's VMs)") from exc

    def disconnect(self) -> None:
        vm = getattr(self, "_vm", None)
        if vm is not None:
            vm.close()

    def run_shell_command(
        self,
        command: Any,
        print_output: bool = False,
        print_input: bool = False,
        **arguments: Any,
    ) -> tuple[bool, Any]:
        arguments.pop("_get_pty", None)
        timeout = arguments.pop("_timeout", None)
        stdin = arguments.pop("_stdin", None)
        success_codes = arguments.pop("_success_exit_codes", None)

        def execute() -> tuple[int, Any]:
            line = make_unix_command_for_host(self.state, self.host, command, **arguments)
            raw = line.get_raw_value()
            if print_input:
                print(f"{self.host.print_prefix}>>> {line}", file=sys.stderr)
            data = _stdin_bytes(stdin)
            done = self._vm.exec(["sh", "-c", raw], stdin=data, timeout_s=timeout)
            lines = [
                OutputLine(buffer, text)
                for buffer, out in (("stdout", done.stdout), ("stderr", done.stderr))
                for text in out.decode(errors="replace").splitlines()
            ]
            if print_output:
                for item in lines:
                    print(f"{self.host.print_prefix}{item.line}", file=sys.stderr)
            code = 124 if done.timed_out else done.exit_code
            return code, CommandOutput(lines)

        code, output = execute_command_with_sudo_retry(
            self.host, cast("ConnectorArguments", arguments), execute
        )
        ok = code in success_codes if success_codes else code == 0
        return ok, output

    def put_file(
        self,
        filename_or_io: Any,
        remote_filename: str,
        remote_temp_filename: str | None = None,
        print_output: bool = False,
        print_input: bool = False,
        **arguments: Any,
    ) -> bool:
        if isinstance(filename_or_io, str | os.PathLike):  # a file: sent as it is
            self._copy(
                "write",
                remote_filename,
                lambda: self._vm.put(Path(filename_or_io), remote_filename),
            )
            return True
        with tempfile.TemporaryDirectory(prefix="vmlease-pyinfra-") as tmp:
            local = Path(tmp) / "file"
            data = filename_or_io.read()
            local.write_bytes(data.encode() if isinstance(data, str) else data)
            self._copy("write", remote_filename, lambda: self._vm.put(local, remote_filename))
        return True

    def get_file(
        self,
        remote_filename: str,
        filename_or_io: Any,
        remote_temp_filename: str | None = None,
        print_output: bool = False,
        print_input: bool = False,
        **arguments: Any,
    ) -> bool:
        if isinstance(filename_or_io, str | os.PathLike):  # a file: written in place
            self._copy(
                "read", remote_filename, lambda: self._vm.get(remote_filename, Path(filename_or_io))
            )
            return True
        with tempfile.TemporaryDirectory(prefix="vmlease-pyinfra-") as tmp:
            local = Path(tmp) / "file"
            self._copy("read", remote_filename, lambda: self._vm.get(remote_filename, local))
            filename_or_io.write(local.read_bytes())
        return True

    def _copy(self, verb: str, remote: str, copy: Callable[[], None]) -> None:
        """Run ``copy``; a failure is the OSError pyinfra expects of a file transfer."""
        try:
            copy()
        except VMLeaseError as exc:
            raise OSError(f"cannot {verb} {remote} in VM {self._vm.name}: {exc}") from exc


def _stdin_bytes(stdin: Any) -> bytes | None:
    if stdin is None:
        return None
    if isinstance(stdin, bytes):
        return stdin
    if isinstance(stdin, str):
        return stdin.encode()
    return "\n".join(str(line) for line in stdin).encode() + b"\n"


def run_pyinfra(
    vm: VM | Sequence[VM],
    deploy: str | os.PathLike[str],
    *args: str,
    timeout_s: float = 1800.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``pyinfra -y @vmlease/NAME... DEPLOY ARGS`` against ``vm`` (or several), from
    the deploy's directory, and return what it did; a deploy that fails raises
    ``subprocess.CalledProcessError`` with pyinfra's output."""
    vms = [vm] if not isinstance(vm, Sequence) else list(vm)
    if not vms:
        raise ValueError("run_pyinfra needs at least one VM")
    targets = ",".join(f"@vmlease/{v.name}" for v in vms)
    env = {**os.environ, "VMLEASE_STATE_DIR": str(vms[0].state_dir)}
    pyinfra = Path(sys.executable).parent / "pyinfra"
    argv = [str(pyinfra) if pyinfra.exists() else "pyinfra", "-y", targets, str(deploy), *args]
    # From the deploy's directory, as pyinfra is run: relative paths in it (files.put's
    # src) are the deploy's.
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(deploy).parent,
        timeout=timeout_s,
        check=True,
    )
