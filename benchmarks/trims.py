"""What each boot trim of the Debian image buys, by ``systemd-analyze``.

debian-12 boots cold (no saved states), 1 vCPU, 512 MB, under the image's
kernel command line with all its trims, then with each trim left out in
turn, then with none (Debian's own flags). Each variant is a copy of the
image's manifest with another command line, beside links to the same
kernel, initramfs and disk. Per variant, medians of ``runs`` boots
(alternating variants, so drift falls on all alike): the kernel and
userspace times ``systemd-analyze`` reports, and create to ready.

The masked units are measured in one more variant: the same VM with the
units unmasked again and booted anew (stop, start); ``systemd-analyze
blame`` then says what each of them took, and the totals say what masking
all of them buys.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import vmlease
from vmlease._paths import image_dir
from vmlease.backends.guest.images import build_debian
from vmlease.backends.guest.images._debian import CMDLINE, MASKED
from vmlease.backends.qemu import QemuBackend

RESULTS = Path(__file__).parent / "results"
IMAGE = "debian-12"
MEMORY_MB = 512
#: Flags that are there for speed; console=ttyS0 and panic=-1 are there to work.
TRIMS = tuple(f for f in CMDLINE.split() if f not in ("console=ttyS0", "panic=-1"))
_STARTUP = re.compile(
    r"Startup finished in (?P<kernel>[\d.]+m?s) \(kernel\) \+ (?P<user>[\d.\smin]+?s) \(userspace\)"
)


def _seconds(text: str) -> float:
    """systemd's '1min 2.345s' or '812ms' as seconds."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*(min|ms|s)", text):
        total += float(number) * {"min": 60.0, "s": 1.0, "ms": 0.001}[unit]
    return total


def _variant(images: Path, name: str, cmdline: str) -> str:
    """An image ``name`` in ``images``: the debian-12 build with another command line."""
    source = build_debian(image_dir(), IMAGE)
    build = images / name / source.build_id
    build.mkdir(parents=True)
    manifest = json.loads((source.path / "manifest.json").read_text())
    manifest.update(name=name, cmdline=cmdline)
    for part in ("kernel", "initrd", "disk"):
        (build / manifest[part]).symlink_to(source.path / manifest[part])
    (build / "manifest.json").write_text(json.dumps(manifest))
    (images / name / "current").symlink_to(source.build_id)
    return name


def _analyze(vm: vmlease.VM) -> tuple[float, float]:
    text = vm.run(["systemd-analyze", "time"], check=True, timeout_s=60).stdout
    m = _STARTUP.search(text)
    if m is None:
        raise RuntimeError(f"cannot read systemd-analyze: {text!r}")
    return _seconds(m["kernel"]), _seconds(m["user"])


def _blame(vm: vmlease.VM) -> dict[str, float]:
    text = vm.run(["systemd-analyze", "blame", "--no-pager"], check=True, timeout_s=60).stdout
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if parts:
            found[parts[-1]] = _seconds(" ".join(parts[:-1]))
    return found


def main(*, runs: int) -> int:
    with tempfile.TemporaryDirectory(prefix="vmlease-trims-") as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        variants = {"all trims": _variant(images, "v-all", CMDLINE)}
        for flag in TRIMS:
            rest = " ".join(f for f in CMDLINE.split() if f != flag)
            variants[f"without {flag}"] = _variant(images, f"v-{len(variants)}", rest)
        stock = " ".join(f for f in CMDLINE.split() if f not in TRIMS)
        variants["no trims (Debian's flags)"] = _variant(images, "v-stock", stock)
        samples: dict[str, dict[str, list[float]]] = {
            v: {"kernel_s": [], "userspace_s": [], "ready_s": []} for v in variants
        }
        unmasked: dict[str, list[float]] = {"kernel_s": [], "userspace_s": []}
        blame: dict[str, list[float]] = {unit: [] for unit in MASKED}
        backend = QemuBackend(state_dir=tmp / "state", image_dir=images, warm_start=False)
        with vmlease.Session(backend=backend, state_dir=tmp / "state", boot_timeout_s=300) as s:
            for _ in range(runs):
                for label, image in variants.items():
                    started = time.monotonic()
                    vm = s.create(image=image, memory_mb=MEMORY_MB)
                    samples[label]["ready_s"].append(time.monotonic() - started)
                    kernel, user = _analyze(vm)
                    samples[label]["kernel_s"].append(kernel)
                    samples[label]["userspace_s"].append(user)
                    if label == "all trims":
                        vm.run(["systemctl", "unmask", *MASKED], check=True, timeout_s=60)
                        vm.stop()
                        vm.start()
                        vm.wait_until_succeeds(["systemctl", "is-system-running", "--wait"])
                        kernel, user = _analyze(vm)
                        unmasked["kernel_s"].append(kernel)
                        unmasked["userspace_s"].append(user)
                        took = _blame(vm)
                        for unit in MASKED:
                            blame[unit].append(took.get(unit, 0.0))
                    vm.delete()
    med: dict[str, dict[str, float]] = {
        label: {k: statistics.median(v) for k, v in figures.items()}
        for label, figures in samples.items()
    }
    med["units unmasked"] = {k: statistics.median(v) for k, v in unmasked.items()}
    units = {unit: statistics.median(v) for unit, v in blame.items()}
    base = med["all trims"]
    print(f"== trims: {IMAGE}, 1 vCPU, {MEMORY_MB} MB, cold boots, medians of {runs}")
    print(f"{'variant':34}{'kernel':>9}{'userspace':>11}{'ready':>9}  userspace vs all trims")
    for label, m in med.items():
        ready = f"{m['ready_s']:.1f} s" if "ready_s" in m else "-"
        delta = m["userspace_s"] - base["userspace_s"] + m["kernel_s"] - base["kernel_s"]
        print(
            f"{label:34}{m['kernel_s']:>8.2f}s{m['userspace_s']:>10.2f}s{ready:>9}  "
            f"{delta:+.2f} s (kernel + userspace)"
        )
    print("what each masked unit took when unmasked (systemd-analyze blame; 0: not started)")
    for unit, seconds in sorted(units.items(), key=lambda kv: -kv[1]):
        print(f"  {unit:42}{seconds:>7.2f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trims.json").write_text(
        json.dumps({"runs": runs, "variants": med, "masked_units_s": units}, indent=2) + "\n"
    )
    return 0
