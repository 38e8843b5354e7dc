"""The source of an imported image: a local file or an http(s) URL, checked to be a disk.

A download goes to a file beside its destination and becomes the destination
only once complete and matching its checksum, so a bad or partial download
is never kept. Transient failures (no answer, a reset connection, a 5xx or
429 reply, a short body) are marked ``transient`` for the caller's retry
policy; a 4xx reply is final at once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmlease._errors import ChecksumMismatch, DownloadError, ImageImportError
from vmlease._runner import Runner

__all__ = [
    "DISK_FORMATS",
    "Download",
    "Source",
    "check_digest",
    "check_sha256",
    "digest_of",
    "disk_format",
    "is_url",
    "sha256_of",
]

#: Formats ``qemu-img`` reads that an imported image may come in.
DISK_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc")
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 2.0
_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
#: Leading bytes of files people download instead of the disk inside them.
_WRAPPERS = (
    (0, b"\xfd7zXZ\x00", "compressed with xz: unpack it (`unxz FILE`) and import the disk"),
    (0, b"\x1f\x8b", "compressed with gzip: unpack it (`gunzip FILE`) and import the disk"),
    (0, b"BZh", "compressed with bzip2: unpack it (`bunzip2 FILE`) and import the disk"),
    (0, b"(\xb5/\xfd", "compressed with zstd: unpack it (`unzstd FILE`) and import the disk"),
    (257, b"ustar", "a tar archive: unpack it (`tar xf FILE`) and import the disk inside"),
)

#: Opens a URL (``urllib.request.urlopen``'s shape), injected for tests.
Opener = Callable[..., Any]


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def check_sha256(text: str | None) -> str | None:
    """``text`` as a lower-case sha256, or ImageImportError if it is not one."""
    if text is None:
        return None
    value = text.strip().lower().removeprefix("sha256:")
    if not _HEX.fullmatch(value):
        raise ImageImportError(f"--sha256 must be 64 hexadecimal digits (a SHA-256), not {text!r}")
    return value


def check_digest(text: str | None) -> str | None:
    """``text`` (a sha256 as 64 hexadecimal digits, or ``sha256:HEX``, or
    ``sha512:HEX`` as some distributions publish) as ``algorithm:hex``, or
    ImageImportError if it is none of these."""
    if text is None:
        return None
    value = text.strip().lower()
    if _HEX.fullmatch(value):
        return f"sha256:{value}"
    if not _DIGEST.fullmatch(value):
        raise ImageImportError(
            f"--sha256 must be 64 hexadecimal digits (a SHA-256), or sha256:HEX or "
            f"sha512:HEX, not {text!r}"
        )
    return value


def _algorithm(want: str | None) -> str:
    return (want or "sha256:").split(":", 1)[0]


def digest_of(path: Path, algorithm: str = "sha256") -> str:
    """``path``'s digest as ``algorithm:hex``."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def sha256_of(path: Path) -> str:
    return digest_of(path).removeprefix("sha256:")


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True, slots=True)
class Source:
    """An image's source, present as a local file: the file, and its digest
    (``sha256:HEX``, or ``sha512:HEX`` when that was asked for)."""

    path: Path
    digest: str


