"""What ``vmlease doctor`` checks for the QEMU backend."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from vmlease._checks import Check, Severity, disk_check
from vmlease._errors import BackendUnavailable, VMLeaseError
from vmlease._runner import Runner
from vmlease.backends.guest.images import list_images, rootless_blockers
from vmlease.backends.qemu._launch import Accel, LaunchConfig
from vmlease.backends.qemu._states import MemoryMode


class Checked(Protocol):
    """What the checks ask of the backend."""

    @property
    def accel_reason(self) -> str: ...

    @property
    def qemu(self) -> str: ...

    @property
    def qemu_img(self) -> str: ...

    @property
    def image_dir(self) -> Path: ...

    @property
    def runner(self) -> Runner: ...

    def require(self, program: str) -> str: ...

    def launch_config(self, arch: str | None = None) -> LaunchConfig: ...

    def memory_mode(self) -> tuple[MemoryMode, str]: ...


__all__ = ["preflight"]


def preflight(backend: Checked, *, cheap: bool = False) -> list[Check]:
    """The checks of ``vmlease doctor``: QEMU's programs, the accelerator, how
    booted states hold memory, the image cache and whether images can be built
    as this user."""
    checks = []
    for program in (backend.qemu, backend.qemu_img):
        try:
            checks.append(Check(f"qemu: {program}", Severity.OK, backend.require(program)))
        except BackendUnavailable as exc:
            checks.append(Check(f"qemu: {program}", Severity.FAIL, str(exc), BackendUnavailable))
    if cheap or any(c.status is Severity.FAIL for c in checks):
        return checks
    try:
        config = backend.launch_config()
    except VMLeaseError as exc:
        return [*checks, Check("qemu: accelerator", Severity.FAIL, str(exc), type(exc))]
    if config.accel is Accel.KVM:
        checks.append(Check("kvm", Severity.OK, f"KVM works: {backend.accel_reason}"))
    else:
        checks.append(
            Check(
                "kvm",
                Severity.WARN,
                f"KVM is not used ({backend.accel_reason}); guests run under software "
                "emulation (TCG), which works but is slower",
            )
        )
    mode, why = backend.memory_mode()
    how = {
        MemoryMode.MAPPED: "VMs map a saved guest's memory copy-on-write and reset by a new start",
        MemoryMode.STREAM: "VMs read a saved guest's whole memory and reset by snapshot",
    }[mode]
    checks.append(Check("booted states", Severity.OK, f"{mode} ({why}): {how}"))
    checks.append(disk_check("images", backend.image_dir))
    problems = rootless_blockers(backend.runner)
    if problems:
        checks.append(
            Check(
                "image builds",
                Severity.WARN,
                "Debian images cannot be built as you: "
                + "; ".join(map(str, problems))
                + " (tiny and imported images still can)",
            )
        )
    else:
        checks.append(Check("image builds", Severity.OK, "every recipe can build as you"))
    images = list_images(backend.image_dir)
    if images:
        names = ", ".join(sorted({i.name for i in images}))
        checks.append(Check("image cache", Severity.OK, f"{backend.image_dir}: {names}"))
    else:
        checks.append(
            Check(
                "image cache",
                Severity.WARN,
                f"no images in {backend.image_dir}; build the default one with "
                "`vmlease image build tiny` (a session would fail to create VMs)",
            )
        )
    return checks
