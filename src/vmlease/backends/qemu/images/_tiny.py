"""Build the ``tiny`` image from Debian packages, locally.

Parts, all from Debian packages on this machine or fetched by apt:

- the kernel: ``linux-image-*-cloud-amd64``, fetched with ``apt-get download``
  (not installed on the host) and unpacked; its LZ4 bzImage is decompressed
  to the ELF ``vmlinux`` that QEMU boots directly through PVH;
- the virtio modules from the same package, loaded by a stage-1 initramfs;
- ``busybox`` from the host's ``busybox-static``;
- the guest agent, compiled from ``agent.c`` with the host's gcc (static);
- an ext4 root disk made with ``mke2fs -d``, stored as qcow2.

The build is keyed by a digest of its inputs: a second build with the same
inputs does nothing, a changed agent or kernel makes a new build beside the
old one (see _catalog for the layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._runner import Completed, Runner, SubprocessRunner
from vmlease.backends.qemu.images._catalog import Image, find_image

__all__ = ["TINY_MODULES", "build_tiny"]

RECIPE_VERSION = "3"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: Drivers the guest needs, in no particular order (dependencies are resolved).
TINY_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng")
DISK_SIZE = "1G"
MIN_MEMORY_MB = 96

Progress = Callable[[str], None]

# What each tool is for, and the Debian package that has it.
_TOOLS = {
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "gcc": "gcc",
    "lz4": "lz4",
    "mke2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
_BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")


def _guest_file(name: str) -> bytes:
    return (resources.files("vmlease.backends.qemu.images") / name).read_bytes()


def _is_static_elf(path: Path) -> bool:
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


def _has_pvh_note(vmlinux: Path) -> bool:
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


def _module_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def _load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
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
        for dep in _module_depends(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
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


class _Builder:
    def __init__(
        self, image_dir: Path, runner: Runner, progress: Progress, kernel_deb: Path | None
    ) -> None:
        self.image_dir = image_dir
        self.run = runner
        self.say = progress
        self.kernel_deb = kernel_deb
        self.downloads = image_dir / "_downloads"

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

    def preflight(self) -> Path:
        """Check every tool first, so a missing one is reported with all the others."""
        need = dict(_TOOLS)
        if self.kernel_deb is not None:
            need.pop("apt-get")
        missing = {tool: pkg for tool, pkg in need.items() if shutil.which(tool) is None}
        busybox = next(
            (Path(p) for p in _BUSYBOX_PATHS if Path(p).is_file() and _is_static_elf(Path(p))),
            None,
        )
        packages = sorted(
            set(missing.values()) | ({"busybox-static"} if busybox is None else set())
        )
        if packages:
            what = ", ".join([*missing, *(["a static busybox"] if busybox is None else [])])
            libc = " libc6-dev" if "gcc" in missing else ""
            raise ImageBuildError(
                f"cannot build the tiny image: missing {what}. "
                f"Install with: apt-get install {' '.join(packages)}{libc}"
            )
        assert busybox is not None
        return busybox

    def kernel_package(self) -> Path:
        if self.kernel_deb is not None:
            if not self.kernel_deb.is_file():
                raise ImageBuildError(f"kernel package {self.kernel_deb} does not exist")
            return self.kernel_deb
        done = self.check(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], "looking up the cloud kernel", 60
        )
        m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", done.stdout)
        if not m:
            raise ImageBuildError(
                f"apt does not know {KERNEL_META_PACKAGE}: run `apt-get update` and try again"
            )
        package = m.group(1)
        cached = sorted(self.downloads.glob(f"{package}_*.deb"))
        if cached:
            return cached[-1]
        self.say(f"downloading {package} (apt-get download)")
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.check(
            ["apt-get", "download", package],
            f"downloading {package}; if apt cannot find it, run `apt-get update`",
            600,
            cwd=self.downloads,
        )
        cached = sorted(self.downloads.glob(f"{package}_*.deb"))
        if not cached:
            raise ImageBuildError(f"apt-get download {package} left no package file")
        return cached[-1]

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
        if not out.exists() or not _has_pvh_note(out):
            raise ImageBuildError(
                f"the kernel in {bzimage.name} has no PVH entry point (CONFIG_PVH); "
                "use a Debian cloud kernel package"
            )

    def build(self, force: bool) -> Image:
        busybox = self.preflight()
        deb = self.kernel_package()
        agent_src = _guest_file("agent.c")
        guest = {n: _guest_file(f"guest/{n}") for n in ("stage1-init", "rcS", "inittab")}
        digest = hashlib.sha256()
        for part in (
            RECIPE_VERSION.encode(),
            deb.name.encode(),
            hashlib.sha256(busybox.read_bytes()).digest(),
            agent_src,
            *guest.values(),
        ):
            digest.update(hashlib.sha256(part).digest())
        build_id = digest.hexdigest()[:16]
        final = self.image_dir / "tiny" / build_id
        if (final / "manifest.json").exists() and not force:
            current = self.image_dir / "tiny" / "current"
            if not current.exists() or current.resolve() != final.resolve():
                self._point_current(final)
            self.say(f"tiny image up to date ({build_id})")
            return find_image(self.image_dir, "tiny")

        (self.image_dir / "tiny").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.image_dir / "tiny") as tmp:
            work = Path(tmp)
            self.say(f"unpacking {deb.name}")
            pkg = work / "pkg"
            self.check(["dpkg-deb", "-x", str(deb), str(pkg)], "unpacking the kernel package")
            vmlinuz = next(iter(sorted((pkg / "boot").glob("vmlinuz-*"))), None)
            if vmlinuz is None:
                raise ImageBuildError(f"{deb.name} holds no /boot/vmlinuz-*: not a kernel package")
            kver = vmlinuz.name.removeprefix("vmlinuz-")
            out = work / "out"
            out.mkdir()
            self.say("extracting the PVH kernel")
            self.vmlinux(vmlinuz, out / "vmlinux")

            self.say("compiling the guest agent")
            (work / "agent.c").write_bytes(agent_src)
            self.check(
                ["gcc", "-static", "-Os", "-s", "-o", str(work / "agent"), str(work / "agent.c")],
                "compiling the guest agent (needs gcc and libc6-dev)",
            )

            self.say("assembling the initramfs")
            modules = _load_order(pkg / "lib/modules" / kver / "kernel", TINY_MODULES)
            entries: list[tuple[str, int, bytes]] = [
                (d, 0o040755, b"") for d in ("bin", "dev", "proc", "newroot", "lib", "lib/modules")
            ]
            entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
            entries.append(("init", 0o100755, guest["stage1-init"]))
            entries.extend((f"lib/modules/{m.name}", 0o100644, m.read_bytes()) for m in modules)
            order = "\n".join(m.stem for m in modules) + "\n"
            entries.append(("lib/modules/load-order", 0o100644, order.encode()))
            (out / "initrd.cpio").write_bytes(_cpio_newc(entries))

            self.say("making the root disk")
            root = work / "root"
            self._root_tree(root, busybox, work / "agent", guest)
            raw = work / "root.ext4"
            self.check(
                [
                    "mke2fs",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "vmlease-root",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                    str(root),
                    str(raw),
                    DISK_SIZE,
                ],
                "making the root file system",
            )
            self.check(
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    str(raw),
                    str(out / "disk.qcow2"),
                ],
                "converting the root disk to qcow2",
            )
            manifest = {
                "name": "tiny",
                "build_id": build_id,
                "built_at": time.time(),
                "kernel": "vmlinux",
                "initrd": "initrd.cpio",
                "disk": "disk.qcow2",
                "cmdline": "console=ttyS0 quiet loglevel=4 panic=-1",
                "min_memory_mb": MIN_MEMORY_MB,
                # Everything in the image is Debian's baseline x86-64 build, and
                # TCG runs a plain qemu64 CPU about 20% faster than "max".
                "tcg_cpu": "qemu64",
                "info": {
                    "kernel_package": deb.name,
                    "kernel_release": kver,
                    "busybox": str(busybox),
                    "agent_protocol": "1",
                    "recipe": RECIPE_VERSION,
                },
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
        self._point_current(final)
        self.say(f"tiny image built ({build_id}) in {final}")
        return find_image(self.image_dir, "tiny")

    def _root_tree(self, root: Path, busybox: Path, agent: Path, guest: dict[str, bytes]) -> None:
        # The usual Linux layout, so tests can install software where it normally goes.
        for d in (
            "bin",
            "sbin",
            "lib",
            "etc/init.d",
            "dev",
            "proc",
            "sys",
            "run",
            "root",
            "tmp",
            "home",
            "mnt",
            "opt",
            "srv",
            "media",
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/share",
            "usr/local/bin",
            "usr/local/sbin",
            "usr/local/lib",
            "usr/local/share",
            "var/tmp",
            "var/log",
            "var/lib",
            "var/cache",
            "var/spool",
        ):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "var/tmp").chmod(0o1777)
        (root / "root").chmod(0o700)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = self.check([str(busybox), "--list-full"], "listing busybox applets").stdout
        for applet in applets.split():
            link = root / applet
            if link.name == "busybox" or link.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))
        shutil.copy2(agent, root / "usr/sbin/vmlease-agent")
        (root / "etc/inittab").write_bytes(guest["inittab"])
        (root / "etc/init.d/rcS").write_bytes(guest["rcS"])
        (root / "etc/init.d/rcS").chmod(0o755)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "etc/hostname").write_text("vmlease\n")

    def _point_current(self, build: Path) -> None:
        link = build.parent / "current"
        tmp = build.parent / f".current-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(build.name)
        tmp.replace(link)


def build_tiny(
    image_dir: Path,
    *,
    force: bool = False,
    kernel_deb: Path | None = None,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> Image:
    """Build (or find up to date) the tiny image in ``image_dir``; returns it.

    Args:
        image_dir: the image cache directory.
        force: rebuild even if a build with the same inputs exists.
        kernel_deb: a Debian kernel package file to use instead of fetching one.
        runner: runs host programs (injected for tests).
        progress: called with a line for each step.
    """
    builder = _Builder(
        image_dir, runner or SubprocessRunner(), progress or (lambda _line: None), kernel_deb
    )
    return builder.build(force)
