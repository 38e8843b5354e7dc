"""Build steps that image recipes share: running tools, ELF checks, the agent, disks.

A recipe (``_tiny.py``, and one module per recipe beside it) decides what
goes into an image; the steps here know how: run a tool and say what failed,
find what is missing with one ``apt-get install`` line, compile the guest
agent, write an initramfs, pack a directory into a qcow2 root disk without
mounting anything, and publish a finished build.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._runner import Completed, Runner

__all__ = [
    "Progress",
    "Steps",
    "cpio_newc",
    "guest_file",
    "has_pvh_note",
    "is_static_elf",
    "load_order",
    "missing_tools",
    "point_current",
]

#: Called with one line per step of a build.
Progress = Callable[[str], None]


def guest_file(name: str) -> bytes:
    """A file shipped for guests (the agent's source, boot scripts), by its path here."""
    return (resources.files("vmlease.backends.qemu.images") / name).read_bytes()


def missing_tools(tools: Mapping[str, str]) -> dict[str, str]:
    """Of ``tools`` (program -> Debian package), those not on PATH."""
    return {tool: pkg for tool, pkg in tools.items() if shutil.which(tool) is None}


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


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """``wanted`` and their dependencies, each after what it needs."""
    index = {p.stem.replace("-", "_"): p for p in modules_root.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        if name not in index:
            raise ImageBuildError(f"kernel module {name} is not in the kernel package")
        seen.add(name)
        for dep in module_depends(index[name]):
            visit(dep)
        order.append(index[name])

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


class Steps:
    """Running a build's tools: a failure is an ImageBuildError saying what failed."""

    def __init__(self, runner: Runner, progress: Progress) -> None:
        self.run = runner
        self.say = progress

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
            ],
            "making the root file system",
        )
        self.check(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
            "converting the root disk to qcow2",
        )

    def vmlinux(self, bzimage: Path, out: Path) -> None:
        data = bzimage.read_bytes()
        pos = data.find(b"\x02\x21\x4c\x18")  # LZ4 legacy frame magic
        if pos < 0:
            raise ImageBuildError(
                f"{bzimage.name} is not an LZ4-compressed kernel; "
                "pass a Debian cloud kernel package (--kernel-deb)"
            )
        payload = out.with_suffix(".lz4")
        payload.write_bytes(data[pos:])
        # lz4 complains about the bytes after the last block (the bzImage trailer)
        # but has written the whole kernel by then; the ELF check below decides.
        self.run(["lz4", "-d", "-f", str(payload), str(out)], timeout_s=120)
        payload.unlink()
        if not out.exists() or not has_pvh_note(out):
            raise ImageBuildError(
                f"the kernel in {bzimage.name} has no PVH entry point (CONFIG_PVH); "
                "use a Debian cloud kernel package"
            )


def point_current(build: Path) -> None:
    """Make ``build`` the one new VMs of its image use (an atomic symlink swap)."""
    link = build.parent / "current"
    tmp = build.parent / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(build.name)
    tmp.replace(link)
