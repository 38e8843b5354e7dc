"""What ``vmlease doctor`` checks for the QEMU backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from vmlease._checks import Check, Severity, disk_check
from vmlease._errors import BackendUnavailable, VMLeaseError
from vmlease._runner import Runner, find_program
from vmlease._spec import ARCHES, host_arch
from vmlease.backends.guest._machine import UEFI_PACKAGES
from vmlease.backends.guest.images import cross_tools, list_images, rootless_blockers
from vmlease.backends.qemu._accel import EMULATOR_PACKAGES, LaunchConfigs
from vmlease.backends.qemu._launch import Accel, LaunchConfig, find_uefi
from vmlease.backends.qemu._states import MemoryMode


class Checked(Protocol):
    """What the checks ask of the backend."""

    configs: LaunchConfigs

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
    checks.append(_uefi_check(config))
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
    foreign = sorted(set(ARCHES.values()) - {host_arch()})
    checks += [_foreign_check(arch, backend) for arch in foreign]
    images = list_images(backend.image_dir)
    if images:
        names = ", ".join(sorted({i.folder for i in images}))
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


def _uefi_check(config: LaunchConfig) -> Check:
    """Whether cloud images that boot through UEFI only can be imported and run."""
    if config.uefi:
        return Check("uefi", Severity.OK, f"images that boot through UEFI use {config.uefi}")
    package = UEFI_PACKAGES.get(config.arch, "ovmf")
    return Check(
        "uefi",
        Severity.WARN,
        f"no UEFI firmware for {config.arch} guests: images that boot through UEFI only "
        f"(alpine-3.23) cannot be imported; `apt-get install {package}`",
    )


def _foreign_check(arch: str, backend: Checked) -> Check:
    """Whether guests of ``arch`` (not this machine's) can be emulated and their
    images built here, and what to install if not."""
    missing = [
        f"{program} ({package})"
        for program, package in {
            backend.configs.emulator(arch): EMULATOR_PACKAGES[arch],
            **cross_tools(arch),
        }.items()
        if find_program(program) is None
    ]
    if find_uefi(backend.configs.emulator(arch), arch, os.environ) is None:
        missing.append(f"UEFI firmware for its cloud images ({UEFI_PACKAGES[arch]})")
    if missing:
        return Check(
            f"{arch} guests",
            Severity.WARN,
            f"cannot run or build {arch} guests: missing {', '.join(missing)}",
        )
    return Check(f"{arch} guests", Severity.OK, "emulated (TCG); images build from the archive")
