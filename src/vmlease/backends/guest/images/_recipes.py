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


def find_image(image_dir: Path, name: str) -> Image:
    """The current build of ``name``; ImageNotFound saying what exists and how to build."""
    try:
        return load_current(image_dir, name)
    except ImageNotFound as exc:
        have = [i.name for i in list_images(image_dir)]
        have_text = ", ".join(have) if have else "none"
        known = RECIPES.get(name)
        how = (
            f"build it with `{known.command}`"
            if known
            else "vmlease can build "
            + ", ".join(f"{n} (`{r.command}`)" for n, r in sorted(RECIPES.items()))
        )
        raise ImageNotFound(
            f"no image {name!r} in {image_dir} (images there: {have_text}); {how}"
        ) from exc.__cause__
