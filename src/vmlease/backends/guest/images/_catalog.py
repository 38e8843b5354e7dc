"""The image cache: which images are built, and where their parts are.

Layout under the image directory::

    <name>/<build-id>/manifest.json   one build, never changed once complete
    <name>/<build-id>/.users/<id>     a link to each VM directory whose disk
                                      is an overlay on this build
    <name>/current -> <build-id>      the build new VMs use

A rebuild writes a new build directory and then swings ``current``, so VMs
whose disks are overlays on an older build keep working. An image for another
architecture than x86_64 lives under ``<name>@<arch>/`` (``tiny@aarch64``);
image names hold no "@", so the two never meet.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmlease._errors import ConfigError, ImageNotFound, InvalidSpec
from vmlease._paths import give_to_sudo_user
from vmlease._spec import Network, VMSpec, debian_arch

__all__ = [
    "AGENT_PROTOCOL",
    "Build",
    "Image",
    "Recipe",
    "add_user",
    "all_builds",
    "cache_name",
    "check_fits",
    "list_images",
    "load_build",
    "load_current",
    "remove_user",
    "users",
]

_USERS = ".users"


#: The protocol of the agent built from ``agent.c``, as images record it in
#: ``info["agent_protocol"]``. From 2 on, the agent serves a second port, for
#: processes other than the VM's owner; from 3 on, it understands WAKE; from 4
#: on, NET.
AGENT_PROTOCOL = "4"


@dataclass(frozen=True, slots=True)
class Image:
    """A built image.

    Attributes:
        name: the image name (``tiny``).
        build_id: the build this is.
        path: the build directory.
        kernel: a PVH-bootable uncompressed kernel.
        initrd: the stage-1 initramfs.
        disk: the base disk (qcow2) that VM disks are overlays on.
        cmdline: kernel command line common to every VM of this image.
        min_memory_mb: the least memory a VM of this image boots with.
        tcg_cpu: the CPU model to emulate without KVM (``-cpu``); the simplest
            one the image's programs run on is the fastest to emulate.
        size_bytes: bytes the build takes on disk.
        info: what it was built from (kernel package, busybox, agent version).
        ready: a command that exits 0 once a booted guest is up (systemd running,
            sshd listening); empty when the agent answering is enough.
        network: the network its VMs get unless they ask for another.
        ssh_user: the user vmlease's key is authorized for, if the image runs an
            SSH server ("" if it does not).
        disk_bytes: the root disk's size (0 if the manifest does not say).
        grow_root: a command that grows the root file system to its disk's size
            (empty if the image cannot).
        boot: ``pvh`` (vmlease's kernel and initramfs, ``-M microvm``) or
            ``firmware`` (an imported image's own boot loader and kernel,
            ``-M q35``); ``kernel``, ``initrd`` and ``cmdline`` matter for ``pvh`` only.
        arch: the architecture its programs are built for (``x86_64``, ``aarch64``).
        firmware: what a ``firmware`` image boots through: ``bios`` or ``uefi``
            (every arm64 one is ``uefi``).
    """

    name: str
    build_id: str
    path: Path
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str
    min_memory_mb: int
    tcg_cpu: str
    size_bytes: int
    info: dict[str, str]
    ready: tuple[str, ...] = ()
    network: Network = Network.NONE
    ssh_user: str = ""
    disk_bytes: int = 0
    grow_root: tuple[str, ...] = ()
    boot: str = "pvh"
    arch: str = "x86_64"
    firmware: str = "bios"

    @property
    def folder(self) -> str:
        """Its folder in the cache, which tells it from the same image for another
        architecture: ``tiny``, ``tiny@aarch64`` (see ``cache_name``)."""
        return cache_name(self.name, self.arch)

    @property
    def serves_visitors(self) -> bool:
        """Whether the image's agent serves the second port (an image made by an
        older vmlease, or imported with an agent of its own, may not)."""
        try:
            return int(self.info.get("agent_protocol", "1")) >= 2
        except ValueError:
            return False


def _load(build: Path) -> Image:
    data = json.loads((build / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in build.iterdir() if p.is_file())
    return Image(
        name=data["name"],
        build_id=data["build_id"],
        path=build,
        kernel=build / data["kernel"],
        initrd=build / data["initrd"],
        disk=build / data["disk"],
        cmdline=data["cmdline"],
        min_memory_mb=int(data["min_memory_mb"]),
        tcg_cpu=str(data.get("tcg_cpu", "max")),
        size_bytes=size,
        info={str(k): str(v) for k, v in data.get("info", {}).items()},
        ready=tuple(str(a) for a in data.get("ready", ())),
        network=Network(data.get("network", "none")),
        ssh_user=str(data.get("ssh_user", "")),
        disk_bytes=int(data.get("disk_bytes", 0)),
        grow_root=tuple(str(a) for a in data.get("grow_root", ())),
        boot=str(data.get("boot", "pvh")),
        arch=str(data.get("arch", "x86_64")),
        firmware=str(data.get("firmware", "bios")),
    )


def load_build(build: Path) -> Image:
    """The build in directory ``build`` (a VM's record names it)."""
    return _load(build)


@dataclass(frozen=True, slots=True)
class Build:
    """One build of an image in the cache, current or not.

    Attributes:
        image: the image it is a build of.
        current: whether new VMs use it.
        users: VM directories whose disks are overlays on it (they still exist).
    """

    image: Image
    current: bool
    users: tuple[Path, ...]


def _user_link(build: Path, vm_dir: Path) -> Path:
    digest = hashlib.sha256(str(vm_dir).encode()).hexdigest()[:20]
    return build / _USERS / digest


def add_user(build: Path, vm_dir: Path) -> None:
    """Record that the VM in ``vm_dir`` has a disk on ``build`` (so no prune removes it)."""
    link = _user_link(build, vm_dir)
    try:
        link.parent.mkdir(mode=0o700, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(vm_dir)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot record a VM in {link.parent}: {exc.strerror}. The image cache "
            f"{build.parent.parent} holds builds of uid {build.stat().st_uid}, not yours "
            f"(built with sudo, without -E?): run `sudo chown -R {os.getuid()}: "
            f"{build.parent.parent}`, or set VMLEASE_IMAGE_DIR to a folder of your own"
        ) from exc


def remove_user(build: Path, vm_dir: Path) -> None:
    """The VM in ``vm_dir`` is gone: ``build`` no longer serves it."""
    _user_link(build, vm_dir).unlink(missing_ok=True)


def users(build: Path) -> tuple[Path, ...]:
    """VM directories that use ``build`` and still exist (a link to a gone one is ignored)."""
    folder = build / _USERS
    links = sorted(folder.iterdir()) if folder.is_dir() else []
    return tuple(t for t in (link.readlink() for link in links) if (t / "vm.json").is_file())


def all_builds(image_dir: Path) -> list[Build]:
    """Every complete build in the cache, by image name and age (newest first)."""
    found = []
    for entry in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if entry.name.startswith((".", "_")) or not entry.is_dir():
            continue
        try:
            current = (entry / "current").resolve(strict=True)
        except OSError:
            current = None
        builds = []
        for build in entry.iterdir():
            if not (build / "manifest.json").is_file() or build.is_symlink():
                continue
            try:
                image = _load(build)
            except (OSError, ValueError, KeyError):
                continue
            builds.append(Build(image, build == current, users(build)))
        # Newest first, by when the build was finished (its manifest is written last).
        builds.sort(key=lambda b: (b.image.path / "manifest.json").stat().st_mtime, reverse=True)
        found += builds
    return found


def cache_name(name: str, arch: str = "x86_64") -> str:
    """The folder of image ``name`` for ``arch`` in the cache: ``tiny``, ``tiny@aarch64``."""
    return name if arch == "x86_64" else f"{name}@{arch}"


def load_current(image_dir: Path, name: str, arch: str = "x86_64") -> Image:
    """The current build of ``name`` for ``arch``; ImageNotFound (without advice) if
    there is none."""
    try:
        return _load((image_dir / cache_name(name, arch) / "current").resolve(strict=True))
    except (OSError, ValueError, KeyError) as exc:
        what = name if arch == "x86_64" else f"{name} for {arch}"
        raise ImageNotFound(f"no image {what!r} in {image_dir}") from exc


def list_images(image_dir: Path) -> list[Image]:
    """Every image with a complete current build, by name (each architecture's)."""
    found = []
    if image_dir.is_dir():
        for entry in sorted(image_dir.iterdir()):
            current = entry / "current"
            try:
                found.append(_load(current.resolve(strict=True)))
            except (OSError, ValueError, KeyError):
                continue
    return found


@dataclass(frozen=True, slots=True)
class Recipe:
    """An image vmlease can build itself (``vmlease image build NAME``).

    Attributes:
        name: the image's name.
        summary: one line saying what it is.
        build: ``build(image_dir, *, arch, force=False, progress=None, runner=None)``
            builds it (or finds it up to date) and returns it.
        arches: the architectures it can be built for.
    """

    name: str
    summary: str
    build: Callable[..., Image]
    arches: tuple[str, ...] = ("x86_64",)

    def command_for(self, arch: str = "x86_64") -> str:
        """The command that builds it for ``arch``."""
        tail = "" if arch == "x86_64" else f" --arch {debian_arch(arch)}"
        return f"vmlease image build {self.name}{tail}"

    @property
    def command(self) -> str:
        return self.command_for()

    def __call__(self, image_dir: Path, **options: Any) -> Image:
        arch = options.get("arch", "x86_64")
        if arch not in self.arches:
            raise ConfigError(
                f"vmlease cannot build the {self.name} image for {arch}; it builds it for "
                + ", ".join(self.arches)
            )
        try:
            return self.build(image_dir, **options)
        finally:
            give_to_sudo_user(image_dir)


def check_fits(image: Image, spec: VMSpec) -> None:
    """InvalidSpec if ``spec`` asks ``image`` for what it cannot give: less memory
    than it needs, an SSH user without an SSH server, a disk it cannot grow into."""
    if spec.memory_mb < image.min_memory_mb:
        raise InvalidSpec(
            f"memory_mb={spec.memory_mb} is too little for image {spec.image!r}: "
            f"it needs at least {image.min_memory_mb}"
        )
    if spec.user is not None and not image.ssh_user:
        raise InvalidSpec(
            f"image {spec.image!r} runs no SSH server, so user={spec.user!r} means "
            "nothing there: leave user out"
        )
    if spec.disk_gb is not None:
        if not image.grow_root:
            raise InvalidSpec(
                f"image {spec.image!r} cannot grow its root file system: leave disk_gb "
                "out, or use an image that can (debian-12, debian-13)"
            )
        if spec.disk_gb * 2**30 < image.disk_bytes:
            raise InvalidSpec(
                f"disk_gb={spec.disk_gb} is smaller than the {spec.image} image's disk "
                f"({image.disk_bytes / 2**30:g} GiB): give at least that"
            )
