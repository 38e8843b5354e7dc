"""The example suite's only set-up: the installer under test, copied into each clean VM.

VMs come from vmlease's pytest plugin (the `vm` fixture); its summary at the
end of the run says how many were created, reused and restored, and that
nothing was left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vmlease

INSTALLER = Path(__file__).parent / "installer" / "install.sh"

# The suites that need Debian images run when named (scripts/example debian,
# scripts/example multiarch, scripts/example aptrepo); a plain run of examples/
# is the quick-start suite.
collect_ignore = ["aptrepo", "debian", "multiarch"]


@pytest.fixture
def machine(vm: vmlease.VM) -> vmlease.VM:
    """A clean VM with the installer in place."""
    vm.put(INSTALLER, "/usr/local/bin/install-hello")
    return vm
