"""The parts of an import that need no VM: the download, the disk check, the seed."""

from __future__ import annotations

import email
import io
import json
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from vmlease import ChecksumMismatch, DownloadError, ImageImportError
from vmlease._runner import Completed
from vmlease._spec import VMSpec
from vmlease.backends.guest.images import Image
from vmlease.backends.guest.images._seed import check_user, check_user_data, user_data
from vmlease.backends.guest.images._source import (
    Download,
    check_digest,
    check_sha256,
    disk_format,
)
from vmlease.backends.qemu._launch import Accel, LaunchConfig, find_qboot, qemu_argv

BODY = b"disk bytes " * 1000
SHA = "5b0bd3b31e9c4a8f2a21c0d8fb0fa8c5a2b8f1e4a5d3e4c7c1f1b9f6f2d9d1a0"


class _Response(io.BytesIO):
    def __init__(self, body: bytes, length: int | None = None, broken_at: int | None = None):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}
        self._broken_at = broken_at

    def read(self, size: int | None = -1) -> bytes:
        if self._broken_at is not None and self.tell() >= self._broken_at:
            raise ConnectionResetError("reset by peer")
        limit = size if size and size > 0 else None
        if self._broken_at is not None:
            limit = min(limit or 1 << 30, self._broken_at - self.tell())
        return super().read(limit)


def _opener(*replies: Any) -> Any:
    """An opener answering each call with the next reply (a response or an error)."""
    queue = list(replies)

    def open_(_request: object, *, timeout: float) -> Any:
        reply = queue.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    return open_


def _download(opener: Any) -> Download:
    return Download("http://127.0.0.1:9/x.qcow2", progress=lambda _l: None, opener=opener)


def test_a_download_is_kept_whole_with_its_checksum(tmp_path: Path) -> None:
    import hashlib

    want = hashlib.sha256(BODY).hexdigest()
    got = _download(_opener(_Response(BODY)))(tmp_path / "img", want)
    assert (got.path.read_bytes(), got.digest) == (BODY, f"sha256:{want}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]


def test_a_download_is_checked_against_a_sha512_as_some_distributions_publish(
    tmp_path: Path,
) -> None:
    import hashlib

    want = f"sha512:{hashlib.sha512(BODY).hexdigest()}"
    got = _download(_opener(_Response(BODY)))(tmp_path / "img", want)
    assert got.digest == want
    wrong = "sha512:" + "0" * 128
    with pytest.raises(ChecksumMismatch, match="not the sha512:000"):
        _download(_opener(_Response(BODY)))(tmp_path / "img2", wrong)
    assert not (tmp_path / "img2").exists()


def test_a_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    with pytest.raises(ChecksumMismatch, match="not the sha256:5b0b"):
        _download(_opener(_Response(BODY)))(tmp_path / "img", SHA)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("reply", "transient"),
    [
        (urllib.error.URLError(ConnectionRefusedError("refused")), True),
        (urllib.error.HTTPError("u", 503, "Unavailable", {}, None), True),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 429, "Too Many", {}, None), True),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 404, "Not Found", {}, None), False),  # type: ignore[arg-type]
        (_Response(BODY, length=len(BODY) * 2), True),  # the body ended early
        (_Response(BODY, broken_at=4096), True),  # the connection broke
        (_Response(b""), False),
    ],
)
def test_download_failures_say_whether_to_try_again(
    tmp_path: Path, reply: Any, transient: bool
) -> None:
    with pytest.raises(DownloadError) as caught:
        _download(_opener(reply))(tmp_path / "img", None)
    assert caught.value.transient is transient
    assert list(tmp_path.iterdir()) == []  # nothing partial kept


