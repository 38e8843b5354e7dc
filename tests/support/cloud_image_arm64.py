"""An arm64 cloud-style Debian image built on this x86_64 host, to test importing
arm64 cloud images without a download.

Shaped like the arm64 images distributions publish: a disk whose EFI system
partition boots the kernel through systemd-boot (arm64 machines boot through
UEFI), and an ext4 root with Debian 12 for arm64, its cloud kernel and
initramfs, cloud-init and openssh-server without host keys, no vmlease agent,
no authorized key, root locked.

Nothing of arm64 runs on the host: the packages are unpacked by mmdebstrap's
``extract`` variant and installed by dpkg inside an emulated arm64 guest that
boots the root with the kernel and stage-1 initramfs of vmlease's own
``debian-12`` arm64 image, as vmlease builds that image. The guest's
initramfs-tools makes the initramfs; the kernel and it are then read out of the
root file system with debugfs. About five minutes under TCG; cached by its
inputs under the test-data directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.support.cloud_image import PACKAGES as X86_PACKAGES
from tests.support.cloud_image import disk, esp
from vmlease._runner import SubprocessRunner
from vmlease.backends.guest.images import Image
from vmlease.backends.guest.images._debian import MINBASE
from vmlease.backends.guest.images._foreign import (
    SOURCE_DATE_EPOCH,
    extract,
    finish_in_guest,
    take,
)
from vmlease.backends.guest.images._mirror import host_mirror
from vmlease.backends.guest.images._steps import Steps, guest_file

__all__ = ["TOOLS", "build_arm64_cloud_image"]

VERSION = "1"
PACKAGES = (
    *(p for p in X86_PACKAGES if p != "linux-image-cloud-amd64"),
    "linux-image-cloud-arm64",
    "initramfs-tools",
    # For its systemd-bootaa64.efi, which the EFI system partition boots.
    "systemd-boot-efi",
)
#: Program -> Debian package, besides what vmlease's arm64 builds need.
TOOLS = {"debugfs": "e2fsprogs", "mkfs.vfat": "dosfstools", "mcopy": "mtools"}
_LABEL = "cloudroot"
_SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootaa64.efi"
_EXCLUDED = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
)


def _setup_tar(work: Path, release: str) -> Path:
    """vmlease's in-guest setup script and its settings, with the cloud image's own
    files, as a tarball to lay over the unpacked root."""
    settings = {
        "KERNEL_RELEASE": release,
        "ENABLE": "systemd-networkd.service",
        "MASK": "systemd-networkd-wait-online.service",
        "DPKG_EXCLUDE": " ".join(_EXCLUDED),
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
    }
    env = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    files = {
        "vmlease-setup": (guest_file("guest/debian/setup-in-guest"), 0o755),
        "vmlease-setup.env": (env.encode(), 0o644),
        "etc/fstab": (f"LABEL={_LABEL} / ext4 defaults 0 1\n".encode(), 0o644),
        "etc/hostname": (b"debian\n", 0o644),
        # As distributions' cloud images: the locale cloud-init sets is generated.
        "etc/locale.gen": (b"en_US.UTF-8 UTF-8\n", 0o644),
    }
    tar = work / "setup.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
        for folder in ("dev", "etc"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.mode, info.size = mode, len(data)
            archive.addfile(info, io.BytesIO(data))
    return tar


def _dump(fs: Path, pattern: str, out: Path) -> Path:
    """The file of ``/boot`` whose name starts with ``pattern``, read out of ``fs``."""
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /boot", str(fs)], capture_output=True, text=True, check=True
    ).stdout
    names = sorted(
        part
        for line in listing.splitlines()
        for part in line.strip("/").split("/")[4:5]
        if part.startswith(pattern)
    )
    if not names:
        raise RuntimeError(f"no /boot/{pattern}* in the finished arm64 root:\n{listing}")
    subprocess.run(
        ["debugfs", "-R", f"dump /boot/{names[-1]} {out}", str(fs)], capture_output=True, check=True
    )
    return out


def build_arm64_cloud_image(cache: Path, helper: Image) -> Path:
    """The arm64 cloud-style qcow2 image, built on first use and cached; ``helper`` is
    vmlease's ``debian-12`` arm64 image, whose kernel and stage-1 initramfs boot the
    guest that installs the packages."""
    key = hashlib.sha256(f"{VERSION} {PACKAGES} {host_mirror()}".encode()).hexdigest()[:16]
    out = cache / f"cloud-arm64-{key}.qcow2"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    steps = Steps(SubprocessRunner(), lambda line: print(f"arm64 cloud image: {line}"))
    with tempfile.TemporaryDirectory(prefix=".cloud-arm64-", dir=cache) as tmp:
        work = Path(tmp)
        tar = work / "root.tar"
        hooks = "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"
        options = (hooks, "--skip=cleanup/apt/cache")
        extract(steps, "aarch64", "bookworm", host_mirror(), (*MINBASE, *PACKAGES), tar, options)
        parts = work / "parts"
        take(tar, parts, ("usr/lib/modules", _SYSTEMD_BOOT))
        release = next(iter(sorted(p.name for p in (parts / "usr/lib/modules").iterdir())))
        root = work / "root.qcow2"
        steps.root_disk_from_tar(
            tar,
            work / "tree",
            work / "root.raw",
            root,
            size="2G",
            label=_LABEL,
            overlays=[_setup_tar(work, release)],
        )
        finish_in_guest(
            steps,
            "aarch64",
            disk=root,
            kernel=helper.kernel,
            initrd=helper.initrd,
            script="/vmlease-setup",
            console=work / "setup-console.log",
            env=os.environ,
        )
        root_fs = work / "root.ext4"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(root), str(root_fs)],
            check=True,
            capture_output=True,
        )
        kernel = _dump(root_fs, "vmlinuz-", work / "vmlinuz")
        initrd = _dump(root_fs, "initrd.img-", work / "initrd.img")
        cmdline = f"root=LABEL={_LABEL} ro console=ttyAMA0 quiet"
        boot = esp(work, kernel, initrd, cmdline, parts / _SYSTEMD_BOOT, "BOOTAA64.EFI")
        disk(work, boot, root_fs, uefi=True).replace(out)
    return out
