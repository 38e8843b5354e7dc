"""The image recipes vmlease knows, and finding an image with advice when it is missing.

One module per recipe beside this one (``_tiny.py``), each exporting a
``RECIPE``; adding a recipe is adding its module and its line here.
"""

from __future__ import annotations

from pathlib import Path

from vmlease._errors import ConfigError, ImageNotFound
from vmlease.backends.guest.images import _debian, _tiny
from vmlease.backends.guest.images._catalog import Image, Recipe, list_images, load_current

__all__ = ["RECIPES", "find_image", "recipe"]

#: Images vmlease can build itself, by name.
RECIPES: dict[str, Recipe] = {r.name: r for r in (_tiny.RECIPE, *_debian.RECIPES)}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; ConfigError naming those there are."""
    found = RECIPES.get(name)
    if found is None:
        raise ConfigError(
            f"vmlease cannot build an image called {name!r}; it builds: "
            + ", ".join(sorted(RECIPES))
        )
    return found


def find_image(image_dir: Path, name: str, arch: str = "x86_64") -> Image:
    """The current build of ``name`` for ``arch``; ImageNotFound saying what exists
    and how to build it."""
    try:
        return load_current(image_dir, name, arch)
    except ImageNotFound as exc:
        have = [
            i.name if i.arch == "x86_64" else f"{i.name} ({i.arch})" for i in list_images(image_dir)
        ]
        have_text = ", ".join(have) if have else "none"
        known = RECIPES.get(name)
        if known is not None and arch in known.arches:
            how = f"build it with `{known.command_for(arch)}`"
        elif known is not None:
            how = f"vmlease builds {name} for {', '.join(known.arches)} only"
        else:
            how = "vmlease can build " + ", ".join(
                f"{n} (`{r.command_for(arch)}`)"
                for n, r in sorted(RECIPES.items())
                if arch in r.arches
            )
        what = name if arch == "x86_64" else f"{name} for {arch}"
        raise ImageNotFound(
            f"no image {what!r} in {image_dir} (images there: {have_text}); {how}"
        ) from exc.__cause__
