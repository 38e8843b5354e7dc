"""What the image cache holds, and pruning it: ``vmlease image ls`` and ``image prune``.

The cache grows by a build each time an image's inputs change, by a saved
booted state per image and VM shape, and by downloaded packages. A prune
removes what no VM can use any more:

- builds that new VMs do not use (``current`` points elsewhere) and under
  which no VM's disk lies (every VM records itself in its build's ``.users``,
  whatever state directory it lives in); with ``everything``, current builds
  that no VM uses too;
- saved states whose build goes or is not current, and beyond the cap per
  image, the least recently used;
- downloaded kernel packages no remaining build came from;
- what interrupted builds and saves left, once an hour old.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from vmlease._runner import SubprocessRunner
from vmlease.backends.guest.images import Build, all_builds, remove_tree
from vmlease.backends.qemu._imports import BOOT_DIR
from vmlease.backends.qemu._processes import kill_all
from vmlease.backends.qemu._states import StateInfo, WarmCache, states_per_image_setting

__all__ = ["ImageUsage", "Removal", "prune", "usage"]

_STALE_S = 3600.0
WARM = "_warm"
DOWNLOADS = "_downloads"


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """One image in the cache: its builds and its saved states."""

    name: str
    builds: tuple[Build, ...]
    states: tuple[StateInfo, ...]

    @property
    def current(self) -> Build | None:
        return next((b for b in self.builds if b.current), None)

    @property
    def size_bytes(self) -> int:
        return sum(b.image.size_bytes for b in self.builds) + self.states_bytes

    @property
    def states_bytes(self) -> int:
        return sum(s.size_bytes for s in self.states)

    def as_dict(self) -> dict[str, object]:
        """The current build as ``image ls --json`` always showed it, then every build
        and state with what each takes."""
        current = self.current
        return {
            "name": self.name,
            **(
                {
                    "build_id": current.image.build_id,
                    "path": str(current.image.path),
                    "size_bytes": current.image.size_bytes,
                    **current.image.info,
                }
                if current is not None
                else {}
            ),
            "total_bytes": self.size_bytes,
            "builds": [
                {
                    "build_id": b.image.build_id,
                    "path": str(b.image.path),
                    "current": b.current,
                    "size_bytes": b.image.size_bytes,
                    "vms": len(b.users),
                    **b.image.info,
                }
                for b in self.builds
            ],
            "states": [
                {
                    "key": s.key,
                    "path": str(s.path),
                    "size_bytes": s.size_bytes,
                    "last_used": s.last_used,
                }
                for s in self.states
            ],
        }


def usage(image_dir: Path) -> list[ImageUsage]:
    """Every image in the cache with what its builds and saved states take."""
    builds = all_builds(image_dir)
    states = WarmCache(image_dir / WARM).states()
    names = sorted({b.image.folder for b in builds} | {s.image for s in states})
    return [
        ImageUsage(
            name,
            tuple(b for b in builds if b.image.folder == name),
            tuple(s for s in states if s.image == name),
        )
        for name in names
    ]


@dataclass(frozen=True, slots=True)
class Removal:
    """Something a prune removed (or, in a dry run, would remove).

    Attributes:
        what: ``image build``, ``booted state``, ``download`` or ``leftover``.
        name: which one (``tiny/<build-id>``, a state key, a file name).
    """

    what: str
    name: str
    path: Path
    size_bytes: int
    why: str

    def as_dict(self) -> dict[str, object]:
        return {
            "what": self.what,
            "name": self.name,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "why": self.why,
        }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def prune(
    image_dir: Path,
    *,
    dry_run: bool = False,
    everything: bool = False,
    keep_states_per_image: int | None = None,  # default: $VMLEASE_QEMU_STATES, or 6
    now: float | None = None,
) -> list[Removal]:
    """Remove what no VM can use from the cache under ``image_dir`` (see the module)."""
    now = time.time() if now is None else now
    removals: list[Removal] = []
    kept: list[Build] = []
    for build in all_builds(image_dir):
        image = build.image
        if build.users or (build.current and not everything):
            kept.append(build)
            continue
        why = "no VM uses it" if build.current else "new VMs use a newer build; no VM uses it"
        name = f"{image.folder}/{image.build_id}"
        removals.append(Removal("image build", name, image.path, _size(image.path), why))
    # States serve new VMs, which use current builds only.
    keep_paths = {str(b.image.path) for b in kept if b.current}
    warm = WarmCache(image_dir / WARM)
    cap = keep_states_per_image or states_per_image_setting(os.environ)
    for state in warm.prune(now, keep_per_image=cap, builds=keep_paths, dry_run=True):
        removals.append(
            Removal("booted state", state.name, state.path, state.size_bytes, state.why)
        )
    used_packages = {b.image.info.get("kernel_package", "") for b in kept}
    downloads = image_dir / DOWNLOADS
    for package in sorted(downloads.glob("*.deb")) if downloads.is_dir() else []:
        if package.name not in used_packages:
            removals.append(
                Removal("download", package.name, package, _size(package), "no kept build uses it")
            )
    leftovers = [image_dir.glob(f"*/{prefix}*") for prefix in (".build-", ".import-", ".current-")]
    for leftover in sorted(p for found in leftovers for p in found):
        try:
            old = now - leftover.lstat().st_mtime > _STALE_S
        except OSError:
            continue
        if old:
            removals.append(
                Removal("leftover", leftover.name, leftover, _size(leftover), "left by a build")
            )
    if not dry_run:
        _remove(removals, warm)
    return removals


def _remove(removals: list[Removal], warm: WarmCache) -> None:
    for removal in removals:
        if removal.what == "booted state" and not removal.name.startswith("."):
            warm.discard(removal.name)
        elif removal.path.is_dir() and not removal.path.is_symlink():
            # An import killed mid-boot leaves its QEMU running (it is daemonized).
            kill_all(removal.path / BOOT_DIR)
            # Moved aside first, so nothing ever sees half a build.
            doomed = removal.path.with_name(f".pruned-{removal.path.name}")
            try:
                removal.path.rename(doomed)
            except OSError:
                continue
            remove_tree(doomed, SubprocessRunner())
        else:
            removal.path.unlink(missing_ok=True)
