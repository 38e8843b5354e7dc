"""Distribution images by name: one catalog, meaning the same on every backend.

A name (``ubuntu-22.04``) stands for one release of one distribution. Each
backend reads it its own way:

- QEMU and libvirt: the distribution's official cloud image for the VM's
  architecture, pinned here by URL and digest (taken from the distribution's
  published checksums, as Lima's templates record them), imported on first
  use; ``debian-12`` and ``debian-13`` are built locally from the archive
  instead, and ``debian-12-cloud`` is the distribution's cloud image;
- OrbStack: its own image of that release (``ubuntu:jammy``);
- Multipass: its own image where it has one (Ubuntu only).

The seeds' spelling ``ubuntu:22.04`` (and OrbStack's ``ubuntu:jammy``) is an
alias. ``$VMLEASE_CATALOG`` names a JSON file of entries of one's own, laid
over these (a pinned image of another release, an internal distribution, a
mirror's URLs); ``$VMLEASE_IMAGE_MIRRORS`` rewrites URL prefixes
(``https://cloud-images.ubuntu.com/=http://mirror.example/ubuntu/``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmlease._errors import ConfigError, InvalidSpec

__all__ = [
    "CATALOG",
    "Disk",
    "Distro",
    "canonical",
    "catalog",
    "lookup",
    "mirrored",
]

_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


@dataclass(frozen=True, slots=True)
class Disk:
    """One architecture's cloud image of a release.

    Attributes:
        url: where the distribution publishes it.
        digest: ``sha256:HEX`` or ``sha512:HEX``, from the distribution's
            checksums; empty where the entry names ``checksums`` instead.
        checksums: a checksum file published beside the image (``.sha256``),
            read at import time, for a release whose image is replaced in place.
    """

    url: str
    digest: str = ""
    checksums: str = ""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"a catalog image's url must be http(s), not {self.url!r}")
        if self.digest and not _DIGEST.fullmatch(self.digest):
            raise ConfigError(
                f"a catalog image's digest is sha256:HEX or sha512:HEX, not {self.digest!r}"
            )
        if not self.digest and not self.checksums:
            raise ConfigError(f"catalog image {self.url} has neither a digest nor checksums")


@dataclass(frozen=True, slots=True)
class Distro:
    """A release of a distribution, by name.

    Attributes:
        name: the name tests use (``ubuntu-22.04``).
        title: what it is, for people.
        disks: its cloud image per architecture (``x86_64``, ``aarch64``).
        orbstack: OrbStack's image (``ubuntu:jammy``), if it has one.
        multipass: Multipass's image (``22.04``), if it has one.
        init: ``systemd`` or ``openrc``: how readiness and ``wait_for_unit`` apply.
        boot: ``bios`` or ``uefi``: the firmware its x86_64 image boots through
            (arm64 images boot through UEFI).
        built: vmlease builds an image of this name itself (``debian-12``): the
            cloud image is used only when imported by name.
        aliases: other spellings (``ubuntu:22.04``, ``ubuntu:jammy``).
    """

    name: str
    title: str
    disks: Mapping[str, Disk]
    orbstack: str | None = None
    multipass: str | None = None
    init: str = "systemd"
    boot: str = "bios"
    built: bool = False
    aliases: tuple[str, ...] = field(default=())

    def disk(self, arch: str) -> Disk:
        """Its image for ``arch``; InvalidSpec naming those there are."""
        found = self.disks.get(arch)
        if found is None:
            raise InvalidSpec(
                f"{self.name} has no cloud image for {arch} in vmlease's catalog; it has "
                + ", ".join(sorted(self.disks))
            )
        return found


def _ubuntu(version: str, code: str, release: str, amd64: str, arm64: str) -> Distro:
    base = f"https://cloud-images.ubuntu.com/releases/{code}/release-{release}"
    image = f"ubuntu-{version}-server-cloudimg"
    return Distro(
        name=f"ubuntu-{version}",
        title=f"Ubuntu {version} LTS ({code})",
        disks={
            "x86_64": Disk(f"{base}/{image}-amd64.img", f"sha256:{amd64}"),
            "aarch64": Disk(f"{base}/{image}-arm64.img", f"sha256:{arm64}"),
        },
        orbstack=f"ubuntu:{code}",
        multipass=version,
        aliases=(f"ubuntu:{version}", f"ubuntu:{code}"),
    )


def _debian(version: str, code: str, release: str, amd64: str, arm64: str) -> tuple[Distro, ...]:
    """``debian-N``, which vmlease builds from the archive, and ``debian-N-cloud``,
    the distribution's genericcloud image of the same release."""
    base = f"https://cloud.debian.org/images/cloud/{code}/{release}"
    disks = {
        "x86_64": Disk(
            f"{base}/debian-{version}-genericcloud-amd64-{release}.qcow2", f"sha512:{amd64}"
        ),
        "aarch64": Disk(
            f"{base}/debian-{version}-genericcloud-arm64-{release}.qcow2", f"sha512:{arm64}"
        ),
    }
    title = f"Debian {version} ({code})"
    return (
        Distro(
            name=f"debian-{version}",
            title=title,
            disks=disks,
            orbstack=f"debian:{code}",
            built=True,
            aliases=(f"debian:{version}", f"debian:{code}"),
        ),
        Distro(
            name=f"debian-{version}-cloud",
            title=f"{title}, the genericcloud image",
            disks=disks,
            orbstack=f"debian:{code}",
        ),
    )


