"""The images VMs of both QEMU-based backends boot: the recipes vmlease builds
locally, and the image cache.

- ``_catalog.py``: the cache (``<name>/<build-id>/``, ``<name>/current``);
- ``_recipes.py``: the recipes by name, and finding an image with advice;
- ``_steps.py``: build steps recipes share (tools, the agent, root disks);
- ``_tiny.py``: the ``tiny`` recipe; each further recipe is a module beside it;
- ``_rootless.py``: building as a normal user, through a user namespace;
- ``_foreign.py``: parts for another architecture, made without running it;
- ``_mirror.py``: the Debian archive the host uses;
- ``agent.c``: the guest agent (the other end of ``backends/guest/_agent.py``);
- ``guest/``: boot scripts for the tiny image.
"""

from __future__ import annotations

from vmlease.backends.guest.images._catalog import (
    AGENT_PROTOCOL,
    Build,
    Image,
    Recipe,
    add_user,
    all_builds,
    cache_name,
    check_fits,
    list_images,
    load_build,
    load_current,
    remove_user,
    users,
)
from vmlease.backends.guest.images._debian import build_debian
from vmlease.backends.guest.images._foreign import cross_tools
from vmlease.backends.guest.images._recipes import RECIPES, find_image, recipe
from vmlease.backends.guest.images._rootless import blockers as rootless_blockers
from vmlease.backends.guest.images._rootless import remove_tree
from vmlease.backends.guest.images._tiny import build_tiny

__all__ = [
    "AGENT_PROTOCOL",
    "RECIPES",
    "Build",
    "Image",
    "Recipe",
    "add_user",
    "all_builds",
    "build_debian",
    "build_tiny",
    "cache_name",
    "check_fits",
    "cross_tools",
    "find_image",
    "list_images",
    "load_build",
    "load_current",
    "recipe",
    "remove_tree",
    "remove_user",
    "rootless_blockers",
    "users",
]
