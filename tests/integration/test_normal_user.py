"""vmlease as a normal user: Debian's PATH for users, no root, sudo only where said.

Each test runs commands as a throwaway user (``tests/support/normal_user.py``)
with this checkout's vmlease, in that user's own state and cache directories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import libvirt_cache
from tests.support.cloud_image import build_cloud_image
from tests.support.cloud_image import missing_tools as cloud_image_tools
from tests.support.libvirtd import LibvirtDaemon, missing_tools
from tests.support.normal_user import NormalUser, unusable_reason
from vmlease._paths import image_dir
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason()))

_DEBIAN_VM = """
import subprocess, vmlease
with vmlease.Session() as session:
    vm = session.create(image="debian-12")
    vm.run(["sh", "-c", "echo served > /tmp/page"], check=True)
    vm.run(["sh", "-c", "cd /tmp && nohup python3 -m http.server 8000 >/dev/null 2>&1 &"])
    vm.wait_for_port(8000)
    port = vm.forward(8000)
    page = subprocess.run(["python3", "-c", f"import urllib.request; print(urllib.request."
                           f"urlopen('http://127.0.0.1:{port}/page', timeout=30).read().decode())"],
                          capture_output=True, text=True, timeout=60)
    ssh = subprocess.run(vm.ssh.argv(["hostname"]), capture_output=True, text=True, timeout=120)
    print(f"page={page.stdout.strip()} ssh={ssh.returncode}:{ssh.stdout.strip()} name={vm.name}")
"""


@pytest.fixture(scope="module")
def user() -> Iterator[NormalUser]:
    with NormalUser() as made:
        yield made


def _manifest(image_dir: Path, name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((image_dir / name / "current/manifest.json").read_text())
    return loaded


def test_the_example_suite_passes_as_a_normal_user(user: NormalUser) -> None:
    """scripts/example's suite, run the way the user would: tiny built by the user."""
    built = user.vmlease("image", "build", "tiny")
    assert "tiny" in built.stdout
    done = user.run(
        [
            user.python,
            "-m",
            "pytest",
            "-c",
            "examples/pytest.ini",
            "examples",
            "--ignore=examples/debian",
            "--ignore=examples/multiarch",
            "-q",
        ],
        cwd=user.checkout,
        PYTHONDONTWRITEBYTECODE="1",
    )
    assert " passed" in done.stdout
    assert "nothing left behind" in done.stdout


@pytest.mark.timeout(300)
def test_a_debian_image_built_by_a_user_is_the_one_root_builds(
    user: NormalUser, debian_image: Image
) -> None:
    """Same inputs, same build id and the same files (owners and modes included)."""
    user.vmlease("image", "build", "debian-12", timeout_s=240)
    theirs = _manifest(user.home / ".cache/vmlease/images", "debian-12")
    assert theirs["build_id"] == debian_image.build_id
    assert isinstance(theirs["info"], dict)
    assert theirs["info"]["tree_sha256"] == debian_image.info["tree_sha256"]
    assert not list((user.home / ".cache/vmlease/images/debian-12").glob(".build-*"))


@pytest.mark.timeout(420)
def test_a_debian_vm_serves_through_a_forward_and_answers_ssh_as_a_normal_user(
    user: NormalUser,
) -> None:
    user.vmlease("image", "build", "debian-12", timeout_s=240)  # up to date, or built here
    done = user.run([user.python, "-c", _DEBIAN_VM], timeout_s=150)
    fields = dict(f.split("=", 1) for f in done.stdout.split())
    assert fields["page"] == "served"
    assert fields["ssh"] == f"0:{fields['name']}"
    left = user.vmlease("ls", "--json")
    assert json.loads(left.stdout) == {"vms": []}


_SESSION_VMS = """
import vmlease
with vmlease.Session(backend="libvirt", backend_options={"uris": ["qemu:///session"]}) as s:
    first = s.create(image="tiny")  # boots, and saves the host's booted state
    second = s.create(image="tiny")  # starts from it
    print(first.run(["hostname"]).stdout.strip(), second.run(["hostname"]).stdout.strip(),
          second.name)
"""


@pytest.mark.timeout(420)
def test_a_libvirt_session_vm_as_a_normal_user(user: NormalUser) -> None:
    """qemu:///session: the user's own libvirtd, started by libvirt on first use."""
    if missing_tools().startswith("not installed") or "binding" in missing_tools():
        pytest.skip(missing_tools())
    user.vmlease("image", "build", "tiny")
    done = user.run([user.python, "-c", _SESSION_VMS], timeout_s=300)
    first, second, name = done.stdout.split()
    assert second == name
    assert first != second
    pool = user.home / ".local/share/libvirt/vmlease"
    assert pool.is_dir()
    assert user.files_not_owned() == []


