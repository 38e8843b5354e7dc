"""Catalog images on a backend that imports them: the pinned source, and the import
the first time a VM asks (policy, against the fake backend)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tests.doubles.fakes import FakeBackend
from vmlease._distros import CATALOG
from vmlease._errors import ImageImportError, ImageNotFound, InvalidSpec, UnsupportedOperation
from vmlease._named import catalog_source, check_or_import, parse_checksums, pinned
from vmlease._spec import VMSpec, host_arch

SHA = "a" * 64


def test_a_catalog_name_the_cache_lacks_is_imported_once_then_checked_again() -> None:
    backend = FakeBackend(images=("tiny",))
    imported: list[tuple[str, str]] = []

    def do_import(name: str, *, arch: str) -> None:
        imported.append((name, arch))
        backend.images = (*backend.images, name)

    check_or_import(backend, VMSpec.of(image="ubuntu:24.04"), do_import, {})
    assert imported == [("ubuntu-24.04", host_arch())]
    assert backend.ops() == ["check_spec", "check_spec"]
    check_or_import(backend, VMSpec.of(image="ubuntu-24.04"), do_import, {})
    assert len(imported) == 1


@pytest.mark.parametrize("image", ["no-such-image", "debian-12"])
def test_other_names_and_names_built_here_are_not_imported(image: str) -> None:
    def do_import(name: str, *, arch: str) -> None:
        raise AssertionError("nothing is imported")

    with pytest.raises(ImageNotFound):
        check_or_import(FakeBackend(), VMSpec.of(image=image), do_import, {})


def test_a_backend_that_imports_nothing_says_how_to_import_by_name() -> None:
    def do_import(name: str, *, arch: str) -> None:
        raise UnsupportedOperation("the fake backend cannot import images")

    with pytest.raises(ImageNotFound, match="vmlease image import fedora-44"):
        check_or_import(FakeBackend(), VMSpec.of(image="fedora-44"), do_import, {})


@pytest.mark.parametrize(
    ("text", "digest"),
    [
        (f"{SHA}  disk.qcow2\n{'b' * 64}  other.qcow2\n", f"sha256:{SHA}"),
        (f"{'b' * 64} *other.qcow2\n{SHA} *disk.qcow2\n", f"sha256:{SHA}"),
        (f"SHA256 (disk.qcow2) = {SHA}\n", f"sha256:{SHA}"),
        (f"SHA512 (dir/disk.qcow2) = {'c' * 128}\n", f"sha512:{'c' * 128}"),
        (f"{SHA.upper()}\n", f"sha256:{SHA}"),
    ],
)
def test_a_published_checksum_file_gives_the_files_digest(text: str, digest: str) -> None:
    assert parse_checksums(text, "disk.qcow2") == digest


def test_a_checksum_file_without_the_file_says_so() -> None:
    with pytest.raises(ImageImportError, match=r"name no disk\.qcow2"):
        parse_checksums(f"{SHA}  other.qcow2\n", "disk.qcow2")


class _Reply(io.BytesIO):
    def __enter__(self) -> _Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_an_image_replaced_in_place_takes_its_digest_from_the_checksum_file() -> None:
    asked: list[str] = []

    def opener(request: Any, timeout: float) -> _Reply:
        asked.append(request.full_url)
        name = "openSUSE-Leap-15.6-Minimal-VM.x86_64-Cloud.qcow2"
        return _Reply(f"{SHA}  {name}\n".encode())

    env = {"VMLEASE_IMAGE_MIRRORS": "https://download.opensuse.org/=http://127.0.0.1:1/suse/"}
    url, digest = pinned("opensuse-leap-15.6", "x86_64", env=env, opener=opener)
    assert url.startswith("http://127.0.0.1:1/suse/distribution/leap/15.6/")
    assert digest == f"sha256:{SHA}"
    assert asked == [url + ".sha256"]


@pytest.mark.parametrize(
    ("name", "arch", "says"),
    [
        ("debian-12", host_arch(), "vmlease image import debian-12-cloud"),
        ("archlinux", "aarch64", "aarch64"),
        ("no-such-image", host_arch(), "not in vmlease's catalog"),
    ],
)
def test_what_cannot_be_imported_by_name_is_refused_before_any_download(
    name: str, arch: str, says: str
) -> None:
    def opener(request: Any, timeout: float) -> _Reply:
        raise AssertionError("nothing is downloaded")

    with pytest.raises((ImageImportError, InvalidSpec), match=says):
        pinned(name, arch, env={}, opener=opener)


def test_a_pinned_image_needs_no_request() -> None:
    def opener(request: Any, timeout: float) -> _Reply:
        raise AssertionError("nothing is downloaded")

    disk = CATALOG["ubuntu-22.04"].disk(host_arch())
    assert pinned("ubuntu-22.04", host_arch(), env={}, opener=opener) == (disk.url, disk.digest)


@pytest.mark.parametrize(
    ("name", "arch", "firmware"),
    [
        ("ubuntu-22.04", "x86_64", "bios"),
        ("alpine-3.23", "x86_64", "uefi"),
        ("ubuntu-22.04", "aarch64", "uefi"),
        ("alpine-3.23", "aarch64", "uefi"),
    ],
)
def test_a_catalog_import_boots_through_the_firmware_its_image_needs(
    name: str, arch: str, firmware: str
) -> None:
    options: dict[str, Any] = {"arch": arch}
    url = catalog_source(name, options, env={})
    disk = CATALOG[name].disk(arch)
    assert (url, options["sha256"], options["firmware"]) == (disk.url, disk.digest, firmware)


def test_a_backend_without_private_networks_refuses_a_spec_that_names_one() -> None:
    def do_import(name: str, **options: Any) -> None:
        raise AssertionError("nothing is imported")

    with pytest.raises(UnsupportedOperation, match="no private networks"):
        check_or_import(FakeBackend(), VMSpec.of(networks=["lan"]), do_import, {})
