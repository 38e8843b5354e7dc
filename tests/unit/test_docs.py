"""docs/architecture.md tells the same story as the folder tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "vmlease"
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()
# Where a short name in the text may live: the repository, the package, the backends' rooms.
ROOTS = [
    REPO,
    PACKAGE,
    PACKAGE / "backends",
    PACKAGE / "backends/qemu",
    PACKAGE / "backends/guest",
    PACKAGE / "backends/guest/images",
    PACKAGE / "backends/libvirt",
]
_CITED = re.compile(
    r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|c|md|toml)|(?:tests|docs|scripts|benchmarks|examples|backends|images)/[\w./-]*)`"
)


_BARE = re.compile(r"(?<![\w`/.<-])((?:[\w-]+/)*[\w-]+\.(?:md|py|c))\b")


def _cited() -> set[str]:
    """Files the page names, in backticks or bare (``DESIGN.md``, ``_ledger.py``)."""
    return set(_CITED.findall(ARCHITECTURE)) | set(_BARE.findall(ARCHITECTURE))


def test_every_file_the_architecture_cites_is_in_this_repository() -> None:
    cited = _cited()
    assert len(cited) > 30
    missing = sorted(p for p in cited if not any((root / p).exists() for root in ROOTS))
    assert missing == []


def test_the_module_table_lists_every_module() -> None:
    table = set(re.findall(r"^\| `([\w/.]+\.py)`", ARCHITECTURE, flags=re.M))
    table |= {
        f"backends/{m}"
        for row in re.findall(r"^\| (`backends/[^|]+)\|", ARCHITECTURE, flags=re.M)
        for m in re.findall(r"`backends/([\w/.]+\.py)`", row)
    }
    modules = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert sorted(modules - table) == []
    assert sorted(table - modules) == []