_SYSTEM_VM = """
import sys, vmlease
uris = [sys.argv[1]]
with vmlease.Session(backend="libvirt", backend_options={"uris": uris}) as s:
    print(s.create(image="tiny").run(["id", "-u"]).stdout.strip())
"""


@pytest.mark.timeout(420)
def test_a_system_libvirt_for_a_user_in_its_group(user: NormalUser) -> None:
    """qemu:///system as Debian opens it: to members of group libvirt."""
    if missing_tools():
        pytest.skip(f"libvirt: {missing_tools()}")
    if subprocess.run(["getent", "group", "libvirt"], capture_output=True).returncode:
        pytest.skip("no group libvirt (libvirt-daemon-system makes it)")
    subprocess.run(["usermod", "-aG", "libvirt", user.name], check=True, env=_root_env_sbin())
    daemon = LibvirtDaemon(cache=libvirt_cache(), group="libvirt").start()
    try:
        user.vmlease("image", "build", "tiny")
        done = user.run([user.python, "-c", _SYSTEM_VM, daemon.unix_uri], timeout_s=300)
        assert done.stdout.strip() == "0"  # root in the guest; the user drove it
        assert daemon.qemu_pids() == []
    finally:
        daemon.stop()


_CLOUDY_VM = """
import vmlease
with vmlease.Session() as session:
    vm = session.create(image="cloudy")
    # cloud-init ran once, at the import, and is off in the image's VMs.
    finished = vm.run(["test", "-e", "/var/lib/cloud/instance/boot-finished"]).exit_code == 0
    print(finished, vm.run(["cloud-init", "status"]).stdout.split()[-1], vm.ssh.user)
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_cloud_image_is_imported_and_runs_as_a_normal_user(user: NormalUser) -> None:
    """The import's seeded first boot, and VMs of the result, as the user."""
    need = cloud_image_tools()
    if need:
        pytest.skip(f"building the test cloud image needs: apt-get install {' '.join(need)}")
    source = build_cloud_image(image_dir().parent / "test-data")  # built as root, once
    mine = user.home / "cloud.qcow2"
    shutil.copyfile(source, mine)
    os.chown(mine, user.uid, user.gid)
    user.vmlease("image", "import", "cloudy", str(mine), timeout_s=1100)
    done = user.run([user.python, "-c", _CLOUDY_VM], timeout_s=300)
    assert done.stdout.split() == ["True", "disabled", "vmlease"]
    assert user.files_not_owned() == []


def test_an_image_built_with_sudo_into_a_users_cache_belongs_to_the_user(
    user: NormalUser,
) -> None:
    cache = user.home / "sudo-cache"
    user.run(["mkdir", "-p", str(cache)])
    env = {**_root_env(), "VMLEASE_CACHE_DIR": str(cache)}
    sudo = {"SUDO_UID": str(user.uid), "SUDO_GID": str(user.gid), "SUDO_USER": user.name}
    _as_root(["image", "build", "tiny"], {**env, **sudo})
    assert user.files_not_owned() == []
    # The user finds it up to date and runs VMs on it.
    again = user.vmlease("image", "build", "tiny", VMLEASE_CACHE_DIR=str(cache))
    assert again.returncode == 0
    made = user.run(
        [
            user.python,
            "-c",
            "import vmlease\nwith vmlease.Session() as s:\n"
            "    print(s.create(image='tiny').run(['id', '-u']).stdout.strip())",
        ],
        VMLEASE_CACHE_DIR=str(cache),
    )
    assert made.stdout.strip() == "0"


def test_a_root_owned_cache_is_a_clear_error_for_the_user(user: NormalUser) -> None:
    """Built as root without sudo's variables: the user is told the path and the fix."""
    cache = user.home / "root-cache"
    _as_root(["image", "build", "tiny"], {**_root_env(), "VMLEASE_CACHE_DIR": str(cache)})
    refused = user.run(
        [user.python, "-c", "import vmlease\nwith vmlease.Session() as s: s.create(image='tiny')"],
        VMLEASE_CACHE_DIR=str(cache),
        check=False,
    )
    assert refused.returncode != 0
    assert "chown -R" in refused.stderr
    assert str(cache) in refused.stderr
    # A build that is current is found so by anyone who can read it.
    current = user.vmlease("image", "build", "tiny", VMLEASE_CACHE_DIR=str(cache))
    assert "up to date" in current.stderr
    shutil.rmtree(cache)
    assert user.files_not_owned() == []


def _root_env_sbin() -> dict[str, str]:
    return {**_root_env(), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def _root_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}


def _as_root(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "vmlease", *args],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
