"""Importing a cloud image: ``vmlease image import NAME SOURCE``.

The source (a local file, or an http(s) URL downloaded whole and checked
against ``--sha256``) is converted into the build's own qcow2 disk. That disk
boots once, the way it would in a cloud: firmware (the BIOS, or UEFI for
arm64 images and those that boot through nothing else), its boot loader, its
own kernel and initramfs, with a cloud-init NoCloud seed made by
vmlease (``images/_seed.py``) that creates the SSH user, installs the vmlease
agent and runs the user's ``--user-data``. When cloud-init has finished
(asked through the agent: ``cloud-init status --wait``), vmlease disables
cloud-init in the guest and powers it off (through systemd, or OpenRC's
``poweroff``): the disk is the image. VMs of the
image then never run cloud-init; they boot (or start from a saved booted
state) like any other image.

``--no-seed`` is for an image that already runs the vmlease agent: it boots
without a seed, and the import only checks that the agent answers.

Nothing partial is kept: the work happens in a temporary directory beside
the image's builds and becomes a build only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmlease._errors import (
    BootError,
    ChannelError,
    ChecksumMismatch,
    ImageImportError,
    VMLeaseError,
)
from vmlease._runner import Runner
from vmlease._spec import Network, VMSpec
from vmlease._ssh import ensure_key
from vmlease.backends.guest._agent import AgentChannel
from vmlease.backends.guest._machine import UEFI_PACKAGES
from vmlease.backends.guest.images import AGENT_PROTOCOL, RECIPES, Image, cache_name, load_current
from vmlease.backends.guest.images._foreign import compile_agent, cross_tools
from vmlease.backends.guest.images._seed import (
    check_user,
    check_user_data,
    meta_data,
    user_data,
    write_seed,
)
from vmlease.backends.guest.images._source import (
    Download,
    Opener,
    Source,
    check_digest,
    digest_of,
    disk_format,
    is_url,
)
from vmlease.backends.guest.images._steps import (
    Progress,
    Steps,
    existing_build,
    guest_file,
    publish,
    require_tools,
)
from vmlease.backends.qemu._launch import CONSOLE_LOG, DISK, LaunchConfig, qemu_argv
from vmlease.backends.qemu._processes import Live, Processes, kill_all, wait_exit

__all__ = ["BOOT_DIR", "IMAGE_NAME", "import_image"]

#: Runs a download's attempts under the caller's retry policy.
Retry = Callable[[Callable[[], Source]], Source]

IMPORT_VERSION = "1"
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: The first boot's shape: cloud-init is Python, and faster with two CPUs.
FIRST_BOOT = VMSpec(image="import", cpus=2, memory_mb=1024, network=Network.USER)
MIN_MEMORY_MB = 256
#: The first boot's VM directory, in the import's work directory.
BOOT_DIR = "first-boot"
#: After a login prompt, how long to wait for cloud-init to say anything.
_NO_CLOUD_INIT_GRACE_S = 20.0
_POWEROFF_S = 120.0
#: Up: systemd has finished starting units and the SSH server runs (Debian's and
#: Ubuntu's unit is ssh.service, Fedora's sshd.service); or, under OpenRC
#: (Alpine), the default runlevel is reached and its SSH service started (waited
#: for, as systemd's --wait does; the caller's deadline bounds it).
READY = (
    "sh",
    "-c",
    "if [ -d /run/systemd/system ]; then "
    "systemctl is-system-running --wait >/dev/null; s=$(systemctl is-system-running); "
    'case "$s" in running|degraded) systemctl is-active --quiet ssh.service '
    "|| systemctl is-active --quiet sshd.service ;; "
    '*) echo "systemd is $s"; exit 1 ;; esac; '
    "elif command -v rc-status >/dev/null; then "
    'until [ "$(rc-status --runlevel)" = default ] && { rc-service sshd status '
    ">/dev/null 2>&1 || rc-service ssh status >/dev/null 2>&1; }; do sleep 0.2; done; "
    'else echo "neither systemd nor OpenRC runs"; exit 1; fi',
)
#: Keeps cloud-init from running again: systemd's generator reads the file; under
#: OpenRC its services leave every runlevel.
DISABLE_CLOUD_INIT = (
    "sh",
    "-c",
    "touch /etc/cloud/cloud-init.disabled; if [ ! -d /run/systemd/system ] && "
    "command -v rc-update >/dev/null; then for s in cloud-init-local cloud-init cloud-config "
    'cloud-final; do rc-update -a del "$s" >/dev/null 2>&1; done; fi; true',
)
#: Powers the guest off under whichever init it runs.
POWEROFF = (
    "sh",
    "-c",
    "if [ -d /run/systemd/system ]; then systemctl poweroff --no-block; else poweroff; fi",
)
#: The firmware an imported image boots through unless told: the BIOS on
#: x86_64 (every distribution's image boots through it), UEFI elsewhere.
DEFAULT_FIRMWARE = {"x86_64": "bios"}
#: The CPU emulated for an imported image: distributions build x86_64 for
#: different levels (RHEL 9: v2), so every feature; arm64 ones for ARMv8.0.
IMPORT_TCG_CPU = {"x86_64": "max", "aarch64": "cortex-a57"}
#: Grows the root partition (growpart) and its file system to the disk's size.
GROW_ROOT = (
    "sh",
    "-ec",
    'src=$(findmnt -no SOURCE /); disk=/dev/$(lsblk -no PKNAME "$src"); '
    'part=$(cat "/sys/class/block/$(basename "$src")/partition"); '
    'growpart "$disk" "$part" || [ $? -eq 1 ]; '
    'case $(findmnt -no FSTYPE /) in ext*) resize2fs "$src" ;; xfs) xfs_growfs / ;; '
    "btrfs) btrfs filesystem resize max / ;; esac",
)
_TOOLS = {"qemu-img": "qemu-utils"}


def _once(attempt: Callable[[], Source]) -> Source:
    return attempt()


def import_image(image_dir: Path, name: str, source: str, **options: Any) -> Image:
    """Import ``source`` as image ``name`` (see ``_import`` for the options), one
    import of a name at a time in the cache: another waits, then finds it done."""
    if not IMAGE_NAME.fullmatch(name):
        raise ImageImportError(
            f"{name!r} cannot name an image: use lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, at most 63 characters"
        )
    if name in RECIPES:
        raise ImageImportError(
            f"{name!r} is an image vmlease builds (`vmlease image build {name}`): "
            "import under another name"
        )
    image_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(image_dir / f".import-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # freed by the kernel if this process dies
        return _import(image_dir, name, source, **options)
    finally:
        os.close(fd)


def _import(
    image_dir: Path,
    name: str,
    source: str,
    *,
    config: LaunchConfig,
    state_dir: Path,
    runner: Runner,
    progress: Progress | None = None,
    sha256: str | None = None,
    user: str = "vmlease",
    user_data_file: Path | None = None,
    seed: bool = True,
    force: bool = False,
    retry: Retry | None = None,
    opener: Opener | None = None,
    timeout_s: float = 900.0,
    boot_root: Path | None = None,
    boot_name: str = BOOT_DIR,
    firmware: str | None = None,
) -> Image:
    """Import ``source`` as image ``name`` (or find it up to date); returns the image.

    The first boot runs as VM ``boot_name`` under ``boot_root`` (the backend's
    VM directories, so that the VM's owner, a session, deletes it like any
    other if the import dies), or else inside the import's work directory.
    The image is for ``config.arch`` and boots through ``firmware`` (``bios``
    or ``uefi``; ``DEFAULT_FIRMWARE`` if None).
    """
    say = progress or (lambda _line: None)
    arch = config.arch
    firmware = _firmware(arch, firmware, config)
    want = check_digest(sha256)
    user = check_user(user)
    extra: bytes | None = None
    kind = "cloud-config"
    if user_data_file is not None:
        if not seed:
            raise ImageImportError("--user-data needs the seed: leave out --no-seed")
        try:
            extra = user_data_file.read_bytes()
        except OSError as exc:
            raise ImageImportError(f"cannot read --user-data {user_data_file}: {exc}") from exc
        kind = check_user_data(extra, str(user_data_file))
    if not is_url(source):
        local = Path(source).expanduser()
        if "://" in source:
            raise ImageImportError(
                f"{source}: vmlease imports from http:// or https:// URLs and local files"
            )
        if not local.is_file():
            raise ImageImportError(f"{source} does not exist (or is not a file)")
    compiler = cross_tools(arch)
    compiler.pop("mmdebstrap", None)
    require_tools(f"{name} (import)", {**_TOOLS, **compiler}, busybox=False)

    unit = guest_file("guest/debian/vmlease-agent.service")
    openrc = guest_file("guest/openrc/vmlease-agent")
    inputs: tuple[object, ...] = (user, extra or b"", kind, seed, unit, guest_file("agent.c"))
    inputs += (openrc, " ".join(POWEROFF + DISABLE_CLOUD_INIT), IMPORT_TCG_CPU[arch])
    if (arch, firmware) != ("x86_64", "bios"):
        inputs += (arch, firmware)
    folder = cache_name(name, arch)

    def build_id(digest: str) -> str:
        h = hashlib.sha256()
        # A sha256 counts bare, as builds have always counted it.
        key = digest.removeprefix("sha256:")
        for part in (IMPORT_VERSION, key, *inputs, " ".join(READY), " ".join(GROW_ROOT)):
            h.update(
                hashlib.sha256(str(part).encode() if not isinstance(part, bytes) else part).digest()
            )
        return h.hexdigest()[:16]

    if want is not None and not force and existing_build(image_dir, folder, build_id(want)):
        say(f"{name} image up to date ({build_id(want)})")
        return load_current(image_dir, name, arch)

    home = image_dir / folder
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".import-", dir=home) as tmp:
        work = Path(tmp)
        if is_url(source):
            fetch = Download(source, progress=say, opener=opener or urllib.request.urlopen)
            got = (retry or _once)(lambda: fetch(work / "source", want))
            path, digest = got.path, got.digest
        else:
            say(f"reading {source}")
            path = Path(source).expanduser()
            digest = digest_of(path, (want or "sha256:").split(":", 1)[0])
            if want is not None and digest != want:
                raise ChecksumMismatch(
                    f"{source} has {digest}, not the {want} given: nothing was imported"
                )
        fmt, size = disk_format(path, runner, source)
        bid = build_id(digest)
        if not force and existing_build(image_dir, folder, bid):
            say(f"{name} image up to date ({bid})")
            return load_current(image_dir, name, arch)
        first = _FirstBoot(work, name, bid, config, runner, say, boot_root, boot_name, firmware)
        steps = Steps(runner, say)
        say(f"converting the {fmt} disk ({size / 2**30:.1f} GiB) to qcow2")
        first.make_dir()
        steps.check(
            [
                "qemu-img",
                "convert",
                "-f",
                fmt,
                "-O",
                "qcow2",
                "--",
                str(path),
                str(first.disk),
            ],
            f"converting {source} to qcow2",
            600,
        )
        if path.parent == work:
            path.unlink()  # the download: the disk holds it now
        seed_iso = None
        if seed:
            say("compiling the guest agent")
            agent = compile_agent(steps, arch, work).read_bytes()
            _key, public = ensure_key(state_dir, runner)
            seed_iso = work / "seed.iso"
            write_seed(
                seed_iso,
                {
                    "meta-data": meta_data(f"vmlease-{bid}", name),
                    "user-data": user_data(
                        hostname=name,
                        user=user,
                        public_key=public,
                        agent=agent,
                        unit=unit,
                        openrc=openrc,
                        extra=extra,
                        extra_kind=kind,
                    ),
                },
                runner,
                work,
            )
        facts = first.run(seed_iso, user, time.monotonic() + timeout_s)
        out = work / "out"
        out.mkdir()
        first.disk.rename(out / "disk.qcow2")
        manifest = {
            "name": name,
            "build_id": bid,
            "built_at": time.time(),
            "boot": "firmware",
            "arch": arch,
            "firmware": firmware,
            "kernel": "",
            "initrd": "",
            "disk": "disk.qcow2",
            "cmdline": "",
            "min_memory_mb": MIN_MEMORY_MB,
            "ready": list(READY),
            "network": "user",
            "ssh_user": user,
            "disk_bytes": size,
            "grow_root": list(GROW_ROOT) if facts.get("growpart") else [],
            "tcg_cpu": IMPORT_TCG_CPU[arch],
            "info": {
                "source": source,
                "sha256" if digest.startswith("sha256:") else "digest": digest.removeprefix(
                    "sha256:"
                ),
                "format": fmt,
                "os": facts.get("os", "?"),
                "seeded": "yes" if seed else "no",
                # A seeded image runs the agent vmlease gave it; another, its own.
                **({"agent_protocol": AGENT_PROTOCOL} if seed else {}),
                "user_data": hashlib.sha256(extra).hexdigest()[:16] if extra else "",
                "import": IMPORT_VERSION,
            },
        }
        publish(out, home / bid, manifest)
    say(f"{name} imported ({bid}) in {time.monotonic() - started:.0f} s: {home / bid}")
    return load_current(image_dir, name, arch)


def _firmware(arch: str, given: str | None, config: LaunchConfig) -> str:
    """The firmware an image for ``arch`` boots through: ``given`` or the default;
    ImageImportError, before anything is fetched, if this host cannot."""
    if arch not in IMPORT_TCG_CPU:
        raise ImageImportError(f"vmlease imports no images for {arch}")
    firmware = given or DEFAULT_FIRMWARE.get(arch, "uefi")
    if firmware not in ("bios", "uefi"):
        raise ImageImportError(f"firmware {firmware!r}: use 'bios' or 'uefi'")
    if firmware == "bios" and arch != "x86_64":
        raise ImageImportError(f"{arch} machines have no BIOS: their images boot through UEFI")
    if firmware == "uefi" and config.uefi is None:
        raise ImageImportError(
            f"the image boots through UEFI, and this machine has no UEFI firmware for {arch} "
            f"guests: install it with `apt-get install {UEFI_PACKAGES.get(arch, 'ovmf')}` "
            f"(or name its file in VMLEASE_UEFI_{arch.upper()})"
        )
    return firmware


class _FirstBoot:
    """The imported disk's one boot with its seed, ended by a clean power-off."""

    def __init__(
        self,
        work: Path,
        name: str,
        build_id: str,
        config: LaunchConfig,
        runner: Runner,
        say: Progress,
        root: Path | None = None,
        vm_name: str = BOOT_DIR,
        firmware: str = "bios",
    ) -> None:
        self.procs = Processes(root or work, runner)
        self.name = vm_name
        self.vm_dir = (root or work) / vm_name
        # The disk stays with the import's work (the same file system as the image
        # cache); the VM's directory, wherever it is, points at it.
        self.disk = work / f"{BOOT_DIR}.qcow2"
        self.image = Image(
            name=name,
            build_id=build_id,
            path=work,
            kernel=work,
            initrd=work,
            disk=self.disk,
            cmdline="",
            min_memory_mb=MIN_MEMORY_MB,
            tcg_cpu=IMPORT_TCG_CPU[config.arch],
            size_bytes=0,
            info={},
            network=Network.USER,
            boot="firmware",
            arch=config.arch,
            firmware=firmware,
        )
        self.firmware = firmware
        self.config = config
        self.say = say

    def make_dir(self) -> None:
        """The VM's directory, with its disk a link to the import's."""
        self.vm_dir.mkdir(mode=0o700, parents=False)
        (self.vm_dir / DISK).symlink_to(self.disk)

    def run(self, seed: Path | None, user: str, deadline: float) -> dict[str, str]:
        (self.vm_dir / "vm.json").write_text("{}\n")
        argv = qemu_argv(self.config, self.vm_dir, self.name, FIRST_BOOT, self.image, seed=seed)
        try:
            self.say(
                "first boot with cloud-init (a minute or more without KVM)"
                if seed
                else "first boot, waiting for the vmlease agent"
            )
            self.procs.launch(self.name, argv, 60.0, qemu=self.config.qemu)
            live = self.procs.attach(self.name)
            # Held throughout: an idle channel is let go of only when nobody holds it.
            with live.lock:
                channel = self._agent(live, seed is not None, deadline)
                facts = self._finish(channel, seed is not None, user, deadline)
            if not wait_exit(live, max(1.0, min(_POWEROFF_S, deadline - time.monotonic()))):
                raise ImageImportError(
                    f"the imported image did not power off within {_POWEROFF_S:g} s:\n"
                    + self._console(20)
                )
            return facts
        finally:
            self.procs.close()
            kill_all(self.vm_dir)

    def _machine(self) -> str:
        if self.config.arch != "x86_64":
            return f"a UEFI {self.config.arch} (virt) machine"
        kind = "UEFI" if self.firmware == "uefi" else "BIOS"
        other = "bios" if self.firmware == "uefi" else "uefi"
        return (
            f"a {kind} (q35) machine; if it boots through {other.upper()} only, "
            f"import it with --firmware {other}"
        )

    def _console(self, lines: int) -> str:
        try:
            text = (self.vm_dir / CONSOLE_LOG).read_text(errors="replace")
        except OSError:
            return ""
        return "--- console (last lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def _agent(self, live: Live, seeded: bool, deadline: float) -> AgentChannel:
        """The agent's channel once it answers; ImageImportError when it cannot.
        The caller holds ``live.lock``."""
        login_seen: float | None = None
        while True:
            if wait_exit(live, 0):
                raise ImageImportError(
                    "the imported image's first boot ended before the vmlease agent "
                    f"answered: it does not boot under QEMU as {self._machine()}\n"
                    + self._console(30)
                )
            try:
                return self.procs.channel(self.name, live, 2.0)
            except (BootError, ChannelError):
                pass  # not up yet
            text = ""
            with contextlib.suppress(OSError):
                text = (self.vm_dir / CONSOLE_LOG).read_text(errors="replace")
            if seeded and "login:" in text and "cloud-init" not in text.lower():
                login_seen = login_seen or time.monotonic()
                if time.monotonic() - login_seen > _NO_CLOUD_INIT_GRACE_S:
                    raise ImageImportError(
                        "the imported image booted to a login prompt without running "
                        "cloud-init, so vmlease cannot set it up: import an image with "
                        "cloud-init (distributions' cloud images have it), or, if the "
                        "image already runs the vmlease agent, import it with --no-seed\n"
                        + self._console(15)
                    )
            if time.monotonic() > deadline:
                why = (
                    "cloud-init did not install the vmlease agent in time"
                    if seeded
                    else "the image does not run the vmlease agent: import it without "
                    "--no-seed, so that cloud-init installs it"
                )
                raise ImageImportError(f"importing failed: {why}\n" + self._console(30))

    def _exec(self, channel: AgentChannel, argv: list[str], deadline: float) -> tuple[int, str]:
        done = channel.exec(
            argv, stdin=None, env=None, cwd=None, timeout_s=max(1.0, deadline - time.monotonic())
        )
        return done.exit_code, (done.stdout + done.stderr).decode(errors="replace").strip()

    def _finish(
        self, channel: AgentChannel, seeded: bool, user: str, deadline: float
    ) -> dict[str, str]:
        facts: dict[str, str] = {}
        if seeded:
            began = time.monotonic()
            code, said = self._exec(channel, ["cloud-init", "status", "--wait", "--long"], deadline)
            if code not in (0, 2):  # 2: finished with recoverable errors
                _, log = self._exec(
                    channel, ["tail", "-n", "30", "/var/log/cloud-init-output.log"], deadline
                )
                raise ImageImportError(
                    "cloud-init failed on the imported image's first boot (check your "
                    f"--user-data if you gave one):\n{said}\n--- cloud-init-output.log "
                    f"(last lines) ---\n{log}"
                )
            if code == 2:
                self.say(f"cloud-init finished with recoverable errors: {said[-500:]}")
            self.say(f"cloud-init finished in {time.monotonic() - began:.0f} s")
            code, said = self._exec(channel, ["id", "-u", user], deadline)
            if code != 0:
                raise ImageImportError(f"cloud-init did not create the user {user}: {said}")
            # The image is set up: its VMs never run cloud-init again.
            self._exec(channel, list(DISABLE_CLOUD_INIT), deadline)
        code, said = self._exec(channel, ["sh", "-c", "command -v growpart"], deadline)
        if code == 0:
            facts["growpart"] = said
        code, said = self._exec(
            channel, ["sh", "-c", '. /etc/os-release && echo "$PRETTY_NAME"'], deadline
        )
        facts["os"] = said if code == 0 else "?"
        self.say(f"setup done ({facts['os']}); powering off")
        self._exec(channel, ["sync"], deadline)
        # The channel may close under the command: the wait for QEMU's exit decides.
        with contextlib.suppress(VMLeaseError):
            self._exec(channel, list(POWEROFF), deadline)
        return facts