class Download:
    """Fetch an http(s) URL into a file, whole and verified, or not at all.

    Args:
        url: what to fetch.
        progress: called with a line now and then (size so far, rate).
        opener: opens the URL (``urllib.request.urlopen``).
        timeout_s: how long a silent connection may stay silent.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        progress: Callable[[str], None],
        opener: Opener = urllib.request.urlopen,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._say = progress
        self._open = opener
        self._timeout_s = timeout_s
        self._clock = clock

    def __call__(self, dest: Path, want: str | None) -> Source:
        """One attempt: ``dest`` holds the whole body and matches ``want`` (a digest
        as ``check_digest`` gives it, if given), or is absent.
        DownloadError(transient=...) or ChecksumMismatch."""
        want = check_digest(want)
        partial = dest.with_name(f".{dest.name}.part")
        try:
            got = self._fetch(partial, _algorithm(want))
            if want is not None and got != want:
                raise ChecksumMismatch(
                    f"{self.url} has {got}, not the {want} given: the download "
                    "is corrupt or the image has changed. Nothing was kept; check the "
                    "checksum (distributions publish SHA256SUMS beside their images)"
                )
            partial.replace(dest)
            return Source(dest, got)
        finally:
            partial.unlink(missing_ok=True)

    def _fetch(self, partial: Path, algorithm: str = "sha256") -> str:
        request = urllib.request.Request(self.url, headers={"User-Agent": "vmlease"})  # noqa: S310 - http(s) only, checked by the caller
        try:
            response = self._open(request, timeout=self._timeout_s)
        except urllib.error.HTTPError as exc:
            transient = exc.code >= 500 or exc.code == 429
            raise DownloadError(
                f"{self.url} answered {exc.code} {exc.reason}"
                + ("" if transient else ": check the URL"),
                transient=transient,
            ) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            why = getattr(exc, "reason", exc)
            raise DownloadError(f"{self.url} did not answer ({why})", transient=True) from exc
        with response:
            return self._body(response, partial, algorithm)

    def _body(self, response: BinaryIO, partial: Path, algorithm: str) -> str:
        length = response.headers.get("Content-Length")  # type: ignore[attr-defined]
        total = int(length) if length and length.isdigit() else None
        digest = hashlib.new(algorithm)
        got = 0
        started = last = self._clock()
        self._say(f"downloading {self.url}" + (f" ({_mib(total)})" if total else ""))
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadError(
                        f"the download of {self.url} broke off after {_mib(got)} ({exc})",
                        transient=True,
                    ) from exc
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                now = self._clock()
                if now - last >= _PROGRESS_EVERY_S:
                    last = now
                    rate = got / max(now - started, 1e-6)
                    of = f" of {_mib(total)}" if total else ""
                    self._say(f"downloading {self.url}: {_mib(got)}{of}, {_mib(rate)}/s")
        if total is not None and got != total:
            raise DownloadError(
                f"the download of {self.url} ended after {got} of {total} bytes",
                transient=True,
            )
        if got == 0:
            raise DownloadError(f"{self.url} answered with an empty body", transient=False)
        return f"{algorithm}:{digest.hexdigest()}"


def disk_format(path: Path, runner: Runner, shown: str) -> tuple[str, int]:
    """The disk format of ``path`` (one of DISK_FORMATS) and its virtual size in bytes;
    ImageImportError saying what ``shown`` (the source as given) is instead."""
    with path.open("rb") as f:
        head = f.read(4096)
    for offset, magic, what in _WRAPPERS:
        if head[offset : offset + len(magic)] == magic:
            raise ImageImportError(f"{shown} is not a disk image: it is {what}")
    done = runner(["qemu-img", "info", "--output=json", "--", str(path)], timeout_s=60.0)
    if done.returncode != 0:
        raise ImageImportError(
            f"{shown} is not a disk image qemu-img can read: {done.stderr.strip()[-500:]}"
        )
    info = json.loads(done.stdout)
    fmt = str(info.get("format", ""))
    size = int(info.get("virtual-size", 0))
    if fmt not in DISK_FORMATS:
        raise ImageImportError(
            f"{shown} is a {fmt or 'unknown'} file, not a disk image vmlease imports "
            f"({', '.join(DISK_FORMATS)})"
        )
    # qemu-img takes any file for raw: a raw disk must start with a partition table.
    if fmt == "raw" and head[510:512] != b"\x55\xaa" and head[512:520] != b"EFI PART":
        raise ImageImportError(
            f"{shown} is not a disk image: it has no partition table (no MBR or GPT). "
            "Import the qcow2 or raw disk a distribution publishes for clouds"
        )
    if size < 2**20:
        raise ImageImportError(f"{shown} is not a disk image: its disk holds {size} bytes")
    return fmt, size
