"""Catalog images (``ubuntu-24.04``) on a backend that imports cloud images: where
the pinned image is, and its import the first time a VM asks for it.

A name the catalog has and the image cache lacks is imported when a VM first
asks for it, with a progress line: the download is verified against the
catalog's digest, and the first boot sets the image up with cloud-init
(``backends/qemu/_imports.py``). Names vmlease builds itself (``debian-12``)
are left to ``vmlease image build``, as before; their cloud image has a name
of its own (``debian-12-cloud``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmlease._distros import catalog, lookup, mirrored
from vmlease._errors import DownloadError, ImageImportError, ImageNotFound, UnsupportedOperation
from vmlease._spec import VMSpec
from vmlease.backends import Backend

__all__ = [
    "Checked",
    "catalog_source",
    "check_catalog",
    "check_or_import",
    "parse_checksums",
    "pinned",
]

progress = logging.getLogger("vmlease.progress")

#: The most a checksum file may hold.
_CHECKSUMS_MAX = 1 << 20
_LINE = re.compile(
    r"^(?:(?P<hex>[0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+\*?(?P<file>\S+)"
    r"|SHA(?P<bits>256|512)\s*\((?P<tagged>[^)]+)\)\s*=\s*(?P<tagged_hex>[0-9a-fA-F]+))\s*$"
)


def parse_checksums(text: str, filename: str) -> str:
    """The digest of ``filename`` in a published checksum file (``HEX  FILE``,
    ``HEX *FILE``, ``SHA256 (FILE) = HEX``, or one bare hex digest), as
    ``sha256:HEX`` or ``sha512:HEX``; ImageImportError if it is not there."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and re.fullmatch(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{128}", lines[0]):
        found = lines[0]
    else:
        found = ""
        for line in lines:
            m = _LINE.match(line)
            if m is None:
                continue
            name = m.group("file") or m.group("tagged") or ""
            if name.rsplit("/", 1)[-1] == filename:
                found = m.group("hex") or m.group("tagged_hex") or ""
                break
    if not found:
        raise ImageImportError(f"the published checksums name no {filename}")
    return f"{'sha256' if len(found) == 64 else 'sha512'}:{found.lower()}"


def _fetch_text(url: str, opener: Callable[..., Any]) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "vmlease"})  # noqa: S310 - http(s) catalog URLs only
    try:
        with opener(request, timeout=60) as response:
            return bytes(response.read(_CHECKSUMS_MAX)).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        transient = exc.code >= 500 or exc.code == 429
        raise DownloadError(f"{url} answered {exc.code} {exc.reason}", transient=transient) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url} did not answer ({exc})", transient=True) from exc


