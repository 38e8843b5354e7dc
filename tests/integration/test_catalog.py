"""Catalog images by name on the QEMU backend, against a local HTTP server laid out
like the distributions' mirrors (``$VMLEASE_IMAGE_MIRRORS`` points the catalog's
URLs at it).

The real mirrors cannot be reached from these machines, so the server serves
the locally built cloud-style image (Debian with cloud-init) where Ubuntu's
would be, and a catalog of the test's own (``$VMLEASE_CATALOG``) gives it that
image's digest. ``vmlease image catalog --verify`` checks the real catalog
against the real mirrors where they can be reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.support.serve import SHORT, Served, cloud_source, serve
from vmlease._distros import CATALOG
from vmlease._inventory import inventory
from vmlease._retry import RetryPolicy

pytestmark = pytest.mark.timeout(900)

UBUNTU = "https://cloud-images.ubuntu.com/"
#: Where Ubuntu's mirror keeps the 22.04 image, below its root.
JAMMY = CATALOG["ubuntu-22.04"].disk("x86_64").url.removeprefix(UBUNTU)


@pytest.fixture(scope="module")
def mirror() -> Iterator[Served]:
    """Ubuntu's layout on 127.0.0.1: the test image where 22.04's is, and a packed file."""
    root = Path(tempfile.mkdtemp(prefix="vmlease-mirror-"))
    (root / JAMMY).parent.mkdir(parents=True)
    (root / JAMMY).symlink_to(cloud_source())
    (root / "packed.img").write_bytes(b"\xfd7zXZ\x00" + b"\0" * 8192)
    try:
        with serve(root) as served:
            yield served
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _use_mirror(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    *,
    digest: str,
    url: str = UBUNTU + JAMMY,
    under: str = "",
) -> None:
    """The catalog's ubuntu-22.04 with ``digest`` (and ``url``), fetched from the mirror."""
    entry = {
        "title": "Ubuntu 22.04 LTS (jammy), the test's mirror",
        "disks": {"x86_64": {"url": url, "digest": digest}},
        "orbstack": "ubuntu:jammy",
        "multipass": "22.04",
        "aliases": ["ubuntu:22.04", "ubuntu:jammy"],
    }
    (tmp_path / "catalog.json").write_text(json.dumps({"ubuntu-22.04": entry}))
    monkeypatch.setenv("VMLEASE_CATALOG", str(tmp_path / "catalog.json"))
    monkeypatch.setenv("VMLEASE_IMAGE_MIRRORS", f"{UBUNTU}={mirror.url}/{under}")


def _session(state: Path, images: Path) -> vmlease.Session:
    policy = RetryPolicy.parse("attempts=2,total_s=120").without_waits()
    return vmlease.Session(state_dir=state, backend_options={"image_dir": images}, retry=policy)


def _nothing_kept(images: Path, state: Path) -> None:
    home = images / "ubuntu-22.04"
    assert not home.exists() or not any(p for p in home.iterdir() if p.name != "current")
    assert inventory(state) == []


@pytest.mark.slow  # a whole import: the download, and the first boot with cloud-init (~70 s)
def test_a_catalog_name_is_imported_on_first_use_then_found_by_its_alias(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    images: Path,
    state: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _use_mirror(monkeypatch, tmp_path, mirror, digest=_digest(cloud_source()))
    caplog.set_level(logging.INFO, logger="vmlease.progress")
    with _session(state, images) as session:
        vm = session.create("ubuntu-22.04", memory_mb=512)
        assert vm.run(["hostname"], check=True).stdout.strip() == vm.name
        assert vm.run(["cloud-init", "status"]).stdout.strip() != "status: running"
        said = [r.getMessage() for r in caplog.records if r.name == "vmlease.progress"]
        assert any("importing it from Ubuntu 22.04" in line for line in said), said
        asked = len(mirror.requests)
        again = session.create("ubuntu:22.04", memory_mb=512)
        assert again.spec.image == "ubuntu-22.04"
        assert len(mirror.requests) == asked  # the cache has it: nothing downloaded
    manifest = json.loads((images / "ubuntu-22.04/current/manifest.json").read_text())
    assert manifest["info"]["source"] == f"{mirror.url}/{JAMMY}"


def test_a_digest_mismatch_keeps_nothing_and_makes_no_vm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mirror: Served, images: Path, state: Path
) -> None:
    _use_mirror(monkeypatch, tmp_path, mirror, digest="sha256:" + "ab" * 32)
    with _session(state, images) as session, pytest.raises(vmlease.ChecksumMismatch):
        session.create("ubuntu-22.04")
    _nothing_kept(images, state)


def test_a_truncated_download_is_retried_then_reported_and_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mirror: Served,
    images: Path,
    state: Path,
) -> None:
    _use_mirror(monkeypatch, tmp_path, mirror, digest=_digest(cloud_source()), under=SHORT[1:])
    before = len(mirror.requests)
    with _session(state, images) as session, pytest.raises(vmlease.DownloadError, match="ended"):
        session.create("ubuntu-22.04")
    assert len(mirror.requests) - before == 2  # the policy's two attempts
    _nothing_kept(images, state)


def test_a_file_that_is_not_a_disk_image_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mirror: Served, images: Path, state: Path
) -> None:
    packed = mirror.root / "packed.img"
    _use_mirror(monkeypatch, tmp_path, mirror, digest=_digest(packed), url=UBUNTU + "packed.img")
    with (
        _session(state, images) as session,
        pytest.raises(vmlease.ImageImportError, match="compressed with xz"),
    ):
        session.create("ubuntu-22.04")
    _nothing_kept(images, state)


def test_the_catalog_check_asks_each_mirror_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mirror: Served
) -> None:
    _use_mirror(monkeypatch, tmp_path, mirror, digest=_digest(cloud_source()))
    entry = json.loads((tmp_path / "catalog.json").read_text())
    entry["ubuntu-22.04"]["disks"]["aarch64"] = {
        "url": UBUNTU + "no/such-arm64.img",
        "digest": "sha256:" + "0" * 64,
    }
    (tmp_path / "catalog.json").write_text(json.dumps(entry))
    done = subprocess.run(
        [sys.executable, "-m", "vmlease", "image", "catalog", "--verify", "ubuntu:22.04"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = dict(line.split("  ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"ok", "FAIL"}
    assert "ubuntu-22.04 x86_64" in lines["ok"]
    assert "sha256 matches" in lines["ok"]
    assert "ubuntu-22.04 aarch64" in lines["FAIL"]
    assert "404" in lines["FAIL"]
