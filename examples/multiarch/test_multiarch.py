"""Example: one C program, cross-compiled on the host into an amd64 and an arm64
.deb, installed with apt and run on a Debian 12 VM of each architecture (the
arm64 one emulated), from one parametrized test."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import vmlease

pytestmark = pytest.mark.vm(image="debian-12")

APT = {"DEBIAN_FRONTEND": "noninteractive"}
SOURCE = Path(__file__).parent / "hello-arch.c"
#: Debian's name for each architecture, and the kernel's (what `uname -m` says).
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
CONTROL = """\
Package: hello-arch
Version: 1.0
Architecture: {arch}
Maintainer: vmlease examples <examples@vmlease.invalid>
Depends: libc6
Description: says which architecture it was built for and runs on
"""


def compiler(arch: str) -> str:
    """This host's gcc for its own architecture, else the cross compiler
    (gcc-aarch64-linux-gnu, gcc-x86-64-linux-gnu)."""
    machine = MACHINES[arch]
    if platform.machine() == machine:
        return "gcc"
    cross = f"{machine}-linux-gnu-gcc"
    if shutil.which(cross) is None:
        pytest.skip(
            f"{cross} is not installed (apt-get install gcc-{machine.replace('_', '-')}-linux-gnu)"
        )
    return cross


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """hello-arch_1.0_<arch>.deb for each architecture, built here."""
    out = tmp_path_factory.mktemp("debs")
    built = {}
    for arch in MACHINES:
        tree = out / arch
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "DEBIAN/control").write_text(CONTROL.format(arch=arch))
        (tree / "usr/bin").mkdir(parents=True)
        subprocess.run(
            [compiler(arch), "-O2", "-o", str(tree / "usr/bin/hello-arch"), str(SOURCE)],
            check=True,
            timeout=120,
        )
        deb = out / f"hello-arch_1.0_{arch}.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        built[arch] = deb
    return built


@pytest.mark.parametrize("vm", [{"arch": a} for a in MACHINES], indirect=True, ids=list(MACHINES))
def test_the_package_of_the_vms_architecture_installs_and_runs(
    vm: vmlease.VM, packages: dict[str, Path]
) -> None:
    arch = vm.run(["dpkg", "--print-architecture"], check=True).stdout.strip()
    machine = vm.run(["uname", "-m"], check=True).stdout.strip()
    assert machine == vm.spec.arch == MACHINES[arch]

    vm.put(packages[arch], "/tmp/hello-arch.deb")
    vm.run(["apt-get", "install", "-y", "/tmp/hello-arch.deb"], env=APT, check=True, timeout_s=300)
    said = vm.run(["hello-arch"], check=True).stdout
    assert said == f"hello-arch built for {machine}, running on {machine}\n"

    # The other architecture's build of the same package is refused by dpkg.
    [other] = [deb for name, deb in packages.items() if name != arch]
    vm.put(other, "/tmp/other.deb")
    refused = vm.run(["dpkg", "--install", "/tmp/other.deb"])
    assert refused.exit_code != 0
    assert "does not match system" in refused.stderr
