"""Importing vmlease (pytest does it for the plugin in every run) loads none of
the machinery that makes VMs; that loads when it is first used."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = {"vmlease._session", "vmlease._ledger", "vmlease._testrun", "sqlite3"}


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


def test_importing_the_package_and_plugin_loads_no_machinery() -> None:
    assert not _loaded_after("import vmlease") & (HEAVY | {"importlib.metadata"})
    assert not _loaded_after("import vmlease.pytest_plugin") & HEAVY


def test_the_public_names_load_on_first_use() -> None:
    loaded = _loaded_after("import vmlease\nvmlease.Session\nvmlease.VMState")
    assert {"vmlease._session", "vmlease._ledger"} <= loaded


def test_an_unknown_name_is_an_attribute_error() -> None:
    import vmlease

    with pytest.raises(AttributeError, match="NoSuchThing"):
        vmlease.NoSuchThing  # noqa: B018


def test_the_command_loads_what_its_subcommand_needs_when_it_runs() -> None:
    loaded = _loaded_after("import vmlease.cli\nvmlease.cli.build_parser(for_images=False)")
    assert not loaded & (HEAVY | {"vmlease.backends", "vmlease._cleanup", "vmlease._inventory"})