def _rhel_like(
    name: str, title: str, base: str, stem: str, amd64: str, arm64: str, orbstack: str
) -> Distro:
    return Distro(
        name=name,
        title=title,
        disks={
            "x86_64": Disk(f"{base}/x86_64/images/{stem}.x86_64.qcow2", f"sha256:{amd64}"),
            "aarch64": Disk(f"{base}/aarch64/images/{stem}.aarch64.qcow2", f"sha256:{arm64}"),
        },
        orbstack=orbstack,
        aliases=(orbstack,),
    )


_FEDORA = "https://download.fedoraproject.org/pub/fedora/linux/releases/44/Cloud"
_LEAP = "https://download.opensuse.org/distribution/leap/15.6/appliances"
_ALPINE = "https://dl-cdn.alpinelinux.org/alpine/v3.23/releases/cloud"

#: The catalog vmlease ships, by name (digests as of July 2026).
CATALOG: dict[str, Distro] = {
    d.name: d
    for d in (
        _ubuntu(
            "22.04",
            "jammy",
            "20260705",
            "ec3cdc1bf496078f645ccc8ac823e17609658753477ebc4e5fb730729ac5b434",
            "9c2ddc65079f9a285ca7c9efabdee6d58ff7dd2b08a130114426d2020506db7a",
        ),
        _ubuntu(
            "24.04",
            "noble",
            "20260705",
            "ffe6203da54deeb6db5d2a98a83f9ec8e55f149d3f7ba622e1abe5fa966ee3d6",
            "7df0201546f75b8bcc1044594c806c35749421ad3c9bc1be2a3ab806cfae39cc",
        ),
        *_debian(
            "12",
            "bookworm",
            "20260712-2537",
            "6c2607f1846ee86040830c87d0b723f0967da3e884ea4673d9db4aa8eee13a4b"
            "7c663524bfa42082c16fc6919f3aa1bf425c004d07ff06c53a319ad0c42647bb",
            "52eb678130e85a9bf9f3cf4f7181e060fa60a5db45373717474c5ff9305645c5"
            "e6cab8b05ca042bcfa7921d2ca29cf9fd2e815f75abe2d168557ad7207af127b",
        ),
        *_debian(
            "13",
            "trixie",
            "20260712-2537",
            "7ae53e9dbee282bfc16f289dec483dde3a8598769c38a267948310f7a2a52c66"
            "2620198603bc52c142627efba379863d16079698a10b34102d55bcedd40e8d32",
            "8543d795f2fde630eb66c492f245a8c1da19dedc636e0a8e7b3d0f95920e1a05"
            "aa911ef2d82d177d41cc53ced5fccbd2a3945d07fa5e15018914c4d864bb07ed",
        ),
        Distro(
            name="fedora-44",
            title="Fedora 44 Cloud Base",
            disks={
                "x86_64": Disk(
                    f"{_FEDORA}/x86_64/images/Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2",
                    "sha256:28680fe5b371a5a82ebf43a31926e086a168e59949d03969c5093e7071f90b7f",
                ),
                "aarch64": Disk(
                    f"{_FEDORA}/aarch64/images/Fedora-Cloud-Base-Generic-44-1.7.aarch64.qcow2",
                    "sha256:55c60a3b80d3616a08705afd0459e75fe9f03c54aba7a46e4002a41a72fa0d5b",
                ),
            },
            orbstack="fedora:44",
            aliases=("fedora:44",),
        ),
        _rhel_like(
            "rocky-9",
            "Rocky Linux 9.8",
            "https://dl.rockylinux.org/pub/rocky/9.8/images",
            "Rocky-9-GenericCloud-Base-9.8-20260525.0",
            "92c206cc6f790c61583247eefe87890f8828420662c17cacf247cec78ab4eec8",
            "24692a444f1f0b8bb95375c38c8b43f8099a115347623691be2c330b40c8a1fe",
            "rocky:9",
        ),
        _rhel_like(
            "almalinux-9",
            "AlmaLinux 9.8",
            "https://repo.almalinux.org/almalinux/9.8/cloud",
            "AlmaLinux-9-GenericCloud-9.8-20260526",
            "c397eed7023e92c841155831b1f47e26300e5bef0f0256c129322307c897a251",
            "b5d883c5f84c68a9828fbd3aac863f9a723b43f8965a32ff7a1c198301f42a29",
            "alma:9",
        ),
        Distro(
            name="opensuse-leap-15.6",
            title="openSUSE Leap 15.6 (Minimal VM, Cloud)",
            # The image is replaced in place at each update: its digest is read from
            # the checksum file published beside it.
            disks={
                arch: Disk(
                    f"{_LEAP}/openSUSE-Leap-15.6-Minimal-VM.{arch}-Cloud.qcow2",
                    checksums=f"{_LEAP}/openSUSE-Leap-15.6-Minimal-VM.{arch}-Cloud.qcow2.sha256",
                )
                for arch in ("x86_64", "aarch64")
            },
            orbstack="opensuse:15.6",
            aliases=("opensuse-leap:15.6", "opensuse:15.6"),
        ),
        Distro(
            name="archlinux",
            title="Arch Linux (cloud image; x86_64 only: Arch publishes none for arm64)",
            disks={
                "x86_64": Disk(
                    "https://geo.mirror.pkgbuild.com/images/v20260715.556894/"
                    "Arch-Linux-x86_64-cloudimg-20260715.556894.qcow2",
                    "sha256:f419d4e29aebfc017ad4c9de330a3be0d7eefba710b269108b116aaca1122926",
                ),
            },
            orbstack="arch",
            aliases=("arch", "archlinux:latest"),
        ),
        Distro(
            name="alpine-3.23",
            title="Alpine Linux 3.23 (cloud-init, OpenRC, UEFI)",
            disks={
                "x86_64": Disk(
                    f"{_ALPINE}/nocloud_alpine-3.23.4-x86_64-uefi-cloudinit-r0.qcow2",
                    "sha512:849196e26640b33fb1f106d46cebdf341c715f7f49363564eacece8097464b6a"
                    "f7041618e94c4eb1a006394663252a86c0fb3158fee5d0ffb094899730679a71",
                ),
                "aarch64": Disk(
                    f"{_ALPINE}/nocloud_alpine-3.23.4-aarch64-uefi-cloudinit-r0.qcow2",
                    "sha512:737b0eb365944ffcf6da477c059c105bbde222942fd5a8380c07db088365b18d"
                    "bc60a0f2824ea9a3904d57e194e0d05a7074302c3ebc104d0aecb6ddc6ffd91c",
                ),
            },
            orbstack="alpine:3.23",
            init="openrc",
            boot="uefi",
            aliases=("alpine:3.23",),
        ),
    )
}


