"""testinfra over vmlease's own channel: a ``Host`` for a VM in one call.

``as_testinfra_host(vm)`` gives a testinfra ``Host`` whose commands run through
the VM's agent (``vm.run``), so it needs neither SSH nor a network in the
guest, and costs a command's round trip instead of an SSH login. Every
testinfra module works on it (``host.package``, ``host.service``,
``host.file``, ``host.socket``, ...). The pytest plugin's ``vm_host``
fixture is this for the test's ``vm``. For testinfra over SSH instead, give
testinfra the VM's ``vmlease ssh-config`` (``--ssh-config``).
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from vmlease._errors import ConfigError

if TYPE_CHECKING:
    from vmlease._vm import VM

__all__ = ["as_testinfra_host"]

#: How long one testinfra command may run in the guest, in seconds.
COMMAND_TIMEOUT_S = 600.0


def as_testinfra_host(vm: VM, *, sudo: bool = False, sudo_user: str | None = None) -> Any:
    """A testinfra ``Host`` for ``vm``; commands go through vmlease's channel.

    ``sudo``/``sudo_user`` run each command through sudo, as testinfra's own
    option does (the agent runs commands as root).
    """
    try:
        import testinfra.backend.base
        import testinfra.host
    except ImportError as exc:
        raise ConfigError(
            "as_testinfra_host needs pytest-testinfra: pip install pytest-testinfra"
        ) from exc

    class VMBackend(testinfra.backend.base.BaseBackend):  # type: ignore[misc]
        """Runs testinfra's commands with ``vm.run``."""

        NAME = "vmlease"

        def __init__(self) -> None:
            super().__init__(vm.name, sudo=sudo, sudo_user=sudo_user)

        def get_pytest_id(self) -> str:
            return f"vmlease://{vm.name}"

        def run(self, command: str, *args: str, **kwargs: Any) -> Any:
            line = self.get_command(command, *args)
            done = vm.run(["/bin/sh", "-c", line], timeout_s=COMMAND_TIMEOUT_S)
            return self.result(
                done.exit_code, self.encode(line), done.stdout_bytes, done.stderr_bytes
            )

        def __repr__(self) -> str:
            return f"<testinfra backend for VM {shlex.quote(vm.name)}>"

    backend = VMBackend()
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host
