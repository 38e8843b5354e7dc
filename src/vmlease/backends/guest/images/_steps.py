"""Build steps that image recipes share: running tools, ELF checks, the agent, disks.

A recipe (``_tiny.py``, and one module per recipe beside it) decides what
goes into an image; the steps here know how: run a tool and say what failed,
find what is missing with one ``apt-get install`` line, compile the guest
agent, write an initramfs, pack a directory into a qcow2 root disk without
mounting anything, and publish a finished build.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._runner import Completed, Runner, find_program
from vmlease.backends.guest.images._rootless import as_root, remove_tree

__all__ = [
    "Progress",
    "Steps",
    "cpio_newc",
    "existing_build",
    "guest_file",
    "has_pvh_note",
    "is_static_elf",
    "load_order",
    "missing_tools",
    "modules_dir",
    "point_current",
    "publish",
    "tar_digest",
]

#: Called with one line per step of a build.
Progress = Callable[[str], None]


def guest_file(name: str) -> bytes:
    """A file shipped for guests (the agent's source, boot scripts), by its path here."""
    return (resources.files("vmlease.backends.guest.images") / name).read_bytes()


def missing_tools(tools: Mapping[str, str]) -> dict[str, str]:
    """Of ``tools`` (program -> Debian package), those not on PATH."""
    return {tool: pkg for tool, pkg in tools.items() if find_program(tool) is None}


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit ELF without an interpreter (statically linked)."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def has_pvh_note(vmlinux: Path) -> bool:
    """True if the ELF kernel carries XEN_ELFNOTE_PHYS32_ENTRY (PVH boot entry)."""
    with vmlinux.open("rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, offset, _va, _pa, filesz = struct.unpack_from(
                "<IIQQQQ", table, i * phentsize
            )
            if p_type != 4:  # PT_NOTE
                continue
            f.seek(offset)
            notes = f.read(filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and ntype == 18:
                    return True
                pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


#: Module file endings: plain, or compressed as Debian 13 ships them.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_stem(path: Path) -> str:
    """A module file's name without its ending (``virtio_blk`` for ``virtio_blk.ko.xz``)."""
    return next(path.name[: -len(s)] for s in MODULE_SUFFIXES if path.name.endswith(s))


def _module_key(name: str) -> str:
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        tool = find_program("zstd")
        if tool is None:
            raise ImageBuildError(f"{path.name} is zstd-compressed: apt-get install zstd")
        done = subprocess.run(  # binary output: not the text runner
            [tool, "-d", "-q", "-c", str(path)], capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise ImageBuildError(f"cannot decompress {path.name}: {done.stderr.decode()[-500:]}")
        return done.stdout
    return data


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m:
        return []
    return [_module_key(d) for d in m.group(1).decode().split(",") if d]


def modules_dir(pkg: Path, kver: str) -> Path:
    """Where an unpacked kernel package keeps its modules: ``lib/modules/KVER``
    (Debian 12) or ``usr/lib/modules/KVER`` (Debian 13)."""
    for base in ("lib/modules", "usr/lib/modules"):
        if (pkg / base / kver).is_dir():
            return pkg / base / kver
    raise ImageBuildError(f"the kernel package holds no modules for {kver}")


def load_order(modules: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``wanted`` and their dependencies, each after what it needs, as
    (file stem, decompressed module); those built into the kernel
    (``modules.builtin``) are left out."""
    builtin_list = modules / "modules.builtin"
    builtin = {
        _module_key(module_stem(Path(line.strip())))
        for line in (builtin_list.read_text().splitlines() if builtin_list.exists() else [])
        if line.strip().endswith(MODULE_SUFFIXES)
    }
    index = {
        _module_key(module_stem(p)): p
        for p in (modules / "kernel").rglob("*.ko*")
        if p.name.endswith(MODULE_SUFFIXES)
    }
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        if name not in index:
            raise ImageBuildError(f"kernel module {name} is not in the kernel package")
        seen.add(name)
        data = module_bytes(index[name])
        for dep in module_depends(data):
            visit(dep)
        order.append((module_stem(index[name]), data))

    for name in wanted:
        visit(name)
    return order


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed ``newc`` cpio archive of (path, mode, data) entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        nameb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


#: Where a static busybox may be (Debian's busybox-static).
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
#: The meta-package whose current kernel every image boots.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: Tools every recipe needs (program -> Debian package).
COMMON_TOOLS = {
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "gcc": "gcc",
    "lz4": "lz4",
    "mke2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
#: The compressions of a bzImage's payload vmlease unpacks, by their magic.
_KERNEL_COMPRESSIONS = {
    b"\x02\x21\x4c\x18": "lz4",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"\x1f\x8b": "gzip",
}
#: Drivers the stage-1 initramfs loads to reach the root disk and the agent's port.
STAGE1_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng")


def find_busybox() -> Path | None:
    """A statically linked busybox on this host, if there is one."""
    return next(
        (Path(p) for p in BUSYBOX_PATHS if Path(p).is_file() and is_static_elf(Path(p))), None
    )


def require_tools(recipe: str, tools: Mapping[str, str], *, busybox: bool = True) -> Path | None:
    """Check every tool a recipe needs at once; ImageBuildError with one install line.

    Returns the static busybox when ``busybox`` is asked for.
    """
    missing = missing_tools(tools)
    found = find_busybox() if busybox else None
    packages = set(missing.values()) | ({"busybox-static"} if busybox and found is None else set())
    if packages:
        what = ", ".join([*missing, *(["a static busybox"] if busybox and found is None else [])])
        libc = " libc6-dev" if "gcc" in missing else ""
        raise ImageBuildError(
            f"cannot build the {recipe} image: missing {what}. "
            f"Install with: apt-get install {' '.join(sorted(packages))}{libc}"
        )
    return found


class Steps:
    """Running a build's tools: a failure is an ImageBuildError saying what failed."""

    def __init__(self, runner: Runner, progress: Progress) -> None:
        self.run = runner
        self.say = progress

    def kernel_package(self, downloads: Path, given: Path | None = None) -> Path:
        """The Debian cloud kernel package: ``given``, or the current one, downloaded once."""
        if given is not None:
            if not given.is_file():
                raise ImageBuildError(f"kernel package {given} does not exist")
            return given
        done = self.check(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], "looking up the cloud kernel", 60
        )
        m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", done.stdout)
        if not m:
            raise ImageBuildError(
                f"apt does not know {KERNEL_META_PACKAGE}: run `apt-get update` and try again"
            )
        package = m.group(1)
        cached = sorted(downloads.glob(f"{package}_*.deb"))
        if cached:
            return cached[-1]
        self.say(f"downloading {package} (apt-get download)")
        downloads.mkdir(parents=True, exist_ok=True)
        self.check(
            ["apt-get", "download", package],
            f"downloading {package}; if apt cannot find it, run `apt-get update`",
            600,
            cwd=downloads,
        )
        cached = sorted(downloads.glob(f"{package}_*.deb"))
        if not cached:
            raise ImageBuildError(f"apt-get download {package} left no package file")
        return cached[-1]

    def unpack_kernel(self, deb: Path, work: Path, out: Path) -> tuple[Path, str]:
        """Unpack ``deb`` under ``work``; the PVH ``vmlinux`` goes to ``out``.

        Returns the unpacked package's root and the kernel release.
        """
        self.say(f"unpacking {deb.name}")
        pkg = work / "pkg"
        self.check(["dpkg-deb", "-x", str(deb), str(pkg)], "unpacking the kernel package")
        vmlinuz = next(iter(sorted((pkg / "boot").glob("vmlinuz-*"))), None)
        if vmlinuz is None:
            raise ImageBuildError(f"{deb.name} holds no /boot/vmlinuz-*: not a kernel package")
        self.say("extracting the PVH kernel")
        self.vmlinux(vmlinuz, out / "vmlinux")
        return pkg, vmlinuz.name.removeprefix("vmlinuz-")

    def stage1_initramfs(self, busybox: Path, pkg: Path, kver: str, out: Path) -> None:
        """``out``: busybox, the virtio drivers, and ``stage1-init``, which loads
        them, mounts ``/dev/vda`` and hands over to its ``/sbin/init``."""
        self.say("assembling the initramfs")
        modules = load_order(modules_dir(pkg, kver), STAGE1_MODULES)
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o040755, b"") for d in ("bin", "dev", "proc", "newroot", "lib", "lib/modules")
        ]
        entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
        entries.append(("init", 0o100755, guest_file("guest/stage1-init")))
        entries.extend((f"lib/modules/{stem}.ko", 0o100644, data) for stem, data in modules)
        order = "".join(f"{stem}\n" for stem, _ in modules)
        entries.append(("lib/modules/load-order", 0o100644, order.encode()))
        out.write_bytes(cpio_newc(entries))

    def check(
        self, argv: list[str], what: str, timeout_s: float = 300.0, **kw: object
    ) -> Completed:
        done = self.run(argv, timeout_s=timeout_s, **kw)  # type: ignore[arg-type]
        if done.returncode != 0:
            why = "timed out" if done.returncode is None else f"exited {done.returncode}"
            raise ImageBuildError(
                f"{what} failed: `{' '.join(argv)}` {why}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def compile_agent(self, work: Path) -> Path:
        """The guest agent, compiled static from its source; returns the binary."""
        (work / "agent.c").write_bytes(guest_file("agent.c"))
        self.check(
            ["gcc", "-static", "-Os", "-s", "-o", str(work / "agent"), str(work / "agent.c")],
            "compiling the guest agent (needs gcc and libc6-dev)",
        )
        return work / "agent"

    def root_disk(self, tree: Path, raw: Path, qcow2: Path, *, size: str, label: str) -> None:
        """Pack the directory ``tree`` into an ext4 file system, stored as qcow2.

        ``mke2fs -d`` copies the tree itself: no mount, no loop device, no root.
        """
        self.check(
            as_root(
                [
                    "mke2fs",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    label,
                    "-E",
                    "root_owner=0:0",
                    "-d",
                    str(tree),
                    str(raw),
                    size,
                ]
            ),
            "making the root file system",
        )
        self.check(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
            "converting the root disk to qcow2",
        )

    def root_disk_from_tar(
        self,
        tar: Path,
        tree: Path,
        raw: Path,
        qcow2: Path,
        *,
        size: str,
        label: str,
        overlays: Sequence[Path] = (),
    ) -> None:
        """Pack the tarball ``tar`` into an ext4 root disk, owners as the tarball says,
        with the tarballs ``overlays`` laid over it in turn.

        Unpacked to ``tree`` and packed with root's view of owners (``as_root``:
        for a normal user, inside a user namespace), then ``tree`` is removed there.
        """
        tree.mkdir()
        try:
            for part in (tar, *overlays):
                self.check(
                    as_root(
                        ["tar", "-x", "-p", "--numeric-owner", "-f", str(part), "-C", str(tree)]
                    ),
                    "unpacking the root file system",
                )
            tar.unlink()
            self.root_disk(tree, raw, qcow2, size=size, label=label)
        finally:
            remove_tree(tree, self.run)

    def vmlinux(self, bzimage: Path, out: Path) -> None:
        """The ELF kernel inside the bzImage ``bzimage``, decompressed to ``out``.

        The compressed payload is where the boot protocol's setup header says
        (``payload_offset``, ``payload_length``); Debian 12 compresses it with
        LZ4, Debian 13 with zstd.
        """
        data = bzimage.read_bytes()
        if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
            raise ImageBuildError(f"{bzimage.name} is not a bzImage kernel")
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + offset
        payload = data[start : start + length - 4]  # the last 4 bytes: the size
        how = next((h for m, h in _KERNEL_COMPRESSIONS.items() if payload.startswith(m)), None)
        if how is None:
            raise ImageBuildError(
                f"{bzimage.name} is compressed in a way vmlease does not unpack "
                f"(magic {payload[:6].hex()}); use a Debian cloud kernel package (--kernel-deb)"
            )
        if how in ("gzip", "xz"):
            out.write_bytes(gzip.decompress(payload) if how == "gzip" else lzma.decompress(payload))
        else:
            packed = out.with_suffix(f".{how}")
            packed.write_bytes(payload)
            try:
                self.check(
                    [how, "-d", "-q", "-f", str(packed), str(out)]
                    if how == "lz4"
                    else [how, "-d", "-q", "-f", str(packed), "-o", str(out)],
                    f"decompressing the kernel ({how}; apt-get install {how})",
                    120,
                )
            finally:
                packed.unlink(missing_ok=True)
        if not out.exists() or not has_pvh_note(out):
            raise ImageBuildError(
                f"the kernel in {bzimage.name} has no PVH entry point (CONFIG_PVH); "
                "use a Debian cloud kernel package"
            )


def tar_digest(tar: Path) -> str:
    """A digest of the file tree in ``tar``: every entry's path, type, mode, owner,
    link target and content, in path order; time stamps left out."""
    entries = []
    with tarfile.open(tar) as archive:
        for member in archive:
            data = hashlib.sha256()
            if member.isfile():
                f = archive.extractfile(member)
                assert f is not None
                while chunk := f.read(1 << 20):
                    data.update(chunk)
            name = member.name.removeprefix("./").rstrip("/")
            entries.append(
                f"{name}\0{member.type.decode()}\0{member.mode:o}\0{member.uid}:{member.gid}"
                f"\0{member.linkname}\0{data.hexdigest() if member.isfile() else ''}"
            )
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def existing_build(image_dir: Path, name: str, build_id: str) -> Path | None:
    """The finished build ``build_id`` of image ``name``, made current; None if there is none."""
    final = image_dir / name / build_id
    if not (final / "manifest.json").exists():
        return None
    current = image_dir / name / "current"
    if not current.exists() or current.resolve() != final.resolve():
        point_current(final)
    return final


def publish(out: Path, final: Path, manifest: Mapping[str, object]) -> None:
    """Finish a build: its manifest written last, moved into place, made current."""
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    point_current(final)


def point_current(build: Path) -> None:
    """Make ``build`` the one new VMs of its image use (an atomic symlink swap)."""
    link = build.parent / "current"
    tmp = build.parent / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(build.name)
    tmp.replace(link)
