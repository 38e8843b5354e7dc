from __future__ import annotations

import gzip
import lzma
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from vmlease import ImageBuildError, ImageNotFound
from vmlease._runner import SubprocessRunner, find_program, search_path
from vmlease.backends.guest._machine import MAC
from vmlease.backends.guest.images import (
    _foreign,
    _steps,
    _tiny,
    cache_name,
    find_image,
    list_images,
)
from vmlease.backends.guest.images._steps import guest_file


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + i * 8 : pos + 14 + i * 8], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_round_trip() -> None:
    entries = [("bin", 0o040755, b""), ("bin/x", 0o100755, b"abcde"), ("init", 0o100755, b"#!")]
    parsed = _parse_cpio(_steps.cpio_newc(entries))
    assert parsed == {name: (mode, data) for name, mode, data in entries}


def _ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6\0"
    path.write_bytes(lzma.compress(data) if path.name.endswith(".xz") else data)


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    _ko(tmp_path / "kernel/drivers/virtio/virtio_ring.ko", "")
    _ko(tmp_path / "kernel/drivers/virtio/virtio.ko", "virtio_ring")
    _ko(tmp_path / "kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring")
    _ko(tmp_path / "kernel/drivers/char/hw_random/virtio-rng.ko", "virtio,virtio_ring")
    order = [stem for stem, _ in _steps.load_order(tmp_path, ("virtio_blk", "virtio_rng"))]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "virtio-rng"]


def test_compressed_modules_are_unpacked_and_built_in_ones_left_out(tmp_path: Path) -> None:
    """Debian 13: modules under usr/lib/modules, xz-compressed; virtio built in."""
    modules = tmp_path / "usr/lib/modules/6.12.0-cloud"
    _ko(modules / "kernel/drivers/virtio/virtio_mmio.ko.xz", "virtio,virtio_ring")
    _ko(modules / "kernel/drivers/block/virtio_blk.ko.xz", "virtio")
    (modules / "modules.builtin").write_text(
        "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko\n"
    )
    assert _steps.modules_dir(tmp_path, "6.12.0-cloud") == modules
    order = _steps.load_order(modules, ("virtio_mmio", "virtio_blk", "virtio_console"))
    assert [stem for stem, _ in order] == ["virtio_mmio", "virtio_blk"]
    assert all(data.startswith(b"\x7fELF") for _, data in order)


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    _ko(tmp_path / "kernel/a.ko", "nothere")
    with pytest.raises(ImageBuildError, match="nothere"):
        _steps.load_order(tmp_path, ("a",))


def _bzimage(path: Path, payload: bytes) -> Path:
    """A bzImage-shaped file: setup header, then ``payload`` and its size."""
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 0x40, len(payload) + 4)
    body = b"\0" * 0x40 + payload + struct.pack("<I", 12345) + b"trailer"
    path.write_bytes(bytes(head) + body)
    return path


