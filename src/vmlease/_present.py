"""How the command line shows things: tables that fit the terminal, ages, and
argument types."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from typing import TypeAlias

__all__ = ["Commands", "age", "seconds", "table"]

#: The sub-command table of a parser, as ``add_subparsers`` returns it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _fit(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[: max(width - 1, 0)] + "…"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, width: int | None = None
) -> str:
    """Columns padded to their widest cell. On a terminal (or given ``width``) a table
    wider than the screen has its widest columns cut, with "…", until it fits; piped
    output keeps every cell whole, for grep and scripts."""
    if width is None and sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    if width is not None:
        least = [max(len(h), 4) for h in headers]
        while sum(widths) + 2 * (len(widths) - 1) > width:
            widest = max(range(len(widths)), key=lambda i: widths[i] - least[i])
            if widths[widest] <= least[widest]:
                break  # as narrow as it sensibly gets
            widths[widest] -= 1
    lines = ["  ".join(_fit(h, w).ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(_fit(c, w).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    return "\n".join(lines)
