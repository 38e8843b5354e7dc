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
import tempfile
import time
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._runner import Runner, SubprocessRunner
from vmlease.backends.qemu.images._catalog import Image, Recipe, load_current
from vmlease.backends.qemu.images._steps import (
    Progress,
    Steps,
    cpio_newc,
    guest_file,
    is_static_elf,
    load_order,
    missing_tools,
    point_current,
)

__all__ = ["RECIPE", "TINY_MODULES", "build_tiny"]

RECIPE_VERSION = "3"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: Drivers the guest needs, in no particular order (dependencies are resolved).
TINY_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng")
DISK_SIZE = "1G"
MIN_MEMORY_MB = 96

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


class _Builder(Steps):
    def __init__(
        self, image_dir: Path, runner: Runner, progress: Progress, kernel_deb: Path | None
    ) -> None:
        super().__init__(runner, progress)
        self.image_dir = image_dir
        self.kernel_deb = kernel_deb
        self.downloads = image_dir / "_downloads"

    def preflight(self) -> Path:
        """Check every tool first, so a missing one is reported with all the others."""
        need = dict(_TOOLS)
        if self.kernel_deb is not None:
            need.pop("apt-get")
        missing = missing_tools(need)
        busybox = next(
            (Path(p) for p in _BUSYBOX_PATHS if Path(p).is_file() and is_static_elf(Path(p))),
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

    def build(self, force: bool) -> Image:
        busybox = self.preflight()
        deb = self.kernel_package()
        agent_src = guest_file("agent.c")
        guest = {n: guest_file(f"guest/{n}") for n in ("stage1-init", "rcS", "inittab")}
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
                point_current(final)
            self.say(f"tiny image up to date ({build_id})")
            return load_current(self.image_dir, "tiny")

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
            agent = self.compile_agent(work)

            self.say("assembling the initramfs")
            modules = load_order(pkg / "lib/modules" / kver / "kernel", TINY_MODULES)
            entries: list[tuple[str, int, bytes]] = [
                (d, 0o040755, b"") for d in ("bin", "dev", "proc", "newroot", "lib", "lib/modules")
            ]
            entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
            entries.append(("init", 0o100755, guest["stage1-init"]))
            entries.extend((f"lib/modules/{m.name}", 0o100644, m.read_bytes()) for m in modules)
            order = "\n".join(m.stem for m in modules) + "\n"
            entries.append(("lib/modules/load-order", 0o100644, order.encode()))
            (out / "initrd.cpio").write_bytes(cpio_newc(entries))

            self.say("making the root disk")
            root = work / "root"
            self._root_tree(root, busybox, agent, guest)
            self.root_disk(
                root, work / "root.ext4", out / "disk.qcow2", size=DISK_SIZE, label="vmlease-root"
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
        point_current(final)
        self.say(f"tiny image built ({build_id}) in {final}")
        return load_current(self.image_dir, "tiny")

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


RECIPE = Recipe(
    name="tiny",
    summary="busybox and the vmlease agent on a Debian cloud kernel; boots in about 2 s",
    build=build_tiny,
)
