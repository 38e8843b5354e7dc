"""The catalog of distribution images by name: entries, aliases, a user's own
catalog and mirrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmlease._distros import CATALOG, Disk, canonical, catalog, lookup, mirrored
from vmlease._errors import ConfigError, InvalidSpec
from vmlease._spec import VMSpec

NAMES = {
    "ubuntu-22.04",
    "ubuntu-24.04",
    "debian-12",
    "debian-13",
    "debian-12-cloud",
    "debian-13-cloud",
    "fedora-44",
    "rocky-9",
    "almalinux-9",
    "opensuse-leap-15.6",
    "archlinux",
    "alpine-3.23",
}


def test_every_release_the_seeds_use_is_in_the_catalog_for_both_architectures() -> None:
    assert set(CATALOG) == NAMES
    for distro in CATALOG.values():
        assert "x86_64" in distro.disks
        if distro.name != "archlinux":  # Arch Linux publishes no arm64 cloud image
            assert "aarch64" in distro.disks
        for disk in distro.disks.values():
            assert disk.url.startswith("https://")
            assert disk.digest or disk.checksums


def test_the_seeds_spelling_is_an_alias_of_the_catalog_name() -> None:
    assert canonical("ubuntu:22.04") == canonical("ubuntu:jammy") == "ubuntu-22.04"
    assert VMSpec.of(image="ubuntu:22.04").image == "ubuntu-22.04"
    assert VMSpec.of(image="debian:bookworm").image == "debian-12"
    assert canonical("my-image") == "my-image"
    assert lookup("tiny") is None
    ubuntu = lookup("ubuntu:24.04")
    assert ubuntu is not None
    assert (ubuntu.orbstack, ubuntu.multipass) == ("ubuntu:noble", "24.04")


def test_an_architecture_the_catalog_lacks_is_refused_with_those_there_are() -> None:
    arch = CATALOG["archlinux"]
    with pytest.raises(InvalidSpec, match=r"no cloud image for aarch64.*it has x86_64"):
        arch.disk("aarch64")


def test_a_users_catalog_adds_and_replaces_entries(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(
        json.dumps(
            {
                "ubuntu-22.04": {
                    "title": "Ubuntu 22.04 from our mirror",
                    "disks": {
                        "x86_64": {"url": "http://mirror/u.img", "digest": "sha256:" + "a" * 64}
                    },
                    "multipass": "22.04",
                    "aliases": ["ubuntu:22.04"],
                },
                "corp-os-1": {
                    "disks": {
                        "x86_64": {
                            "url": "https://corp/os.qcow2",
                            "checksums": "https://corp/os.qcow2.sha256",
                        }
                    }
                },
            }
        )
    )
    env = {"VMLEASE_CATALOG": str(path)}
    found = catalog(env)
    assert found["ubuntu-22.04"].disk("x86_64").url == "http://mirror/u.img"
    assert found["corp-os-1"].init == "systemd"
    assert "debian-12" in found
    assert canonical("ubuntu:22.04", env) == "ubuntu-22.04"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "cannot read it as JSON"),
        ("[]", "must be an object of entries"),
        ('{"x": {"disks": {"x86_64": {"url": "ftp://a"}}}}', "must be http"),
        ('{"x": {"disks": {"x86_64": {"url": "https://a", "digest": "md5:1"}}}}', "sha256:HEX"),
        ('{"x": {"disks": {"x86_64": {"url": "https://a"}}}}', "neither a digest"),
        ('{"x": {"disks": {}, "colour": "blue"}}', "unexpected keyword"),
    ],
)
def test_a_bad_catalog_file_says_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        catalog({"VMLEASE_CATALOG": str(path)})


def test_mirrors_rewrite_the_first_matching_prefix() -> None:
    env = {"VMLEASE_IMAGE_MIRRORS": "https://cloud-images.ubuntu.com/=http://127.0.0.1:8000/u/"}
    url = CATALOG["ubuntu-22.04"].disk("x86_64").url
    assert mirrored(url, env).startswith("http://127.0.0.1:8000/u/releases/jammy/")
    assert mirrored("https://other/x", env) == "https://other/x"
    with pytest.raises(ConfigError, match="PREFIX=REPLACEMENT"):
        mirrored(url, {"VMLEASE_IMAGE_MIRRORS": "nonsense"})
    assert Disk("https://a", "sha512:" + "b" * 128).digest.startswith("sha512:")
