"""Root against a normal user, side by side in one run (JSON in results/rootless.json).

- building debian-12 from the archive (``--force``, each in its own cache):
  as root (mmdebstrap's root mode, packed directly) and as a throwaway normal
  user (mmdebstrap's unshare mode, packed inside a user namespace); target:
  the user's build takes at most 1.2x root's;
- a warm start of debian-12 (create to ready, from the saved booted state) in
  each of those caches; target: the same within noise.

The builds alternate (root, user, root, ...) so that the machine's drift
touches both alike; figures are medians, with their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.normal_user import NormalUser, unusable_reason

RESULTS = Path(__file__).parent / "results"

_WARM = """
import sys, time, vmlease
with vmlease.Session() as session:
    session.create(image="debian-12").delete()  # the first boots and saves its state
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.monotonic()
        vm = session.create(image="debian-12")
        times.append(time.monotonic() - start)
        vm.delete()
print(" ".join(f"{t:.3f}" for t in times))
"""


def _build_as_root(cache: Path) -> float:
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "vmlease", "image", "build", "--force", "debian-12"],
        env={**os.environ, "VMLEASE_CACHE_DIR": str(cache)},
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.monotonic() - start


def _build_as_user(user: NormalUser) -> float:
    start = time.monotonic()
    user.vmlease("image", "build", "--force", "debian-12", timeout_s=1800)
    return time.monotonic() - start


def main(runs: int = 3) -> int:
    why = unusable_reason()
    if why is not None:
        print(f"rootless: skipped: {why}")
        return 1
    figures: dict[str, object] = {"runs": runs}
    with tempfile.TemporaryDirectory(prefix="vmlease-bench-root-") as tmp, NormalUser() as user:
        cache = Path(tmp) / "cache"
        root_builds, user_builds = [], []
        for _ in range(runs):
            root_builds.append(_build_as_root(cache))
            user_builds.append(_build_as_user(user))
        state = Path(tmp) / "state"
        env = {**os.environ, "VMLEASE_CACHE_DIR": str(cache), "VMLEASE_STATE_DIR": str(state)}
        root_warm = subprocess.run(
            [sys.executable, "-c", _WARM, str(runs * 3)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=1800,
        ).stdout.split()
        user_warm = user.run([user.python, "-c", _WARM, str(runs * 3)], timeout_s=1800)
        pairs = {
            "debian-12 build (s)": (root_builds, user_builds),
            "debian-12 warm start (s)": (
                [float(t) for t in root_warm],
                [float(t) for t in user_warm.stdout.split()],
            ),
        }
    print("rootless: root against a normal user, medians")
    print(f"{'':28} {'root':>8} {'user':>8} {'user/root':>10}")
    for label, (as_root, as_user) in pairs.items():
        r, u = statistics.median(as_root), statistics.median(as_user)
        print(f"{label:28} {r:8.2f} {u:8.2f} {u / r:9.2f}x")
        figures[label] = {"root": as_root, "user": as_user, "ratio": u / r}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rootless.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0