@pytest.mark.parametrize("how", ["gzip", "xz", "zstd", "lz4"])
def test_kernels_compressed_as_debian_12_and_13_do_are_unpacked(tmp_path: Path, how: str) -> None:
    elf = _elf(tmp_path, interp=False, note=(b"Xen", 18)).read_bytes()
    if how == "gzip":
        payload = gzip.compress(elf)
    elif how == "xz":
        payload = lzma.compress(elf)
    else:
        if shutil.which(how) is None:
            pytest.skip(f"{how} is not installed")
        (tmp_path / "elf.raw").write_bytes(elf)
        # lz4: the legacy frame the kernel uses; zstd names its output with -o.
        flags = ["-l"] if how == "lz4" else ["-o"]
        subprocess.run(
            [how, "-q", "-f", str(tmp_path / "elf.raw"), *flags, str(tmp_path / "elf.packed")],
            check=True,
        )
        payload = (tmp_path / "elf.packed").read_bytes()
    kernel = _bzimage(tmp_path / "vmlinuz", payload)
    _steps.Steps(SubprocessRunner(), lambda _line: None).vmlinux(kernel, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_a_kernel_compressed_otherwise_is_refused_by_name(tmp_path: Path) -> None:
    kernel = _bzimage(tmp_path / "vmlinuz", b"BZh91AY&SY" + b"\0" * 64)
    with pytest.raises(ImageBuildError, match="does not unpack"):
        _steps.Steps(SubprocessRunner(), lambda _line: None).vmlinux(kernel, tmp_path / "out")


def _elf(tmp_path: Path, interp: bool, note: tuple[bytes, int] | None) -> Path:
    """A minimal ELF64 with optional PT_INTERP and one PT_NOTE."""
    phoff, phentsize = 64, 56
    phdrs = []
    body = bytearray()
    data_off = phoff + phentsize * 2
    if interp:
        phdrs.append(struct.pack("<IIQQQQQQ", 3, 0, data_off, 0, 0, 10, 10, 1))
        body += b"/lib/ld.so"
    if note is not None:
        name, ntype = note
        desc = b"\0" * 8
        n = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0"
        n += b"\0" * (-len(n) % 4) + desc
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 0, data_off + len(body), 0, 0, len(n), len(n), 4))
        body += n
    head = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 57)
    struct.pack_into("<Q", head, 0x20, phoff)
    struct.pack_into("<HH", head, 0x36, phentsize, len(phdrs))
    path = tmp_path / "elf"
    path.write_bytes(bytes(head) + b"".join(phdrs).ljust(phentsize * 2, b"\0") + bytes(body))
    return path


def test_static_elf_detection(tmp_path: Path) -> None:
    assert _steps.is_static_elf(_elf(tmp_path, interp=False, note=None))
    assert not _steps.is_static_elf(_elf(tmp_path, interp=True, note=None))
    (tmp_path / "script").write_bytes(b"#!/bin/sh\n")
    assert not _steps.is_static_elf(tmp_path / "script")


def test_pvh_note_detection(tmp_path: Path) -> None:
    assert _steps.has_pvh_note(_elf(tmp_path, interp=False, note=(b"Xen", 18)))
    assert not _steps.has_pvh_note(_elf(tmp_path, interp=False, note=(b"Xen", 6)))
    assert not _steps.has_pvh_note(_elf(tmp_path, interp=False, note=(b"GNU", 18)))


def test_missing_tools_are_all_named_with_one_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr("vmlease._runner.SYSTEM_DIRS", ())  # not /usr/sbin either
    with pytest.raises(ImageBuildError) as info:
        _tiny.build_tiny(tmp_path / "images")
    message = str(info.value)
    assert "apt-get install" in message
    for package in ("qemu-utils", "lz4", "gcc", "e2fsprogs", "libc6-dev"):
        assert package in message
    assert not (tmp_path / "images").exists()


def test_a_missing_kernel_package_file_is_named(tmp_path: Path) -> None:
    if not all(find_program(t) for t in ("gcc", "lz4", "mke2fs", "qemu-img", "dpkg-deb")):
        pytest.skip("the image build tools are not installed")
    with pytest.raises(ImageBuildError, match="does not exist"):
        _tiny.build_tiny(tmp_path / "images", kernel_deb=tmp_path / "nope.deb")


def test_an_unknown_image_says_what_exists_and_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound) as info:
        find_image(tmp_path, "tiny")
    assert "vmlease image build tiny" in str(info.value)
    assert "none" in str(info.value)
    with pytest.raises(
        ImageNotFound, match=r"can build debian-12 .*, tiny \(`vmlease image build tiny`\)"
    ):
        find_image(tmp_path, "ubuntu")
    assert list_images(tmp_path / "missing") == []


