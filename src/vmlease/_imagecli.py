"""``vmlease image``: build, import, list and prune images."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vmlease._errors import ConfigError
from vmlease._paths import image_dir, megabytes
from vmlease._present import Commands, seconds, table

if TYPE_CHECKING:
    from vmlease.backends import Backend

__all__ = ["add_image_commands"]


def cmd_image_build(args: argparse.Namespace) -> int:
    from vmlease._progress import Progress
    from vmlease._spec import parse_arch
    from vmlease.backends.guest.images import recipe

    build = recipe(args.name)
    options: dict[str, object] = {"force": args.force, "arch": parse_arch(args.arch)}
    if args.kernel_deb:
        options["kernel_deb"] = Path(args.kernel_deb)
    with Progress(sys.stderr) as progress:  # live on a terminal, plain lines in logs
        image = build(image_dir(), progress=progress, **options)
    print(image.path)
    return 0


def cmd_image_import(args: argparse.Namespace) -> int:
    from vmlease._progress import Progress
    from vmlease._retry import RetryPolicy
    from vmlease._session import Session

    if args.source is None and args.sha256:
        raise ConfigError("--sha256 goes with a SOURCE: a catalog name brings its own digest")
    options = {"sha256": args.sha256} if args.source is not None else {}
    if args.firmware:
        options["firmware"] = args.firmware
    policy = RetryPolicy.parse(os.environ.get("VMLEASE_RETRY", ""))
    with Session(backend="qemu", retry=policy) as session, Progress(sys.stderr) as progress:
        path = session.import_image(
            args.name,
            args.source,
            arch=args.arch,
            progress=progress,
            **options,
            user=args.user,
            user_data_file=Path(args.user_data) if args.user_data else None,
            seed=not args.no_seed,
            force=args.force,
            timeout_s=args.timeout,
        )
    print(path)
    return 0


def cmd_image_catalog(args: argparse.Namespace) -> int:
    from vmlease._distros import catalog
    from vmlease._named import check_catalog

    if args.check or args.verify:
        checked = check_catalog(args.names, env=os.environ, download=args.verify)
        if args.json:
            print(json.dumps({"checked": [c.as_dict() for c in checked]}, indent=2))
        else:
            for c in checked:
                print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name} {c.arch}: {c.url}: {c.detail}")
        return 0 if all(c.ok for c in checked) else 1
    entries = catalog(os.environ)
    if args.json:
        out = {
            n: {"title": d.title, "arches": sorted(d.disks), "orbstack": d.orbstack,
                "multipass": d.multipass, "aliases": list(d.aliases), "built": d.built}
            for n, d in entries.items()
        }  # fmt: skip
        print(json.dumps({"catalog": out}, indent=2))
        return 0
    rows = [
        [n, ", ".join(sorted(d.disks)), d.orbstack or "-", d.multipass or "-",
         "built here" if d.built else "imported", d.title]
        for n, d in sorted(entries.items())
    ]  # fmt: skip
    print(table(["NAME", "ARCHES", "ORBSTACK", "MULTIPASS", "QEMU/LIBVIRT", "WHAT"], rows))
    return 0


def _cache() -> Backend:
    """The backend whose image cache ``vmlease image`` looks after (QEMU's, which
    the libvirt backend uploads from)."""
    from vmlease.backends import get

    return get("qemu")


def _n(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) else 0


def _items(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def cmd_image_ls(args: argparse.Namespace) -> int:
    images = _cache().image_usage()
    if args.json:
        print(json.dumps({"images": images}, indent=2))
        return 0
    if not images:
        print(f"no images in {image_dir()}; build one with `vmlease image build tiny`")
        return 0
    rows = []
    for i in images:
        builds, states = _items(i["builds"]), _items(i["states"])
        older = [b for b in builds if not b["current"]]
        rows.append(
            [
                str(i["name"]),
                str(i.get("build_id", "-")),
                megabytes(_n(i["size_bytes"])) if "build_id" in i else "-",
                f"{len(older)} ({megabytes(sum(_n(b['size_bytes']) for b in older))})",
                f"{len(states)} ({megabytes(sum(_n(s['size_bytes']) for s in states))})",
                str(sum(_n(b["vms"]) for b in builds)),
                megabytes(_n(i["total_bytes"])),
            ]
        )
    print(table(["NAME", "BUILD", "SIZE", "OLDER BUILDS", "SAVED STATES", "VMS", "TOTAL"], rows))
    print(f"in {image_dir()}; `vmlease image prune` removes what no VM can use")
    return 0


def cmd_image_prune(args: argparse.Namespace) -> int:
    removed = _cache().prune_images(dry_run=args.dry_run, everything=args.all)
    freed = megabytes(sum(_n(r["size_bytes"]) for r in removed))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": removed}))
        return 0
    if not removed:
        print("nothing to prune")
        return 0
    print(
        table(
            ["WHAT", "NAME", "SIZE", "WHY"],
            [
                [str(r["what"]), str(r["name"]), megabytes(_n(r["size_bytes"])), str(r["why"])]
                for r in removed
            ],
        )
    )
    print(f"{'would free' if args.dry_run else 'freed'} {freed}")
    return 0


def _recipes_help() -> str:
    from vmlease.backends.guest.images import RECIPES

    return "; ".join(f"{r.name} ({r.summary})" for r in RECIPES.values())


def add_image_commands(sub: Commands, *, for_images: bool) -> None:
    """``vmlease image build|import|ls|prune`` on the top parser's ``sub``."""
    image = sub.add_parser("image", help="build and list images")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    build = isub.add_parser("build", help="build an image (idempotent)")
    build.add_argument(
        "name",
        help="the image to build: "
        + (_recipes_help() if for_images else "see `vmlease image build --help`"),
    )
    build.add_argument(
        "--arch",
        help="the architecture to build it for: x86_64 (amd64) or aarch64 (arm64); "
        "default this machine's",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--kernel-deb", metavar="FILE", help="use this Debian kernel package")
    build.set_defaults(func=cmd_image_build)
    imp = isub.add_parser(
        "import",
        help="import a cloud image (qcow2 or raw, a file or an http(s) URL)",
        description="Imports a distribution's cloud image: downloads it (when SOURCE is a "
        "URL) and checks it against --sha256, boots it once with a cloud-init seed that "
        "creates the SSH user and installs the vmlease agent, waits for cloud-init to "
        "finish, and keeps the result as image NAME. Its VMs never run cloud-init again. "
        "Idempotent: the same source and options find the image up to date.",
    )
    imp.add_argument(
        "name",
        help="the image's name (what VMs ask for: image=NAME); without SOURCE, a name "
        "in vmlease's catalog (ubuntu-22.04, ubuntu-24.04, debian-12, fedora-44, ...)",
    )
    imp.add_argument(
        "source",
        nargs="?",
        help="a local qcow2 or raw disk, or an http(s) URL to one; default the catalog's "
        "pinned image of NAME",
    )
    imp.add_argument(
        "--sha256",
        metavar="HEX",
        help="the source's SHA-256 (or sha512:HEX); a mismatch keeps nothing",
    )
    imp.add_argument(
        "--arch",
        help="the image's architecture: x86_64 (amd64) or aarch64 (arm64); default this machine's",
    )
    imp.add_argument(
        "--firmware",
        choices=("bios", "uefi"),
        help="what the image boots through (default: the catalog's word for a catalog name, "
        "else bios on x86_64; arm64 images boot through uefi)",
    )
    imp.add_argument(
        "--user",
        default="vmlease",
        help="the SSH user the seed creates (passwordless sudo, key only; default vmlease)",
    )
    imp.add_argument(
        "--user-data", metavar="FILE", help="your own cloud-config (or script) for the first boot"
    )
    imp.add_argument(
        "--no-seed",
        action="store_true",
        help="boot without a cloud-init seed (the image already runs the vmlease agent)",
    )
    imp.add_argument("--force", action="store_true", help="import again even if up to date")
    imp.add_argument(
        "--timeout",
        type=seconds,
        default=900.0,
        help="seconds the first boot may take, cloud-init included (default 900)",
    )
    imp.set_defaults(func=cmd_image_import)
    cat = isub.add_parser(
        "catalog",
        help="list the distribution images vmlease knows by name, or check them on their mirrors",
        description="Lists the catalog: each name, its architectures, OrbStack's and "
        "Multipass's image of it, and whether the qemu and libvirt backends build it or "
        "import the distribution's cloud image. --check asks each image's mirror whether "
        "it is there; --verify downloads each and checks it against its digest.",
    )
    cat.add_argument("names", nargs="*", metavar="NAME", help="default: every entry")
    cat.add_argument("--check", action="store_true", help="ask each mirror (HEAD requests)")
    cat.add_argument(
        "--verify", action="store_true", help="download each image and check its digest"
    )
    cat.add_argument("--json", action="store_true", help="print JSON")
    cat.set_defaults(func=cmd_image_catalog)
    ils = isub.add_parser("ls", help="list cached images, their saved states and their sizes")
    ils.add_argument("--json", action="store_true", help="print JSON")
    ils.set_defaults(func=cmd_image_ls)
    prune = isub.add_parser(
        "prune",
        help="remove image builds, saved states and downloads that no VM can use",
        description="Removes builds that new VMs do not use and no VM's disk lies on, "
        "saved booted states of such builds (and beyond the cap per image), unused "
        "downloads, and leftovers of interrupted builds. Current builds stay unless --all.",
    )
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed")
    prune.add_argument(
        "--all", action="store_true", help="also remove current builds that no VM uses"
    )
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(func=cmd_image_prune)
