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

``shape="alpine"`` is shaped like Alpine's cloud image instead: bootable
through UEFI only (systemd-boot on an EFI system partition, no boot code in
the MBR) and run by OpenRC rather than systemd, with ifupdown for
cloud-init's network configuration.
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
#: What the Alpine-shaped image has instead of systemd.
OPENRC = ("sysvinit-core", "openrc", "ifupdown")
_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
_SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
_SECTOR = 512
_BOOT_MIB = 64
_ROOT_MIB = 2048
_LABEL = "cloudroot"


def missing_tools() -> list[str]:
    """Debian packages to install before this image can be built."""
    need = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if not _MBR.is_file():
        need.add("syslinux-common")
    if not _SYSTEMD_BOOT.is_file():
        need.add("systemd-boot-efi")
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


def _mbr(parts: list[tuple[int, int, int, bool]], *, boot_code: bool = True) -> bytes:
    """syslinux's boot code (or none) and a partition table of (start, sectors, type,
    bootable)."""
    code = _MBR.read_bytes()[:440] if boot_code else b""
    sector = bytearray(code.ljust(440, b"\0"))
    sector += b"\0" * 6
    for start, count, kind, boot in parts:
        # CHS fields are ignored by every loader that reads LBA; fill them "too big".
        sector += struct.pack(
            "<B3sB3sII", 0x80 if boot else 0, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start, count
        )
    sector += b"\0" * (16 * (4 - len(parts)))
    sector += b"\x55\xaa"
    return bytes(sector)


def _packages(shape: str) -> tuple[str, ...]:
    if shape == "alpine":
        return (*(p for p in PACKAGES if p not in ("systemd-sysv", "dbus")), *OPENRC)
    return PACKAGES


def _tree(root: Path, shape: str) -> None:
    hooks = ["--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    init = ['--customize-hook=chroot "$1" systemctl enable systemd-networkd.service']
    if shape == "alpine":
        # As Alpine's image: the network comes up from what cloud-init writes.
        init = [
            '--customize-hook=printf "auto lo\\niface lo inet loopback\\n'
            'source /etc/network/interfaces.d/*\\n" > "$1/etc/network/interfaces"'
        ]
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--format=directory",
            "--quiet",
            *hooks,
            f"--include={','.join(_packages(shape))}",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            # Cloud images carry no host keys (cloud-init makes them on first boot)
            # and no password.
            '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
            '--customize-hook=chroot "$1" passwd --lock root',
            *init,
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


def esp(
    work: Path,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    systemd_boot: Path = _SYSTEMD_BOOT,
    removable: str = "BOOTX64.EFI",
) -> Path:
    """An EFI system partition that boots ``kernel`` through systemd-boot, found
    where firmware looks on removable media (``removable``)."""
    esp = work / "esp.fat"
    loader = work / "loader.conf"
    loader.write_text("default vmlease.conf\ntimeout 0\n")
    entry = work / "vmlease.conf"
    entry.write_text(f"title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n")
    _run(["mkfs.vfat", "-C", "-n", "ESP", str(esp), str(_BOOT_MIB * 1024)])
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for folder in ("::EFI", "::EFI/BOOT", "::loader", "::loader/entries"):
        _run(["mmd", "-i", str(esp), folder], env=env)
    for src, name in (
        (systemd_boot, f"EFI/BOOT/{removable}"),
        (loader, "loader/loader.conf"),
        (entry, "loader/entries/vmlease.conf"),
        (kernel, "vmlinuz"),
        (initrd, "initrd.img"),
    ):
        _run(["mcopy", "-i", str(esp), str(src), f"::{name}"], env=env)
    return esp


def build_cloud_image(cache: Path, *, cloud_init: bool = True, shape: str = "debian") -> Path:
    """The qcow2 cloud-style image, built on first use (about two minutes) and cached;
    ``shape`` is ``debian`` (BIOS, systemd) or ``alpine`` (UEFI only, OpenRC)."""
    key = hashlib.sha256(
        f"{VERSION} {_packages(shape)} {host_mirror()} {cloud_init} {shape}".encode()
    ).hexdigest()[:16]
    out = cache / f"cloud-{key}.qcow2"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tree = _cached_tree(cache, shape)
    with tempfile.TemporaryDirectory(prefix=".cloud-", dir=cache) as tmp:
        work = Path(tmp)
        cmdline = f"root=LABEL={_LABEL} ro console=ttyS0 quiet"
        if not cloud_init:
            cmdline += " cloud-init=disabled"
        uefi = shape == "alpine"
        if uefi:
            kernel = next(iter(sorted((tree / "boot").glob("vmlinuz-*"))))
            initrd = next(iter(sorted((tree / "boot").glob("initrd.img-*"))))
            boot = esp(work, kernel, initrd, cmdline)
        else:
            boot = _boot_partition(work, tree, cmdline)
        root_fs = work / "root.ext4"
        mke2fs = ["mke2fs", "-q", "-t", "ext4", "-L", _LABEL, "-E", "root_owner=0:0"]
        _run([*mke2fs, "-d", str(tree), str(root_fs), f"{_ROOT_MIB}M"])
        disk(work, boot, root_fs, uefi=uefi).replace(out)
    return out


def disk(work: Path, boot: Path, root_fs: Path, *, uefi: bool) -> Path:
    """A qcow2 disk of ``boot`` (an EFI system partition if ``uefi``) and ``root_fs``
    behind an MBR partition table."""
    boot_start = 2048
    boot_sectors = _BOOT_MIB * 2**20 // _SECTOR
    root_start = boot_start + boot_sectors
    root_sectors = root_fs.stat().st_size // _SECTOR
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.write(
            _mbr(
                [
                    (boot_start, boot_sectors, 0xEF if uefi else 0x0C, not uefi),
                    (root_start, root_sectors, 0x83, False),
                ],
                boot_code=not uefi,
            )
        )
        f.truncate((root_start + root_sectors) * _SECTOR)
    _copy_sparse(boot, raw, boot_start * _SECTOR)
    _copy_sparse(root_fs, raw, root_start * _SECTOR)
    partial = work / "cloud.qcow2"
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)])
    return partial


def _cached_tree(cache: Path, shape: str) -> Path:
    """The root file system tree, made once for both variants of a shape."""
    key = hashlib.sha256(f"{VERSION} {_packages(shape)} {host_mirror()}".encode()).hexdigest()[:16]
    tree = cache / f"cloud-tree-{key}"
    done = cache / f"cloud-tree-{key}.complete"
    if done.is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    partial = cache / f".cloud-tree-{key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    _tree(partial, shape)
    partial.rename(tree)
    done.write_text("")
    return tree
