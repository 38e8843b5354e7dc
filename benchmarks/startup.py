"""What vmlease costs before any VM exists: the plugin's import and the command's start.

pytest imports the plugin in every run of a project that has vmlease
installed, VMs or not; ``vmlease ls`` and friends start a fresh interpreter
each time. Both are measured here, optionally side by side with another
checkout (``--baseline SRC``, the ``src`` directory of that checkout), in
alternating order so the machine's drift hits both alike:

- plugin import: in a fresh interpreter that has imported pytest, the time
  ``import vmlease.pytest_plugin`` takes (timed inside that interpreter), and
  the plugin's cumulative ``-X importtime`` figure;
- command start: ``python -m vmlease --version`` and ``vmlease ls`` on an
  empty state directory, wall time, with ``vmlease.cli``'s ``-X importtime``.
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
from typing import Any

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"

_PLUGIN_TIMED = (
    "import time, pytest\n"
    "t = time.perf_counter()\n"
    "import vmlease.pytest_plugin\n"
    "print(time.perf_counter() - t)\n"
)
_PROBES = {
    "python": "pass",
    "plugin": "import pytest, vmlease.pytest_plugin",
    "version": "import sys; from vmlease.cli import main; sys.argv[1:] = ['--version']; main()",
    "ls": "import sys; from vmlease.cli import main; sys.exit(main(['ls']))",
}


def _env(src: Path, state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env["VMLEASE_STATE_DIR"] = str(state)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _wall(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=False, timeout=60
    )
    return time.perf_counter() - start


def _timed_inside(code: str, env: dict[str, str]) -> float:
    """What the probe ``code`` prints: a time it measured itself, in seconds."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return float(done.stdout)


def _importtime_us(code: str, module: str, env: dict[str, str]) -> int:
    """The cumulative import time of ``module`` that ``-X importtime`` reports, in µs."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for line in done.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    return 0


def measure(trees: dict[str, Path], runs: int) -> dict[str, dict[str, float]]:
    """Medians per tree: wall times in seconds, import times in ms."""
    samples: dict[str, dict[str, list[float]]] = {
        t: {k: [] for k in (*_PROBES, "plugin_in", "plugin_importtime", "cli_importtime")}
        for t in trees
    }
    with tempfile.TemporaryDirectory(prefix="vmlease-startup-") as tmp:
        envs = {t: _env(src, Path(tmp) / t) for t, src in trees.items()}
        for env in envs.values():  # warm the bytecode caches
            for code in _PROBES.values():
                _wall(code, env)
        order = list(trees)
        for i in range(runs):
            for t in order if i % 2 == 0 else reversed(order):
                env = envs[t]
                for key, code in _PROBES.items():
                    samples[t][key].append(_wall(code, env))
                samples[t]["plugin_in"].append(_timed_inside(_PLUGIN_TIMED, env))
                samples[t]["plugin_importtime"].append(
                    _importtime_us(_PROBES["plugin"], "vmlease.pytest_plugin", env) / 1000
                )
                samples[t]["cli_importtime"].append(
                    _importtime_us(_PROBES["ls"], "vmlease.cli", env) / 1000
                )
    out: dict[str, dict[str, float]] = {}
    for t, by in samples.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        out[t] = {
            "plugin_import_s": med["plugin_in"],
            "plugin_importtime_ms": med["plugin_importtime"],
            "version_s": med["version"],
            "ls_s": med["ls"],
            "cli_importtime_ms": med["cli_importtime"],
            "python_s": med["python"],
        }
    return out


_ROWS = (
    ("plugin_import_s", "plugin import after pytest's (timed in-process)", 1000, "ms"),
    ("plugin_importtime_ms", "plugin import (-X importtime, cumulative)", 1, "ms"),
    ("version_s", "`vmlease --version` (wall)", 1000, "ms"),
    ("ls_s", "`vmlease ls`, empty state directory (wall)", 1000, "ms"),
    ("cli_importtime_ms", "vmlease.cli import (-X importtime, cumulative)", 1, "ms"),
    ("python_s", "bare interpreter start (wall), for scale", 1000, "ms"),
)


def main(*, runs: int, baseline: Path | None = None) -> int:
    trees = {"this tree": SRC}
    if baseline is not None:
        if not (baseline / "vmlease" / "__init__.py").is_file():
            print(f"--baseline must name a checkout's src directory; {baseline} is not one")
            return 2
        trees["baseline"] = baseline
    figures = measure(trees, runs)
    print(f"== start-up: medians of {runs}, alternating trees")
    header = f"{'':52}" + "".join(f"{t:>14}" for t in trees)
    if baseline is not None:
        header += f"{'ratio':>9}"
    print(header)
    for key, label, scale, unit in _ROWS:
        line = f"{label:52}" + "".join(f"{figures[t][key] * scale:>11.1f} {unit}" for t in trees)
        if baseline is not None and figures["baseline"][key] > 0:
            line += f"{figures['this tree'][key] / figures['baseline'][key]:>9.2f}"
        print(line)
    result: dict[str, Any] = {
        "runs": runs,
        "trees": {t: str(p) for t, p in trees.items()},
        "figures": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
