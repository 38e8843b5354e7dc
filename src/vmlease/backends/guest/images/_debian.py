"""Build the ``debian-12`` (bookworm) and ``debian-13`` (trixie) images from the Debian archive.

Parts:

- the root file system: ``mmdebstrap --variant=minbase`` with systemd,
  udev, kmod, openssh-server, python3, sudo, iproute2, ca-certificates and
  dbus, documentation and locales left out; apt points at the mirror this
  host uses (``$VMLEASE_DEBIAN_MIRROR`` overrides it);
- the kernel: the Debian cloud kernel the tiny image boots (a PVH
  ``vmlinux``), its modules copied into the root file system;
- the stage-1 initramfs the recipes share (the virtio drivers, then
  ``/sbin/init``, which is systemd);
- the vmlease agent as a systemd service started before ``sysinit.target``;
- the user-mode interface set once, as it appears, to the address QEMU's
  user-mode networking gives (``guest/debian/vmlease-network``), and its DNS; no
  network daemon, which would wake at every change of a private network's
  interface, at each start from a saved state;
- no password anywhere: root's is locked, and SSH accepts keys only.

Units a test VM does not need (apt's timers, e2scrub, fstrim, man-db, the
dpkg backup, waiting for the network to be online) are masked. Everything
is written into the tree by mmdebstrap's hooks, and the tree becomes an ext4
disk with ``mke2fs -d``: nothing is mounted on the host and no loop device
is used. The build id hashes the inputs (suite, packages, mirror, kernel
package, agent, unit files), so a second build does nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import os
import shlex
import shutil
import tarfile
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
from vmlease.backends.guest.images._foreign import (
    SOURCE_DATE_EPOCH,
    compile_agent,
    cross_tools,
    extract,
    fetch_parts,
    finish_in_guest,
)
from vmlease.backends.guest.images._mirror import host_mirror
from vmlease.backends.guest.images._rootless import blockers, is_root, remove_tree
from vmlease.backends.guest.images._steps import (
    COMMON_TOOLS,
    Progress,
    Steps,
    existing_build,
    guest_file,
    modules_dir,
    publish,
    require_tools,
    tar_digest,
)

__all__ = ["PACKAGES", "RECIPES", "SUITES", "build_debian", "host_mirror"]

RECIPE_VERSION = "8"
SUITES = {"debian-12": "bookworm", "debian-13": "trixie"}
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "openssh-server",
    "python3",
    "sudo",
    "iproute2",
    "ca-certificates",
    "dbus",
)
#: What mmdebstrap's minbase variant installs before the image's packages, as apt
#: patterns (a foreign image's packages are chosen so, not installed by mmdebstrap).
MINBASE = ("?priority(required)", "apt")
#: Units enabled besides those the packages enable.
ENABLED = ("vmlease-agent.service", "ssh.service")
#: Units a disposable test VM does not need; each costs boot time under TCG.
MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-networkd-wait-online.service",
)
_EXCLUDED = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
_GUEST_FILES = {
    "etc/systemd/system/vmlease-agent.service": "guest/debian/vmlease-agent.service",
    "etc/systemd/system/vmlease-network@.service": "guest/debian/vmlease-network@.service",
    "etc/udev/rules.d/80-vmlease-network.rules": "guest/debian/80-vmlease-network.rules",
    "usr/libexec/vmlease-network": "guest/debian/vmlease-network",
    "etc/fstab": "guest/debian/fstab",
    "etc/hosts": "guest/debian/hosts",
    "etc/ssh/sshd_config.d/vmlease.conf": "guest/debian/sshd-vmlease.conf",
    "etc/systemd/system/ssh.service.d/hostkeys.conf": "guest/debian/ssh-hostkeys.conf",
}
#: The programs among the files vmlease adds.
_EXECUTABLE = ("/vmlease-agent", "/vmlease-network")
_TOOLS = {**COMMON_TOOLS, "mmdebstrap": "mmdebstrap"}
_MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
DISK_SIZE = "4G"  # sparse: the guest's own room to install packages into
MIN_MEMORY_MB = 256
#: The script that finishes an image of another architecture inside its guest.
_SETUP = "guest/debian/setup-in-guest"
#: Up: systemd has finished starting units (running, or degraded) and sshd listens.
READY = (
    "sh",
    "-c",
    "systemctl is-system-running --wait >/dev/null; s=$(systemctl is-system-running); "
    'case "$s" in running|degraded) systemctl is-active --quiet ssh.service ;; '
    '*) echo "systemd is $s"; exit 1 ;; esac',
)
#: The kernel command line: the serial console, exit on panic, Debian's ``quiet``, and
#: the one trim measured to pay (``benchmarks/trims.py``, docs/architecture.md):
#: ``mitigations=off`` makes commands and resets faster under TCG. ``loglevel=4``
#: and ``systemd.show_status=false`` bought nothing and are gone.
CMDLINE = "console=ttyS0 panic=-1 quiet mitigations=off"


def _gib(size: str) -> int:
    return int(size.removesuffix("G")) * 2**30


class _Builder(Steps):
    def __init__(
        self,
        image_dir: Path,
        name: str,
        runner: Runner,
        progress: Progress,
        mirror: str,
        arch: str = "x86_64",
    ) -> None:
        super().__init__(runner, progress)
        self.image_dir = image_dir
        self.name = name
        self.suite = SUITES[name]
        self.mirror = mirror
        self.arch = arch
        # mmdebstrap installs this host's own architecture; any other is unpacked
        # here and installed inside its guest (``_foreign.py``).
        self.native = arch == host_arch() == "x86_64"
        self.home = image_dir / cache_name(name, arch)
        self.what = name if arch == "x86_64" else f"{name} {debian_arch(arch)}"
        self.downloads = image_dir / "_downloads"

    def _blockers(self) -> None:
        problems = blockers(self.run)
        if problems:
            raise ImageBuildError(
                f"cannot build the {self.what} image as {getpass.getuser()}: "
                + "; ".join(map(str, problems))
                + " (or build it as root: `sudo vmlease image build` makes it yours)"
            )

    def build(self, force: bool) -> Image:
        if self.native:
            host_busybox = require_tools(self.what, _TOOLS)
            deb = self.kernel_package(self.downloads)
        else:
            tools = {**_TOOLS, **cross_tools(self.arch)}
            for program in ("gcc", "apt-get"):
                tools.pop(program)
            require_tools(self.what, tools, busybox=False)
            self._blockers()
        guest = {dest: guest_file(src) for dest, src in _GUEST_FILES.items()}
        self.home.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=self.home))
        try:
            out = work / "out"
            out.mkdir()
            if self.native:
                assert host_busybox is not None
                busybox, kernel_id = host_busybox, deb.name
            else:
                parts = fetch_parts(self, self.arch, work, out)
                busybox, kernel_id = parts.busybox, parts.identity
            digest = hashlib.sha256()
            for part in (
                RECIPE_VERSION.encode(),
                self.suite.encode(),
                self.mirror.encode(),
                self.arch.encode(),
                " ".join(MINBASE + PACKAGES + MASKED + _EXCLUDED + ENABLED).encode(),
                self.cmdline.encode(),
                " ".join(READY).encode(),
                kernel_id.encode(),
                hashlib.sha256(busybox.read_bytes()).digest(),
                guest_file("agent.c"),
                guest_file("guest/stage1-init"),
                guest_file(_SETUP),
                *guest.values(),
            ):
                digest.update(hashlib.sha256(part).digest())
            build_id = digest.hexdigest()[:16]
            final = self.home / build_id
            if not force and existing_build(self.image_dir, self.home.name, build_id):
                self.say(f"{self.what} image up to date ({build_id})")
                return load_current(self.image_dir, self.name, self.arch)
            if self.native:
                self._blockers()
                pkg, kver = self.unpack_kernel(deb, work, out)
                self.say("compiling the guest agent")
                agent = self.compile_agent(work)
            else:
                pkg, kver = parts.package, parts.release
                self.say(f"compiling the guest agent for {self.arch}")
                agent = compile_agent(self, self.arch, work)
            self.stage1_initramfs(busybox, pkg, kver, out / "initrd.cpio")
            overlay = self._overlay(work, agent, guest, pkg, kver)
            tar = work / "root.tar"
            if self.native:
                self._debootstrap(tar, overlay, kver)
            else:
                self._unpack_foreign(tar)
            self.say("making the root disk")
            tree = tar_digest(tar)
            disk = out / "disk.qcow2" if self.native else work / "setup.qcow2"
            self.root_disk_from_tar(
                tar,
                work / "root",
                work / "root.ext4",
                disk,
                size=DISK_SIZE,
                label="vmlease-root",
                overlays=() if self.native else (overlay, self._setup_files(work, kver)),
            )
            if not self.native:
                self._finish_in_guest(work, out, parts.kernel, disk)
            x86 = self.arch == "x86_64"
            manifest = {
                "name": self.name,
                "arch": self.arch,
                "build_id": build_id,
                "built_at": time.time(),
                "kernel": "vmlinux" if x86 else "Image",
                "initrd": "initrd.cpio",
                "disk": "disk.qcow2",
                "cmdline": self.cmdline,
                "min_memory_mb": MIN_MEMORY_MB,
                "ready": list(READY),
                "network": "user",
                "ssh_user": "root",
                "disk_bytes": _gib(DISK_SIZE),
                "grow_root": ["resize2fs", "/dev/vda"],
                # Debian's packages are built for the architecture's baseline, which
                # a plain CPU model runs faster under TCG than "max" does.
                "tcg_cpu": "qemu64" if x86 else "cortex-a57",
                "info": {
                    "suite": self.suite,
                    "mirror": self.mirror,
                    "kernel_package": kernel_id,
                    "kernel_release": kver,
                    "agent_protocol": AGENT_PROTOCOL,
                    "recipe": RECIPE_VERSION,
                    "tree_sha256": tree,
                    "installed": "on the host" if self.native else "in the guest",
                },
            }
            publish(out, final, manifest)
        finally:
            remove_tree(work, self.run)
        self.say(
            f"{self.what} image built ({build_id}) in {time.monotonic() - started:.0f} s: {final}"
        )
        return load_current(self.image_dir, self.name, self.arch)

    @property
    def cmdline(self) -> str:
        return CMDLINE if self.arch == "x86_64" else CMDLINE.replace("ttyS0", "ttyAMA0")

    def _unpack_foreign(self, tar: Path) -> None:
        """The root file system unpacked, not installed, with the packages' files
        kept for dpkg to install inside the guest (``_finish_in_guest``)."""
        hooks = []
        if self.suite == "bookworm" and _MERGED_USR_HOOKS.is_dir():
            hooks = [f"--hook-dir={_MERGED_USR_HOOKS}"]
        extract(
            self,
            self.arch,
            self.suite,
            self.mirror,
            (*MINBASE, *PACKAGES),
            tar,
            (*hooks, "--skip=cleanup/apt/cache"),
        )

    def _setup_files(self, work: Path, kver: str) -> Path:
        """The script that finishes the image inside its guest, and its settings,
        as a tarball to lay over the root file system."""
        settings = {
            "KERNEL_RELEASE": kver,
            "ENABLE": " ".join(ENABLED),
            "MASK": " ".join(MASKED),
            "DPKG_EXCLUDE": " ".join(_EXCLUDED),
            "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        }
        env = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
        tar = work / "setup.tar"
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
            for name, data, mode in (
                ("vmlease-setup", guest_file(_SETUP), 0o755),
                ("vmlease-setup.env", env.encode(), 0o644),
                ("dev", b"", 0o755),
            ):
                info = tarfile.TarInfo(name)
                info.mode = mode
                if name == "dev":
                    info.type = tarfile.DIRTYPE
                else:
                    info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return tar

    def _finish_in_guest(self, work: Path, out: Path, kernel: Path, disk: Path) -> None:
        """Install the unpacked packages inside the image's own guest, then keep its
        disk, compacted (the packages' files are gone from it)."""
        finish_in_guest(
            self,
            self.arch,
            disk=disk,
            kernel=kernel,
            initrd=out / "initrd.cpio",
            script="/vmlease-setup",
            console=work / "setup-console.log",
            env=os.environ,
        )
        self.check(
            [
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                str(disk),
                str(out / "disk.qcow2"),
            ],
            "compacting the root disk",
        )

    def _overlay(
        self, work: Path, agent: Path, guest: dict[str, bytes], pkg: Path, kver: str
    ) -> Path:
        """The files vmlease adds to the root file system, as a tarball whose
        entries belong to root with a package's modes, whoever builds."""
        overlay = work / "overlay"
        files = {**guest, "etc/hostname": b"vmlease\n"}
        for dest, data in files.items():
            path = overlay / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (overlay / "usr/sbin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(agent, overlay / "usr/sbin/vmlease-agent")
        (overlay / "usr/lib/modules").mkdir(parents=True, exist_ok=True)
        shutil.copytree(modules_dir(pkg, kver), overlay / "usr/lib/modules" / kver)

        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if not info.issym():
                executable = info.isdir() or info.name.endswith(_EXECUTABLE)
                info.mode = 0o755 if executable else 0o644
            return info

        tar = work / "overlay.tar"
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
            for path in sorted(overlay.rglob("*")):
                archive.add(path, str(path.relative_to(overlay)), recursive=False, filter=as_root)
        return tar

    def _debootstrap(self, tar: Path, overlay: Path, kver: str) -> None:
        """The root file system as a tarball of ``tar``: root's owners inside, the
        user's file outside. A user's mmdebstrap runs in its ``unshare`` mode."""
        mode = "root" if is_root() else "unshare"
        self.say(f"installing Debian {self.suite} from {self.mirror} (mmdebstrap, {mode} mode)")
        hooks = []
        if self.suite == "bookworm" and _MERGED_USR_HOOKS.is_dir():
            hooks = [f"--hook-dir={_MERGED_USR_HOOKS}"]
        argv = [
            "mmdebstrap",
            f"--mode={mode}",
            "--variant=minbase",
            "--format=tar",
            # No device nodes: a user namespace cannot make them, and the guest's
            # /dev is devtmpfs anyway; both ways give the same tree.
            "--skip=output/dev",
            "--quiet",
            *hooks,
            f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt={option}" for option in _EXCLUDED),
            f"--customize-hook=tar-in {overlay} /",
            f'--customize-hook=chroot "$1" depmod -a {kver}',
            f'--customize-hook=chroot "$1" systemctl enable {" ".join(ENABLED)}',
            f'--customize-hook=chroot "$1" systemctl mask {" ".join(MASKED)}',
            '--customize-hook=chroot "$1" passwd --lock root',
            # Host keys are made on the first boot (guest/debian/ssh-hostkeys.conf),
            # so that every build of the same inputs holds the same files.
            '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
            # python3's own tools are byte-compiled by its maintainer script, by
            # time stamp or by hash depending on the build's environment: by hash.
            '--customize-hook=chroot "$1" python3 -m compileall -q -f '
            "--invalidation-mode=checked-hash /usr/share/python3",
            # User-mode networking's DNS; written last, after mmdebstrap's own.
            '--customize-hook=echo "nameserver 10.0.2.3" > "$1/etc/resolv.conf"',
            self.suite,
            str(tar),
            self.mirror,
        ]
        self.check(
            argv,
            f"installing Debian {self.suite} with mmdebstrap",
            1800,
            env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
        )


def build_debian(
    image_dir: Path,
    name: str = "debian-12",
    *,
    force: bool = False,
    runner: Runner | None = None,
    progress: Progress | None = None,
    mirror: str | None = None,
    arch: str = "x86_64",
) -> Image:
    """Build (or find up to date) the Debian image ``name`` for ``arch`` in
    ``image_dir``; returns it."""
    if name not in SUITES:
        raise ImageBuildError(f"no Debian recipe {name!r}; there are {', '.join(SUITES)}")
    builder = _Builder(
        image_dir,
        name,
        runner or SubprocessRunner(),
        progress or (lambda _line: None),
        mirror or host_mirror(),
        arch,
    )
    return builder.build(force)


def _recipe(name: str) -> Recipe:
    def build(image_dir: Path, **options: object) -> Image:
        return build_debian(image_dir, name, **options)  # type: ignore[arg-type]

    return Recipe(
        name=name,
        summary=f"Debian {SUITES[name]} with systemd, SSH and python3; boots once, then "
        "starts from its saved state",
        build=build,
        arches=("x86_64", "aarch64"),
    )


RECIPES = tuple(_recipe(name) for name in SUITES)
