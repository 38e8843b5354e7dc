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

from vmlease._errors import ImageBuildError
from vmlease._runner import Runner, SubprocessRunner
from vmlease._spec import debian_arch, host_arch
from vmlease.backends.guest.images._catalog import (
    AGENT_PROTOCOL,
    Image,
    Recipe,
    cache_name,
    load_current,
)
from vmlease.backends.guest.images._foreign import compile_agent, cross_tools, fetch_parts
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
#: The CPU model TCG emulates for the image's programs, by architecture.
TCG_CPUS = {"x86_64": "qemu64", "aarch64": "cortex-a57"}


class _Builder(Steps):
    def __init__(
        self,
        image_dir: Path,
        runner: Runner,
        progress: Progress,
        kernel_deb: Path | None,
        arch: str = "x86_64",
    ) -> None:
        super().__init__(runner, progress)
        self.image_dir = image_dir
        self.kernel_deb = kernel_deb
        self.arch = arch
        self.home = image_dir / cache_name("tiny", arch)
        self.busybox: Path | None = None  # this host's
        self.downloads = image_dir / "_downloads"

    def build(self, force: bool) -> Image:
        # This host's busybox and kernel package where both are x86_64; else every
        # part from the archive for the image's architecture.
        native = self.arch == host_arch() == "x86_64"
        x86 = self.arch == "x86_64"
        tools = dict(COMMON_TOOLS) if native else {**COMMON_TOOLS, **cross_tools(self.arch)}
        if not native:
            tools.pop("gcc")
            tools.pop("apt-get")
        if self.kernel_deb is not None:
            if not native:
                raise ImageBuildError("--kernel-deb is for the x86_64 tiny image only")
            tools.pop("apt-get")
        # The foreign image's busybox comes from the archive; the host's lists its applets.
        self.busybox = require_tools(self._what, tools)
        assert self.busybox is not None
        guest = {n: guest_file(f"guest/{n}") for n in ("stage1-init", "rcS", "inittab")}
        deb = self.kernel_package(self.downloads, self.kernel_deb) if native else None
        if deb is not None:
            # Up to date or not is known before anything is unpacked or compiled.
            found = self._current(force, self._build_id(deb.name, self.busybox, guest))
            if found is not None:
                return found
        self.home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.home) as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            if deb is not None:
                busybox, kernel_id = self.busybox, deb.name
                pkg, kver = self.unpack_kernel(deb, work, out)
                self.say("compiling the guest agent")
                agent = self.compile_agent(work)
            else:
                busybox, pkg, kver, kernel_id, agent = self._foreign_parts(work, out)
                found = self._current(force, self._build_id(kernel_id, busybox, guest))
                if found is not None:
                    return found
            build_id = self._build_id(kernel_id, busybox, guest)
            final = self.home / build_id
            self.stage1_initramfs(busybox, pkg, kver, out / "initrd.cpio")
            self.say("making the root disk")
            root = work / "root"
            self._root_tree(root, busybox, agent, guest)
            self.root_disk(
                root, work / "root.ext4", out / "disk.qcow2", size=DISK_SIZE, label="vmlease-root"
            )
            manifest = {
                "name": "tiny",
                "arch": self.arch,
                "build_id": build_id,
                "built_at": time.time(),
                "kernel": "vmlinux" if x86 else "Image",
                "initrd": "initrd.cpio",
                "disk": "disk.qcow2",
                "cmdline": f"console={'ttyS0' if x86 else 'ttyAMA0'} quiet loglevel=4 panic=-1",
                "min_memory_mb": MIN_MEMORY_MB,
                # Everything in the image is Debian's baseline build; TCG runs a plain
                # CPU model faster than "max" (x86-64: qemu64, about 20%; arm64:
                # cortex-a57, which emulates no pointer authentication).
                "tcg_cpu": TCG_CPUS[self.arch],
                "info": {
                    "kernel_package": kernel_id,
                    "kernel_release": kver,
                    "busybox": str(busybox) if native else "busybox-static",
                    "agent_protocol": AGENT_PROTOCOL,
                    "recipe": RECIPE_VERSION,
                },
            }
            publish(out, final, manifest)
        self.say(f"{self._what} image built ({build_id}) in {final}")
        return load_current(self.image_dir, "tiny", self.arch)

    @property
    def _what(self) -> str:
        return "tiny" if self.arch == "x86_64" else f"tiny {debian_arch(self.arch)}"

    def _build_id(self, kernel_id: str, busybox: Path, guest: dict[str, bytes]) -> str:
        digest = hashlib.sha256()
        for part in (
            RECIPE_VERSION.encode(),
            kernel_id.encode(),
            hashlib.sha256(busybox.read_bytes()).digest(),
            guest_file("agent.c"),
            *guest.values(),
        ):
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()[:16]

    def _current(self, force: bool, build_id: str) -> Image | None:
        """The build ``build_id``, made current, if it exists (and ``force`` is off)."""
        if force or not existing_build(self.image_dir, self.home.name, build_id):
            return None
        self.say(f"{self._what} image up to date ({build_id})")
        return load_current(self.image_dir, "tiny", self.arch)

    def _foreign_parts(self, work: Path, out: Path) -> tuple[Path, Path, str, str, Path]:
        """The same for another architecture (``_foreign.py``): Debian's kernel and
        busybox for it, unpacked from the archive, and the agent cross-compiled."""
        parts = fetch_parts(self, self.arch, work, out)
        self.say(f"compiling the guest agent for {self.arch}")
        agent = compile_agent(self, self.arch, work)
        return parts.busybox, parts.package, parts.release, parts.identity, agent

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
        for applet in self._applets(busybox):
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

    def _applets(self, busybox: Path) -> list[str]:
        """Where busybox's applets go (``bin/sh``, ``usr/bin/wc``): asked of this host's
        busybox, or of the host's for another architecture's, which cannot run here
        (the same Debian version of busybox has the same applets)."""
        native = self.busybox or busybox
        return self.check([str(native), "--list-full"], "listing busybox applets").stdout.split()


def build_tiny(
    image_dir: Path,
    *,
    arch: str = "x86_64",
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
        image_dir, runner or SubprocessRunner(), progress or (lambda _line: None), kernel_deb, arch
    )
    return builder.build(force)


RECIPE = Recipe(
    name="tiny",
    summary="busybox and the vmlease agent on a Debian cloud kernel; boots in about 2 s",
    build=build_tiny,
    arches=("x86_64", "aarch64"),
)
