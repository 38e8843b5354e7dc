"""The Debian archive this host's apt uses: its mirror and its suite, which
images are built from unless told otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["DEFAULT_MIRROR", "host_mirror", "host_suite"]

DEFAULT_MIRROR = "http://deb.debian.org/debian"


def host_mirror(apt_dir: Path = Path("/etc/apt"), env: dict[str, str] | None = None) -> str:
    """The Debian mirror this host's apt uses (its first ``.../debian`` source)."""
    env = dict(os.environ) if env is None else env
    if env.get("VMLEASE_DEBIAN_MIRROR"):
        return env["VMLEASE_DEBIAN_MIRROR"].rstrip("/")
    texts = []
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") or path.name == "sources.list":
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                continue
    for text in texts:
        for found in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = str(found).rstrip("/")
            if uri.startswith(("http://", "https://")) and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The Debian suite this host runs (``bookworm``), which a recipe's foreign
    kernel and busybox come from, as the host's own do; ``bookworm`` if unknown."""
    try:
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return "bookworm"