def test_a_sha256_is_checked_for_shape() -> None:
    assert check_sha256("SHA256:" + SHA.upper()) == SHA
    assert check_sha256(None) is None
    assert check_digest(SHA) == f"sha256:{SHA}"
    assert check_digest("sha512:" + "a" * 128) == "sha512:" + "a" * 128
    with pytest.raises(ImageImportError, match="sha512:HEX"):
        check_digest("sha512:abc")
    with pytest.raises(ImageImportError, match="64 hexadecimal"):
        check_sha256("abc")


def _qemu_img(fmt: str, size: int) -> Any:
    def run(argv: list[str], **_kw: object) -> Completed:
        out = json.dumps({"format": fmt, "virtual-size": size})
        return Completed(tuple(argv), 0, out, "")

    return run


def test_a_raw_file_must_start_with_a_partition_table(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 8192)
    with pytest.raises(ImageImportError, match="no partition table"):
        disk_format(plain, _qemu_img("raw", 2**30), "plain.img")
    mbr = tmp_path / "mbr.img"
    mbr.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 8192)
    assert disk_format(mbr, _qemu_img("raw", 2**30), "mbr.img") == ("raw", 2**30)


@pytest.mark.parametrize(
    ("head", "said"),
    [
        (b"\x1f\x8b\x08", "gunzip"),
        (b"\xfd7zXZ\x00", "unxz"),
        (b"\0" * 257 + b"ustar", "tar xf"),
    ],
)
def test_archives_are_named_with_how_to_unpack_them(tmp_path: Path, head: bytes, said: str) -> None:
    path = tmp_path / "download"
    path.write_bytes(head + b"\0" * 4096)
    with pytest.raises(ImageImportError, match=said):
        disk_format(path, _qemu_img("raw", 2**30), "download")


def test_a_format_vmlease_does_not_import_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.iso"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageImportError, match="not a disk image vmlease imports"):
        disk_format(path, _qemu_img("dmg", 2**30), "x.iso")


def _cloud_config(data: bytes) -> dict[str, Any]:
    text = data.decode()
    assert text.startswith("#cloud-config\n")
    parsed: dict[str, Any] = json.loads(text.split("\n", 1)[1])
    return parsed


