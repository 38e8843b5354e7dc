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
by the guest, on a boot of its own (``_debian.py``).
"""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterable
from pathlib import Path

from vmlease._errors import ImageBuildError
from vmlease._spec import debian_arch, host_arch
from vmlease.backends.guest.images._rootless import is_root
from vmlease.backends.guest.images._steps import Steps, guest_file

__all__ = [
    "CROSS_COMPILERS",
    "KERNEL_PACKAGES",
    "compile_agent",
    "cross_tools",
    "extract",
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
    steps: Steps, arch: str, suite: str, mirror: str, packages: Iterable[str], tar: Path
) -> None:
    """``packages`` of ``arch`` from ``suite`` (and what they depend on) unpacked,
    not configured, into the tarball ``tar``."""
    wanted = ",".join(packages)
    mode = "root" if is_root() else "unshare"
    steps.say(f"fetching {wanted} for {debian_arch(arch)} from {mirror} (mmdebstrap, extract)")
    steps.check(
        [
            "mmdebstrap",
            f"--mode={mode}",
            "--variant=extract",
            f"--architectures={debian_arch(arch)}",
            f"--include={wanted}",
            "--skip=output/dev",
            "--format=tar",
            "--quiet",
            suite,
            str(tar),
            mirror,
        ],
        f"fetching {wanted} for {debian_arch(arch)}; if apt cannot find them, check the mirror",
        900,
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
