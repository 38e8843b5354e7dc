"""Parts of an image for another architecture than this host's, made without
running any of its programs here.

An x86_64 host cannot run arm64 programs unless binfmt_misc hands them to
qemu-user, which a normal user cannot arrange and many hosts lack. Nothing
here needs it:

- packages are fetched and unpacked, never configured, by mmdebstrap's
  ``extract`` variant (in its ``unshare`` mode for a normal user), with apt
  told the foreign architecture; only the files a recipe asks for are taken
  out of its tarball;
- the guest agent is compiled by the cross compiler from the archive
  (``gcc-aarch64-linux-gnu``);
- the kernel is the architecture's own boot image (``Image`` on arm64, which
  QEMU's ``virt`` machine loads directly).

What only the guest can do (a Debian system's package configuration) is done
by the guest, on a boot of its own: ``finish_in_guest`` boots the unpacked
system once under emulation with a script in place of its init
(``guest/debian/setup-in-guest``), which installs the packages with dpkg and
powers off.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._runner import find_program
from vmlease._spec import debian_arch, host_arch
from vmlease.backends.guest.images._mirror import host_mirror, host_suite
from vmlease.backends.guest.images._rootless import is_root
from vmlease.backends.guest.images._steps import Steps, guest_file

#: Time stamps inside an image (logs, the shadow file's dates) are this, not the
#: build's time, so that builds of the same inputs hold the same files.
SOURCE_DATE_EPOCH = "1704067200"

__all__ = [
    "CROSS_COMPILERS",
    "KERNEL_PACKAGES",
    "SOURCE_DATE_EPOCH",
    "Parts",
    "compile_agent",
    "cross_tools",
    "extract",
    "fetch_parts",
    "finish_in_guest",
    "kernel_image",
    "take",
]

#: The cross compiler for each foreign architecture: program -> Debian packages.
CROSS_COMPILERS = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu libc6-dev-amd64-cross"),
}
#: The cloud kernel's meta-package, by architecture.
KERNEL_PACKAGES = {"x86_64": "linux-image-cloud-amd64", "aarch64": "linux-image-cloud-arm64"}
#: An arm64 kernel ``Image``'s magic, at byte 0x38 of its header.
_ARM64_MAGIC = b"ARM\x64"


def _compiler(arch: str) -> tuple[str, str]:
    """The C compiler for ``arch`` programs and its packages: this host's own for
    its own architecture, else the cross compiler."""
    return ("gcc", "gcc libc6-dev") if arch == host_arch() else CROSS_COMPILERS[arch]


def cross_tools(arch: str) -> dict[str, str]:
    """What building for ``arch`` from the archive needs besides the common tools
    (program -> package)."""
    compiler, packages = _compiler(arch)
    return {compiler: packages, "mmdebstrap": "mmdebstrap"}


def extract(
    steps: Steps,
    arch: str,
    suite: str,
    mirror: str,
    packages: Iterable[str],
    tar: Path,
    options: Sequence[str] = (),
) -> None:
    """``packages`` of ``arch`` from ``suite`` (and what they depend on) unpacked,
    not configured, into the tarball ``tar``. Each of ``packages`` may be an apt
    pattern (``?essential``); ``options`` go to mmdebstrap as they are."""
    wanted = list(packages)
    mode = "root" if is_root() else "unshare"
    what = ", ".join(wanted)
    steps.say(f"fetching {what} for {debian_arch(arch)} from {mirror} (mmdebstrap, extract)")
    steps.check(
        [
            "mmdebstrap",
            f"--mode={mode}",
            "--variant=extract",
            f"--architectures={debian_arch(arch)}",
            *(f"--include={package}" for package in wanted),
            "--skip=output/dev",
            "--format=tar",
            "--quiet",
            *options,
            suite,
            str(tar),
            mirror,
        ],
        f"fetching {what} for {debian_arch(arch)}; if apt cannot find them, check the mirror",
        1800,
        env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
    )


@dataclass(frozen=True, slots=True)
class Parts:
    """What an image for another architecture boots with, from the archive.

    Attributes:
        package: the unpacked kernel package (its ``boot`` and modules).
        release: the kernel's release (``6.1.0-50-cloud-arm64``).
        identity: what the build id records of the kernel.
        busybox: the architecture's static busybox (the initramfs's shell).
        kernel: the kernel QEMU boots, in the build's output folder.
    """

    package: Path
    release: str
    identity: str
    busybox: Path
    kernel: Path


def fetch_parts(steps: Steps, arch: str, work: Path, out: Path) -> Parts:
    """The cloud kernel and busybox of ``arch`` from the suite and mirror this host
    uses, unpacked under ``work``; the kernel to boot goes to ``out``."""
    tar = work / "parts.tar"
    extract(
        steps, arch, host_suite(), host_mirror(), (KERNEL_PACKAGES[arch], "busybox-static"), tar
    )
    pkg = work / "pkg"
    take(tar, pkg, ("boot", "usr/lib/modules", "bin/busybox", "usr/bin/busybox"))
    tar.unlink()
    vmlinuz = next(iter(sorted((pkg / "boot").glob("vmlinuz-*"))), None)
    found = (pkg / "bin/busybox", pkg / "usr/bin/busybox")
    busybox = next((b for b in found if b.is_file()), None)
    if vmlinuz is None or busybox is None:
        raise ImageBuildError(f"the {debian_arch(arch)} packages hold no kernel or busybox")
    if arch == "x86_64":
        kernel = out / "vmlinux"
        steps.vmlinux(vmlinuz, kernel)
    else:
        kernel = out / "Image"
        kernel_image(vmlinuz, kernel)
    release = vmlinuz.name.removeprefix("vmlinuz-")
    return Parts(pkg, release, f"{KERNEL_PACKAGES[arch]} {release}", busybox, kernel)


#: How a build boots an image of each architecture to finish it in the guest:
#: QEMU's machine and CPU, and the kernel's console.
_SETUP_MACHINES = {
    "aarch64": (["-M", "virt,gic-version=3", "-cpu", "cortex-a57"], "ttyAMA0"),
    "x86_64": (["-M", "microvm", "-cpu", "qemu64"], "ttyS0"),
}
#: The longest a guest may take to install its packages (about 2.5 minutes for
#: Debian 12 arm64 under TCG here).
SETUP_TIMEOUT_S = 1800.0


def finish_in_guest(
    steps: Steps,
    arch: str,
    *,
    disk: Path,
    kernel: Path,
    initrd: Path,
    script: str,
    console: Path,
    env: Mapping[str, str],
) -> None:
    """Boot ``disk`` once, emulated, with ``script`` (a path in the guest) in place of
    its init, and wait for the guest to power off; ImageBuildError with the console's
    last lines unless the script's last word is ``vmlease-setup: done``."""
    machine, tty = _SETUP_MACHINES[arch]
    qemu = env.get(f"VMLEASE_QEMU_{arch.upper()}") or f"qemu-system-{arch}"
    if find_program(qemu) is None:
        package = "qemu-system-arm" if arch == "aarch64" else "qemu-system-x86"
        raise ImageBuildError(f"{qemu} not found: install it with `apt-get install {package}`")
    # Without address-space randomisation TCG translates each new process's
    # libraries once, not again: dpkg's maintainer scripts run about 1.5x faster.
    cmdline = f"console={tty} panic=-1 quiet norandmaps vmlease.init={script}"
    steps.say(f"installing the packages inside the {debian_arch(arch)} guest (a few minutes)")
    done = steps.run(
        [
            qemu,
            *machine,
            "-accel",
            "tcg,thread=multi,tb-size=256",
            "-smp",
            str(min(2, os.cpu_count() or 1)),
            "-m",
            "1024",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-chardev",
            f"file,id=console,path={console}",
            "-serial",
            "chardev:console",
            "-drive",
            f"id=disk0,file={disk},if=none,format=qcow2,cache=unsafe",
            "-device",
            "virtio-blk-device,drive=disk0",
            "-device",
            "virtio-rng-device",
        ],
        timeout_s=SETUP_TIMEOUT_S,
    )
    text = console.read_text(errors="replace") if console.exists() else ""
    said = [line for line in text.splitlines() if line.startswith("vmlease-setup: ")]
    if said and said[-1].strip() == "vmlease-setup: done":
        return
    why = (
        f"did not finish within {SETUP_TIMEOUT_S:g} s"
        if done.returncode is None
        else f"ended ({done.returncode}; {done.stderr.strip()[-500:]})"
    )
    tail = "\n".join(text.splitlines()[-25:])
    raise ImageBuildError(
        f"the {debian_arch(arch)} guest that installs the image's packages {why}:\n{tail}"
    )