def _from_json(name: str, data: object, where: str) -> Distro:
    if not isinstance(data, dict) or not isinstance(data.get("disks"), dict):
        raise ConfigError(f"{where}: entry {name!r} must be an object with 'disks'")
    try:
        disks = {str(arch): Disk(**disk) for arch, disk in data["disks"].items()}
        fields = {k: v for k, v in data.items() if k not in ("disks", "aliases")}
        return Distro(
            name=name,
            title=str(fields.pop("title", name)),
            disks=disks,
            aliases=tuple(str(a) for a in data.get("aliases", ())),
            **fields,
        )
    except TypeError as exc:
        raise ConfigError(f"{where}: entry {name!r}: {exc}") from None


def catalog(env: Mapping[str, str] | None = None) -> dict[str, Distro]:
    """The catalog: vmlease's, with the entries of ``$VMLEASE_CATALOG`` laid over it."""
    env = os.environ if env is None else env
    path = env.get("VMLEASE_CATALOG")
    if not path:
        return dict(CATALOG)
    try:
        stamp = Path(path).stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(f"VMLEASE_CATALOG={path}: cannot read it as JSON ({exc})") from None
    return dict(_with_file(path, stamp))


@functools.lru_cache(maxsize=8)
def _with_file(path: str, stamp: int) -> dict[str, Distro]:
    """The catalog with the entries of the file ``path`` as it was at ``stamp`` (its
    modification time): read once, since every spec made asks for aliases."""
    del stamp  # part of the cache's key only
    found = dict(CATALOG)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"VMLEASE_CATALOG={path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"VMLEASE_CATALOG={path}: must be an object of entries by name")
    for name, entry in data.items():
        found[str(name)] = _from_json(str(name), entry, f"VMLEASE_CATALOG={path}")
    return found


def canonical(image: str, env: Mapping[str, str] | None = None) -> str:
    """The catalog's name for ``image`` if it is an alias of one (``ubuntu:22.04``
    is ``ubuntu-22.04``); else ``image`` as it is."""
    for distro in catalog(env).values():
        if image in distro.aliases:
            return distro.name
    return image


def lookup(image: str, env: Mapping[str, str] | None = None) -> Distro | None:
    """The catalog's entry for ``image`` (a name or an alias), if it has one."""
    return catalog(env).get(canonical(image, env))


def mirrored(url: str, env: Mapping[str, str] | None = None) -> str:
    """``url`` with the first matching prefix of ``$VMLEASE_IMAGE_MIRRORS``
    (``PREFIX=REPLACEMENT,...``) replaced."""
    env = os.environ if env is None else env
    for pair in filter(None, (p.strip() for p in env.get("VMLEASE_IMAGE_MIRRORS", "").split(","))):
        prefix, sep, replacement = pair.partition("=")
        if not sep or not prefix:
            raise ConfigError(f"VMLEASE_IMAGE_MIRRORS takes PREFIX=REPLACEMENT pairs, not {pair!r}")
        if url.startswith(prefix):
            return replacement + url[len(prefix) :]
    return url