def test_system_tools_are_found_without_sbin_on_path(tmp_path: Path) -> None:
    """A normal user's PATH on Debian has no /usr/sbin, where mke2fs lives."""
    if not Path("/usr/sbin/mke2fs").exists() and not Path("/sbin/mke2fs").exists():
        pytest.skip("e2fsprogs is not installed")
    user_path = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"}
    found = find_program("mke2fs", user_path)
    assert found is not None
    assert Path(found).parent.name == "sbin"
    assert search_path(user_path).startswith(user_path["PATH"])  # the user's own come first
    done = SubprocessRunner()(["mke2fs", "-V"], timeout_s=10, env=user_path)
    assert done.returncode == 0, done.stderr


def test_an_arm64_kernel_is_taken_plain_or_unpacked_and_anything_else_is_refused(
    tmp_path: Path,
) -> None:
    header = bytearray(64)
    header[0x38:0x3C] = b"ARM\x64"
    image = bytes(header) + b"kernel"
    for name, data in (("plain", image), ("packed", gzip.compress(image))):
        (tmp_path / name).write_bytes(data)
        _foreign.kernel_image(tmp_path / name, tmp_path / "Image")
        assert (tmp_path / "Image").read_bytes() == image
    (tmp_path / "zboot").write_bytes(b"MZ\0\0zimg" + bytes(100))
    with pytest.raises(ImageBuildError, match="EFI zboot"):
        _foreign.kernel_image(tmp_path / "zboot", tmp_path / "Image")


def test_parts_are_taken_from_a_tarball_under_either_spelling_of_lib(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for path in ("lib/modules/6.1/virtio.ko", "usr/lib/modules/6.12/net.ko", "etc/passwd"):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(path)
    with tarfile.open(tmp_path / "parts.tar", "w") as archive:
        archive.add(tree, ".")
    _foreign.take(tmp_path / "parts.tar", tmp_path / "out", ["usr/lib/modules"])
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.ko"))
    assert found == ["lib/modules/6.1/virtio.ko", "usr/lib/modules/6.12/net.ko"]
    assert not (tmp_path / "out/etc").exists()


def test_a_missing_image_for_another_arch_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match=re.escape("vmlease image build tiny --arch arm64")):
        find_image(tmp_path, "tiny", "aarch64")
    with pytest.raises(
        ImageNotFound, match=re.escape("vmlease image build debian-13 --arch arm64")
    ):
        find_image(tmp_path, "debian-13", "aarch64")
    assert cache_name("tiny", "aarch64") == "tiny@aarch64"
    assert cache_name("tiny") == "tiny"


def test_debian_images_find_the_user_mode_interface_by_qemus_mac() -> None:
    rule = guest_file("guest/debian/80-vmlease-network.rules").decode()
    assert f'ATTR{{address}}=="{MAC}"' in rule
    assert 'ENV{SYSTEMD_WANTS}+="vmlease-network@%k.service"' in rule
    unit = guest_file("guest/debian/vmlease-network@.service").decode()
    assert "ExecStart=/usr/libexec/vmlease-network %I" in unit


def test_the_user_mode_interface_gets_qemus_address_and_route_and_no_ipv6(
    tmp_path: Path,
) -> None:
    """The script run for real, on a TAP interface in a network namespace of its own."""
    if find_program("unshare") is None or find_program("ip") is None:
        pytest.skip("needs unshare and ip")
    script = tmp_path / "vmlease-network"
    script.write_bytes(guest_file("guest/debian/vmlease-network"))
    inside = (
        f"{{ ip tuntap add user0 mode tap && ip link set user0 address {MAC}; }} || exit 77; "
        f"sh {script} user0 && "
        "ip -br addr show dev user0 && ip route && "
        "cat /proc/sys/net/ipv6/conf/user0/disable_ipv6"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", inside],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"no network namespace with a TAP interface here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[2:] == ["10.0.2.15/24"]
    assert "default via 10.0.2.2 dev user0" in done.stdout
    assert lines[-1] == "1"
