"""A cloud-style Debian image built here, to test ``vmlease image import`` without a download.

It is shaped like the images distributions publish: one disk with a partition
table, a boot loader (syslinux from the MBR, on a FAT partition holding the
kernel and initramfs) and an ext4 root; Debian 12 with its own cloud kernel
and initramfs, cloud-init, openssh-server without host keys, no vmlease agent,
no authorized key, root locked. Built with mmdebstrap (root), mke2fs, mtools
and syslinux, nothing mounted; cached by its inputs under the test-data
directory beside the image cache.

``cloud_init=False`` gives the same disk whose kernel command line turns
cloud-init off (``cloud-init=disabled``): to the import it is an image
without cloud-init.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from vmlease.backends.guest.images._debian import host_mirror

__all__ = ["TOOLS", "build_cloud_image", "missing_tools"]

VERSION = "2"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-cloud-amd64",
    "cloud-init",
    "cloud-guest-utils",
    "locales",
    "openssh-server",
    "sudo",
    "netbase",
    "iproute2",
    "ca-certificates",
    "dbus",
)
#: Program -> Debian package.
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "qemu-img": "qemu-utils",
}
_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
_SECTOR = 512
_BOOT_MIB = 64
_ROOT_MIB = 2048
_LABEL = "cloudroot"


def missing_tools() -> list[str]:
    """Debian packages to install before this image can be built."""
    need = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if not _MBR.is_file():
        need.add("syslinux-common")
    return sorted(need)


def _run(argv: list[str], **kw: object) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True, **kw)  # type: ignore[call-overload]


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` into ``dst`` at byte ``offset``, skipping its holes."""
    with src.open("rb") as fin, dst.open("r+b") as fout:
        fd = fin.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            fin.seek(data)
            fout.seek(offset + data)
            left = hole - data
            while left:
                chunk = fin.read(min(left, 1 << 20))
                fout.write(chunk)
                left -= len(chunk)
            pos = hole


def _mbr(parts: list[tuple[int, int, int, bool]]) -> bytes:
    """syslinux's boot code and a partition table of (start, sectors, type, bootable)."""
    sector = bytearray(_MBR.read_bytes()[:440].ljust(440, b"\0"))
    sector += b"\0" * 6
    for start, count, kind, boot in parts:
        # CHS fields are ignored by every loader that reads LBA; fill them "too big".
        sector += struct.pack(
            "<B3sB3sII", 0x80 if boot else 0, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start, count
        )
    sector += b"\0" * (16 * (4 - len(parts)))
    sector += b"\x55\xaa"
    return bytes(sector)


def _tree(root: Path) -> None:
    hooks = ["--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--format=directory",
            "--quiet",
            *hooks,
            f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            # Cloud images carry no host keys (cloud-init makes them on first boot)
            # and no password.
            '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
            '--customize-hook=chroot "$1" passwd --lock root',
            '--customize-hook=chroot "$1" systemctl enable systemd-networkd.service',
            f'--customize-hook=echo "LABEL={_LABEL} / ext4 defaults 0 1" > "$1/etc/fstab"',
            '--customize-hook=echo "nameserver 10.0.2.3" > "$1/etc/resolv.conf"',
            '--customize-hook=echo debian > "$1/etc/hostname"',
            '--customize-hook=: > "$1/etc/machine-id"',
            # As distributions' cloud images: the locale cloud-init sets is generated.
            '--customize-hook=echo "en_US.UTF-8 UTF-8" > "$1/etc/locale.gen"',
            '--customize-hook=chroot "$1" locale-gen',
            "bookworm",
            str(root),
            host_mirror(),
        ],
        timeout=1800,
    )


def _boot_partition(work: Path, root: Path, cmdline: str) -> Path:
    boot = work / "boot.fat"
    kernel = next(iter(sorted((root / "boot").glob("vmlinuz-*"))))
    initrd = next(iter(sorted((root / "boot").glob("initrd.img-*"))))
    config = work / "syslinux.cfg"
    config.write_text(
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n"
        f"  APPEND initrd=initrd.img {cmdline}\n"
    )
    _run(["mkfs.vfat", "-C", "-n", "BOOT", str(boot), str(_BOOT_MIB * 1024)])
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (config, "syslinux.cfg")):
        _run(["mcopy", "-i", str(boot), str(src), f"::{name}"], env=env)
    _run(["syslinux", "--install", str(boot)])
    return boot


def build_cloud_image(cache: Path, *, cloud_init: bool = True) -> Path:
    """The qcow2 cloud-style image, built on first use (about two minutes) and cached."""
    key = hashlib.sha256(f"{VERSION} {PACKAGES} {host_mirror()} {cloud_init}".encode()).hexdigest()[
        :16
    ]
    out = cache / f"cloud-{key}.qcow2"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tree = _cached_tree(cache)
    with tempfile.TemporaryDirectory(prefix=".cloud-", dir=cache) as tmp:
        work = Path(tmp)
        cmdline = f"root=LABEL={_LABEL} ro console=ttyS0 quiet"
        if not cloud_init:
            cmdline += " cloud-init=disabled"
        boot = _boot_partition(work, tree, cmdline)
        root_fs = work / "root.ext4"
        mke2fs = ["mke2fs", "-q", "-t", "ext4", "-L", _LABEL, "-E", "root_owner=0:0"]
        _run([*mke2fs, "-d", str(tree), str(root_fs), f"{_ROOT_MIB}M"])
        boot_start = 2048
        boot_sectors = _BOOT_MIB * 2**20 // _SECTOR
        root_start = boot_start + boot_sectors
        root_sectors = _ROOT_MIB * 2**20 // _SECTOR
        raw = work / "disk.raw"
        with raw.open("wb") as f:
            f.write(
                _mbr(
                    [
                        (boot_start, boot_sectors, 0x0C, True),
                        (root_start, root_sectors, 0x83, False),
                    ]
                )
            )
            f.truncate((root_start + root_sectors) * _SECTOR)
        _copy_sparse(boot, raw, boot_start * _SECTOR)
        _copy_sparse(root_fs, raw, root_start * _SECTOR)
        partial = work / "cloud.qcow2"
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)])
        partial.replace(out)
    return out


def _cached_tree(cache: Path) -> Path:
    """The root file system tree, made once for both variants."""
    key = hashlib.sha256(f"{VERSION} {PACKAGES} {host_mirror()}".encode()).hexdigest()[:16]
    tree = cache / f"cloud-tree-{key}"
    done = cache / f"cloud-tree-{key}.complete"
    if done.is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    partial = cache / f".cloud-tree-{key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    _tree(partial)
    partial.rename(tree)
    done.write_text("")
    return tree