def take(tar: Path, out: Path, wanted: Iterable[str]) -> None:
    """The members of ``tar`` under the paths ``wanted`` (``boot``, ``usr/lib/modules``)
    written below ``out`` as files of this user, links kept; ``/lib`` and ``/usr/lib``
    are the same folder (merged /usr), so both spellings are looked for."""

    def plain(path: str) -> str:
        return path.removeprefix("usr/") if path.startswith("usr/lib/") else path

    prefixes = tuple(plain(p.strip("/")) for p in wanted)
    with tarfile.open(tar) as archive:
        for member in archive:
            name = member.name.removeprefix("./").rstrip("/")
            if not any(plain(name) == p or plain(name).startswith(p + "/") for p in prefixes):
                continue
            path = out / name
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.issym():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                path.symlink_to(member.linkname)
            elif member.isfile():
                path.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                path.write_bytes(source.read())
                path.chmod(0o755 if member.mode & 0o111 else 0o644)


def kernel_image(vmlinuz: Path, out: Path) -> None:
    """The arm64 kernel ``vmlinuz`` as the plain ``Image`` QEMU boots, in ``out``
    (Debian ships it plain; a gzip-compressed one is unpacked)."""
    data = vmlinuz.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[0x38:0x3C] != _ARM64_MAGIC:
        what = "an EFI zboot image" if data[4:8] == b"zimg" else "not an arm64 Image"
        raise ImageBuildError(
            f"{vmlinuz.name} is {what}; vmlease boots Debian's plain arm64 Image kernels"
        )
    out.write_bytes(data)


def compile_agent(steps: Steps, arch: str, work: Path) -> Path:
    """The guest agent for ``arch``, compiled static by its cross compiler."""
    compiler, packages = _compiler(arch)
    (work / "agent.c").write_bytes(guest_file("agent.c"))
    steps.check(
        [compiler, "-static", "-Os", "-s", "-o", str(work / "agent"), str(work / "agent.c")],
        f"compiling the guest agent for {arch} (needs {packages})",
    )
    return work / "agent"