def test_the_seed_makes_a_key_only_sudo_user_and_installs_the_agent() -> None:
    config = _cloud_config(
        user_data(
            hostname="h",
            user="tester",
            public_key="ssh-ed25519 AAAA k",
            agent=b"\x7fELF",
            unit=b"[Unit]\n",
            openrc=b"#!/sbin/openrc-run\n",
        )
    )
    (account,) = config["users"]
    assert account["name"] == "tester"
    assert account["lock_passwd"] is True
    assert account["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert account["ssh_authorized_keys"] == ["ssh-ed25519 AAAA k"]
    assert config["ssh_pwauth"] is False
    assert {f["path"] for f in config["write_files"]} == {
        "/usr/sbin/vmlease-agent",
        "/etc/systemd/system/vmlease-agent.service",
        "/usr/lib/vmlease/openrc-vmlease-agent",
    }
    # The agent runs under whichever init the guest has, and the user gets a shell it has.
    scripts = [argv[2] for argv in config["runcmd"] if argv[:2] == ["sh", "-c"]]
    start = scripts[-1]
    assert "systemctl enable --now vmlease-agent.service" in start
    assert "rc-update add vmlease-agent default" in start
    # Only under OpenRC: systemd would take /etc/init.d/vmlease-agent for a SysV service.
    assert start.index("/etc/init.d/vmlease-agent") > start.index("elif")
    assert any("tester:" in script and "/bin/sh" in script for script in scripts)


def test_root_as_the_seed_user_gets_the_key_and_no_new_account() -> None:
    config = _cloud_config(
        user_data(hostname="h", user="root", public_key="k", agent=b"", unit=b"")
    )
    assert config["users"] == []
    assert config["disable_root"] is False
    assert config["ssh_authorized_keys"] == ["k"]


def test_a_users_cloud_config_is_a_second_part_whose_lists_add_to_vmleases() -> None:
    theirs = b"#cloud-config\nruncmd: [[touch, /x]]\n"
    kind = check_user_data(theirs, "ud")
    data = user_data(
        hostname="h", user="u", public_key="k", agent=b"", unit=b"", extra=theirs, extra_kind=kind
    )
    message = email.message_from_bytes(data)
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/cloud-config"]
    assert "list(append)" in parts[1]["Merge-Type"]
    assert parts[1].get_payload(decode=True) == theirs


@pytest.mark.parametrize(
    ("text", "kind"),
    [(b"#cloud-config\na: 1\n", "cloud-config"), (b"#!/bin/sh\ntrue\n", "x-shellscript")],
)
def test_user_data_kinds(text: bytes, kind: str) -> None:
    assert check_user_data(text, "f") == kind


@pytest.mark.parametrize("text", [b"", b"packages: [nginx]\n", b"\xff\xfe"])
def test_user_data_cloud_init_would_ignore_is_refused(text: bytes) -> None:
    with pytest.raises(ImageImportError, match="first line must be"):
        check_user_data(text, "f")


@pytest.mark.parametrize("user", ["", "Root", "a b", "-x", "x" * 33, "x;rm"])
def test_bad_user_names_are_refused(user: str) -> None:
    with pytest.raises(ImageImportError, match="not a user name"):
        check_user(user)


def _image(boot: str) -> Image:
    p = Path("/img")
    return Image(
        "i", "b", p, p / "k", p / "i", p / "d", "console=ttyS0", 256, "max", 0, {}, boot=boot
    )


def test_an_imported_image_boots_from_its_own_disk_with_pci_devices_in_fixed_slots() -> None:
    config = LaunchConfig("qemu", Accel.TCG, None)
    spec = VMSpec(image="i")
    argv = qemu_argv(config, Path("/vm"), "n", spec, _image("firmware"))
    assert "-kernel" not in argv
    assert "q35,memory-backend=ram0" in argv
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-blk-pci,drive=disk0,bootindex=0,addr=0x3" in devices
    seeded = qemu_argv(config, Path("/vm"), "n", spec, _image("firmware"), seed=Path("/s.iso"))
    seeded_devices = [seeded[i + 1] for i, a in enumerate(seeded) if a == "-device"]
    # The seed disk is extra: every other device keeps its slot (and the guest its names).
    assert set(devices) < set(seeded_devices)
    pvh = qemu_argv(config, Path("/vm"), "n", spec, _image("pvh"))
    assert "-kernel" in pvh
    assert not any("pci" in a for a in pvh)


def test_built_images_boot_through_qboot_by_name_or_keep_option_roms_for_seabios() -> None:
    """QEMU 8 and later boot microvm through SeaBIOS unless told otherwise; SeaBIOS
    needs its pvh.bin option ROM, which x-option-roms=off would take away."""
    spec = VMSpec(image="i")
    with_qboot = LaunchConfig("qemu", Accel.TCG, None, qboot="/usr/share/qemu/qboot.rom")
    argv = qemu_argv(with_qboot, Path("/vm"), "n", spec, _image("pvh"))
    assert argv[argv.index("-bios") + 1] == "/usr/share/qemu/qboot.rom"
    assert "microvm,acpi=on,x-option-roms=off,memory-backend=ram0" in argv
    seabios = qemu_argv(
        LaunchConfig("qemu", Accel.TCG, None), Path("/vm"), "n", spec, _image("pvh")
    )
    assert "-bios" not in seabios
    assert "microvm,acpi=on,memory-backend=ram0" in seabios


def test_qboot_is_found_beside_the_binary(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "share/qemu").mkdir(parents=True)
    (tmp_path / "share/qemu/qboot.rom").write_bytes(b"\0" * 65536)
    assert find_qboot(str(tmp_path / "bin/qemu-system-x86_64")) == str(
        tmp_path / "share/qemu/qboot.rom"
    )