def pinned(
    name: str,
    arch: str,
    *,
    env: Mapping[str, str],
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> tuple[str, str]:
    """Where the catalog's image ``name`` for ``arch`` is (after
    ``$VMLEASE_IMAGE_MIRRORS``) and its digest; ImageImportError for a name the
    catalog lacks, or an image vmlease cannot import yet."""
    distro = lookup(name, env)
    if distro is None:
        raise ImageImportError(
            f"{name!r} is not in vmlease's catalog (it has "
            f"{', '.join(sorted(catalog(env)))}): give the image's URL or file"
        )
    if distro.built:
        raise ImageImportError(
            f"{distro.name} is built locally from the archive (`vmlease image build "
            f"{distro.name}`); its cloud image is {distro.name}-cloud: "
            f"`vmlease image import {distro.name}-cloud`"
        )
    disk = distro.disk(arch)
    url = mirrored(disk.url, env)
    if disk.digest:
        return url, disk.digest
    text = _fetch_text(mirrored(disk.checksums, env), opener)
    return url, parse_checksums(text, disk.url.rsplit("/", 1)[-1])


def catalog_source(name: str, options: dict[str, Any], *, env: Mapping[str, str]) -> str:
    """The URL of the catalog's image ``name`` for ``options["arch"]``; its digest and
    firmware go into ``options`` (``sha256``, ``firmware``) for the import."""
    url, options["sha256"] = pinned(name, options["arch"], env=env)
    distro = lookup(name, env)
    if distro is not None:
        options.setdefault("firmware", distro.boot if options["arch"] == "x86_64" else "uefi")
    return url


def check_or_import(
    backend: Backend,
    spec: VMSpec,
    do_import: Callable[..., object],
    env: Mapping[str, str],
) -> None:
    """``backend.check_spec(spec)``, after importing ``spec.image`` with
    ``do_import(name, arch=arch)`` if it is a catalog name the cache lacks."""
    if spec.networks and not backend.capabilities.networks:
        raise UnsupportedOperation(
            f"the {backend.name} backend has no private networks: leave networks out"
        )
    try:
        backend.check_spec(spec)
        return
    except ImageNotFound:
        distro = lookup(spec.image, env)
        if distro is None or distro.built:
            raise
    progress.info(
        "%s is not in the image cache yet: importing it from %s (once; later VMs use it)",
        spec.image,
        distro.title,
    )
    try:
        do_import(spec.image, arch=spec.arch)
    except UnsupportedOperation as exc:
        raise ImageNotFound(
            f"{spec.image} is not in the {backend.name} backend's image cache, and that "
            f"backend imports nothing itself: import it once with `vmlease image import "
            f"{spec.image}` (the qemu backend's cache, which {backend.name} uses)"
        ) from exc
    backend.check_spec(spec)


@dataclass(frozen=True, slots=True)
class Checked:
    """One catalog image, checked against its mirror.

    Attributes:
        name, arch: which.
        url: where it was looked for (after ``$VMLEASE_IMAGE_MIRRORS``).
        ok: it is there (and, when downloaded, matches its digest).
        detail: its size, or what is wrong.
    """

    name: str
    arch: str
    url: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "arch": self.arch,
            "url": self.url,
            "ok": self.ok,
            "detail": self.detail,
        }


def _check_one(
    url: str, digest: str, *, download: bool, opener: Callable[..., Any]
) -> tuple[bool, str]:
    method = "GET" if download else "HEAD"
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "vmlease"})  # noqa: S310 - http(s) catalog URLs only
    try:
        with opener(request, timeout=60) as response:
            size = response.headers.get("Content-Length") or "?"
            if not download:
                return True, f"there ({size} bytes)"
            algorithm, want = digest.split(":", 1)
            h = hashlib.new(algorithm)
            while chunk := response.read(1 << 20):
                h.update(chunk)
    except urllib.error.HTTPError as exc:
        return False, f"answered {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"did not answer ({getattr(exc, 'reason', exc)})"
    if h.hexdigest() != want:
        return False, f"its {algorithm} is {h.hexdigest()}, not the catalog's {want}"
    return True, f"{size} bytes, {algorithm} matches"


def check_catalog(
    names: Iterable[str] = (),
    *,
    env: Mapping[str, str],
    download: bool = False,
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> list[Checked]:
    """Each catalog image (of ``names``, or all) looked up on its mirror: there, or
    not; with ``download``, fetched whole and checked against its digest."""
    found = catalog(env)
    wanted = [lookup(n, env) for n in names] if names else list(found.values())
    unknown = [n for n, d in zip(names, wanted, strict=False) if d is None]
    if unknown:
        raise ImageImportError(f"not in vmlease's catalog: {', '.join(unknown)}")
    out = []
    for distro in wanted:
        assert distro is not None
        for arch, disk in sorted(distro.disks.items()):
            url = mirrored(disk.url, env)
            try:
                digest = disk.digest or parse_checksums(
                    _fetch_text(mirrored(disk.checksums, env), opener), disk.url.rsplit("/", 1)[-1]
                )
            except (DownloadError, ImageImportError) as exc:
                out.append(Checked(distro.name, arch, url, False, f"checksums: {exc}"))
                continue
            ok, detail = _check_one(url, digest, download=download, opener=opener)
            out.append(Checked(distro.name, arch, url, ok, detail))
    return out
