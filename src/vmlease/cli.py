"""The ``vmlease`` command: parses arguments, calls the library, prints.

No logic lives here that the library does not offer too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vmlease._errors import ConfigError, VMLeaseError
from vmlease._inventory import inventory
from vmlease._paths import image_dir, state_dir
from vmlease._version import __version__
from vmlease.images import BUILDERS, build_tiny, list_images

__all__ = ["main"]


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_ls(args: argparse.Namespace) -> int:
    rows = inventory(state_dir(), include_gone=args.all)
    if args.json:
        print(json.dumps({"vms": [r.as_dict() for r in rows]}, indent=2))
        return 0
    if not rows:
        print("no VMs")
        return 0
    print(
        _table(
            ["NAME", "BACKEND", "STATE", "ACTUAL", "OWNER", "AGE", "SESSION"],
            [
                [
                    r.record.name,
                    r.record.backend,
                    r.record.state.value,
                    r.actual,
                    f"{r.owner.value} (pid {r.record.owner.pid})",
                    _age(r.age_s),
                    r.record.owner.session_id,
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    if args.name != "tiny":
        raise ConfigError(
            f"vmlease cannot build an image called {args.name!r}; it builds: "
            + ", ".join(sorted(BUILDERS))
        )
    image = build_tiny(
        image_dir(),
        force=args.force,
        kernel_deb=Path(args.kernel_deb) if args.kernel_deb else None,
        progress=lambda line: print(f"vmlease: {line}", file=sys.stderr, flush=True),
    )
    print(image.path)
    return 0


def cmd_image_ls(args: argparse.Namespace) -> int:
    images = list_images(image_dir())
    if args.json:
        data = [
            {
                "name": i.name,
                "build_id": i.build_id,
                "path": str(i.path),
                "size_bytes": i.size_bytes,
                **i.info,
            }
            for i in images
        ]
        print(json.dumps({"images": data}, indent=2))
        return 0
    if not images:
        print(f"no images in {image_dir()}; build one with `vmlease image build tiny`")
        return 0
    print(
        _table(
            ["NAME", "BUILD", "SIZE", "KERNEL", "PATH"],
            [
                [
                    i.name,
                    i.build_id,
                    f"{i.size_bytes / 2**20:.0f} MiB",
                    i.info.get("kernel_release", "?"),
                    str(i.path),
                ]
                for i in images
            ],
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmlease", description="Disposable virtual machines for test suites."
    )
    parser.add_argument("--version", action="version", version=f"vmlease {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list the VMs vmlease owns")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--all", action="store_true", help="include deleted VMs")
    ls.set_defaults(func=cmd_ls)

    image = sub.add_parser("image", help="build and list images")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    build = isub.add_parser("build", help="build an image (idempotent)")
    build.add_argument("name", help="the image to build: " + ", ".join(sorted(BUILDERS)))
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--kernel-deb", metavar="FILE", help="use this Debian kernel package")
    build.set_defaults(func=cmd_image_build)
    ils = isub.add_parser("ls", help="list cached images")
    ils.add_argument("--json", action="store_true", help="print JSON")
    ils.set_defaults(func=cmd_image_ls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"vmlease: error: {exc}", file=sys.stderr)
        return 2
    except VMLeaseError as exc:
        print(f"vmlease: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
