"""vmlease on a Debian 13 (trixie) host: its kernel packages, QEMU and Python.

A trixie root file system, made with mmdebstrap and entered with pivot_root
(``tests/support/host_root.py``), stands in for a fresh trixie machine: this
checkout is installed there with trixie's own Python, and the example suites
run against trixie's QEMU and with images built from trixie's kernel
package, followed by the unit tests under trixie's Python.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.host_root import HostRoot
from vmlease.backends.guest.images._debian import host_mirror

ROOT = Path(__file__).resolve().parents[2]

_KERNEL = (
    "import json, sys; "
    "print([i['kernel_package'] for i in json.load(sys.stdin)['images'] if i['name'] == 'tiny'][0])"
)
_INSIDE = """
set -e
cd /src
apt-get update -q >/dev/null  # a fresh host has package lists; mmdebstrap leaves none
python3 -m venv --system-site-packages /venv
/venv/bin/pip install -q --no-deps --no-build-isolation --no-index .
export PATH=/venv/bin:$PATH
. /etc/os-release
echo "== host: $PRETTY_NAME, $(qemu-system-x86_64 --version | head -1), $(python3 --version)"
vmlease image build tiny
echo "== tiny kernel: $(vmlease image ls --json | python3 -c "$KERNEL")"
python -m pytest -c examples/pytest.ini examples --ignore=examples/debian \\
    --ignore=examples/multiarch -q -p no:cacheprovider
vmlease image build debian-12
python -m pytest -c examples/pytest.ini examples/debian -q -p no:cacheprovider
python -m pytest tests/unit -q -p no:cacheprovider
"""


def _tracked() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [Path(p) for p in listed if (ROOT / p).is_file()]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_example_suites_and_unit_tests_pass_on_a_trixie_host() -> None:
    with HostRoot("trixie", host_mirror()) as host:
        host.copy_in(_tracked(), ROOT, "/src")
        done = host.run(["env", f"KERNEL={_KERNEL}", "bash", "-c", _INSIDE], timeout_s=3000)
        report = f"--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
        assert done.returncode == 0, report
        assert "Debian GNU/Linux 13" in done.stdout, report
        assert "deb13" in done.stdout, report  # the tiny image boots trixie's own kernel
        assert "nothing left behind" in done.stdout, report
