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
import os
import shutil
import tempfile
import time
from pathlib import Path

from vmlease._runner import Runner, SubprocessRunner
from vmlease.backends.guest.images._catalog import AGENT_PROTOCOL, Image, Recipe, load_current
from vmlease.backends.guest.images._steps import (
    COMMON_TOOLS,
    STAGE1_MODULES,
    Progress,
    Steps,
    existing_build,
    guest_file,
    publish,
    require_tools,
)

__all__ = ["RECIPE", "TINY_MODULES", "build_tiny"]

RECIPE_VERSION = "3"
#: Drivers the guest needs, in no particular order (dependencies are resolved).
TINY_MODULES = STAGE1_MODULES
DISK_SIZE = "1G"
MIN_MEMORY_MB = 96


class _Builder(Steps):
    def __init__(
        self, image_dir: Path, runner: Runner, progress: Progress, kernel_deb: Path | None
    ) -> None:
        super().__init__(runner, progress)
        self.image_dir = image_dir
        self.kernel_deb = kernel_deb
        self.downloads = image_dir / "_downloads"

    def build(self, force: bool) -> Image:
        tools = dict(COMMON_TOOLS)
        if self.kernel_deb is not None:
            tools.pop("apt-get")
        busybox = require_tools("tiny", tools)
        assert busybox is not None
        deb = self.kernel_package(self.downloads, self.kernel_deb)
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
        if not force and existing_build(self.image_dir, "tiny", build_id):
            self.say(f"tiny image up to date ({build_id})")
            return load_current(self.image_dir, "tiny")

        (self.image_dir / "tiny").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.image_dir / "tiny") as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            pkg, kver = self.unpack_kernel(deb, work, out)
            self.say("compiling the guest agent")
            agent = self.compile_agent(work)
            self.stage1_initramfs(busybox, pkg, kver, out / "initrd.cpio")

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
                    "agent_protocol": AGENT_PROTOCOL,
                    "recipe": RECIPE_VERSION,
                },
            }
            publish(out, final, manifest)
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
