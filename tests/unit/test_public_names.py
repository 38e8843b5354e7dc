"""The public names: every name a package exports resolves, lazily loaded ones included."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

#: Third-party tools an integration needs: its names resolve only where the tool is installed.
OPTIONAL = {"pyinfra"}

PACKAGES = [
    "vmlease",
    "vmlease.backends",
    "vmlease.backends.qemu",
    "vmlease.backends.guest.images",
    "vmlease.testing",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves_in_a_fresh_interpreter(package: str) -> None:
    # A fresh interpreter: names loaded on first use must resolve on their own.
    probe = (
        f"import {package} as p\n"
        "def resolves(n):\n"
        "    try:\n"
        "        return hasattr(p, n)\n"
        "    except ImportError as e:\n"
        f"        return e.name in {sorted(OPTIONAL)!r}\n"
        "missing = [n for n in p.__all__ if not resolves(n)]\n"
        "assert not missing, missing\n"
        "assert len(set(p.__all__)) == len(p.__all__)\n"
        "print(len(p.__all__))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_the_package_exports_its_documented_api() -> None:
    import vmlease

    assert {
        "Session",
        "VM",
        "VMSpec",
        "VMState",
        "CommandResult",
        "RetryPolicy",
        "Timeouts",
        "Lock",
        "VMLeaseError",
        "__version__",
    } <= set(vmlease.__all__)


def test_lazily_loaded_names_are_exported_and_listed_by_dir() -> None:
    import vmlease

    lazy = set(vmlease._LAZY)
    assert lazy <= set(vmlease.__all__)
    assert lazy <= set(dir(vmlease))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_defined_where_the_package_says(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        try:
            value = getattr(module, name)
        except ImportError as exc:
            if exc.name not in OPTIONAL:
                raise
            continue
        defined_in = getattr(value, "__module__", None)
        if defined_in is not None:
            assert defined_in.startswith("vmlease"), (name, defined_in)
