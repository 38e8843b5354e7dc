"""The QEMU backend's primitives: create, start, stop, delete, exec, copy, snapshots.

Each VM is a directory ``<state>/qemu/<name>/`` holding its disk (a qcow2
overlay on the image's base disk), its sockets (QMP and the agent channel),
its console log, its pidfile and ``vm.json`` (how to launch it again). QEMU
runs daemonized, so a VM outlives the process that made it until it is
deleted (by its session, the reaper, or ``vmlease cleanup``).

A new VM starts from a saved booted state of its image and shape when there
is one, and saves one after its boot when there is not (``_states.py``,
``_mapped.py``); a VM started from a mapped state is reset by starting it
from the state again (``_starts.py``). Processes, pids and the agent channel
are ``_processes.py``'s.

Primitives only: no retries, no ledger, no timing. See backends/_base.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vmlease._checks import Check
from vmlease._errors import (
    BackendError,
    BootError,
    ChannelError,
    ConfigError,
    DownloadError,
    UnsupportedOperation,
    VMAlreadyExists,
    VMNotFound,
)
from vmlease._paths import ensure_private_dir
from vmlease._paths import image_dir as default_image_dir
from vmlease._paths import state_dir as default_state_dir
from vmlease._runner import Runner, SubprocessRunner
from vmlease._spec import VMSpec, host_arch
from vmlease._ssh import SSHInfo, ensure_key
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import Backend, BackendVM, Capabilities, Fault, Retry
from vmlease.backends.guest._agent import AgentChannel, AgentOperations
from vmlease.backends.guest._monitor import snapshot_outcome
from vmlease.backends.guest._segments import Networks
from vmlease.backends.guest._wakeup import name_guest, refresh
from vmlease.backends.guest.images import (
    Image,
    add_user,
    check_fits,
    find_image,
    load_build,
    remove_user,
)
from vmlease.backends.qemu._accel import LaunchConfigs, emulator, require_program
from vmlease.backends.qemu._disks import check_room, explain_silence, grow_disk, make_disk
from vmlease.backends.qemu._housekeeping import prune, usage
from vmlease.backends.qemu._imports import import_image
from vmlease.backends.qemu._launch import (
    QMP_SOCKET,
    LaunchConfig,
    RamFile,
    console_tail,
    qemu_argv,
    require_firmware,
    with_ram,
)
from vmlease.backends.qemu._mapped import boot_ram, save_devices, state_meta
from vmlease.backends.qemu._networks import QemuLans
from vmlease.backends.qemu._preflight import preflight
from vmlease.backends.qemu._processes import (
    Processes,
    clear_runtime,
    kill,
    kill_all,
    monitor_command,
    running_pid,
    wait_exit,
)
from vmlease.backends.qemu._qmp import try_quit
from vmlease.backends.qemu._reach import (
    HOST_KEYS,
    Login,
    apply_forwards,
    authorize,
    read_record,
    ssh_info,
    write_record,
)
from vmlease.backends.qemu._starts import Starts, state_of
from vmlease.backends.qemu._states import (
    MemoryMode,
    WarmState,
    memory_mode,
    warm_cache,
    warm_key,
)

__all__ = ["QemuBackend"]

_RECONNECT_TIMEOUT_S = 10.0
log = logging.getLogger("vmlease.qemu")
#: Long waits a person may want to see coming (the pytest plugin shows them on a terminal).
progress = logging.getLogger("vmlease.progress")


class QemuBackend(AgentOperations, QemuLans, Backend):
    """VMs as local QEMU processes.

    Args:
        state_dir: where VM directories go (``<state_dir>/qemu``); default the vmlease state dir.
        image_dir: the image cache; default the vmlease image dir.
        qemu_binary: the system emulator for this machine's architecture (see
            ``_accel.emulator``; another architecture's is ``qemu-system-<arch>``).
        qemu_img: the disk tool.
        runner: runs host programs (injected for tests).
        env: environment to read settings from (default ``os.environ``).
        warm_start: start VMs from saved booted states (default on;
            ``VMLEASE_QEMU_WARM=off`` turns it off). Off, every VM boots.
        states_per_image: keep at most this many saved booted states per image,
            the least recently used going first (``VMLEASE_QEMU_STATES``, default 6).
    """

    name = "qemu"
    capabilities = Capabilities(
        snapshots=True, stop_start=True, forwards=True, ssh=True, resets=True, networks=True
    )

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        image_dir: Path | None = None,
        qemu_binary: str | None = None,
        qemu_img: str = "qemu-img",
        runner: Runner | None = None,
        env: Mapping[str, str] | None = None,
        warm_start: bool | None = None,
        states_per_image: int | None = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._state_dir = state_dir or default_state_dir(self._env)
        self.root = self._state_dir / "qemu"
        self._image_dir = image_dir or default_image_dir(self._env)
        self._qemu = qemu_binary or emulator(host_arch(), self._env)
        self._qemu_img = qemu_img
        self._run = runner or SubprocessRunner()
        self._lock = threading.Lock()
        self._procs = Processes(
            self.root, self._run, on_silence=lambda name: explain_silence(self._dir(name))
        )
        self.configs = LaunchConfigs(self._qemu, self._run, self._probes, self._env)
        self.warm = warm_cache(
            self._image_dir, self._env, warm_start=warm_start, states_per_image=states_per_image
        )
        self.lans = Networks(self.root)
        self._starts = Starts(
            self._procs, self._run, lambda: self.require(self._qemu_img), self.warm, self.lans
        )
        # VMs booted by this process whose booted state is to be saved: name -> its
        # key, image, and the memory file it boots on (a mapped state) or None.
        self._save_after_boot: dict[str, tuple[str, Image, RamFile | None]] = {}
        # VMs booted (not started from a state) by this process: name -> the image's
        # command that says the system is up, run once the agent answers.
        self._booting: dict[str, tuple[str, ...]] = {}
        # VMs just started from a saved state, not yet told their SSH key: name -> state.
        self._fresh: dict[str, WarmState] = {}

    # -- set-up ----------------------------------------------------------

    @property
    def qemu(self) -> str:
        """The system emulator as the user named it."""
        return self._qemu

    @property
    def qemu_img(self) -> str:
        return self._qemu_img

    @property
    def image_dir(self) -> Path:
        return self._image_dir

    @property
    def runner(self) -> Runner:
        return self._run

    def require(self, program: str) -> str:
        """Where ``program`` is, or BackendUnavailable saying how to install it."""
        return require_program(program, self._env)

    def preflight(self, *, cheap: bool = False) -> list[Check]:
        return preflight(self, cheap=cheap)

    def _probes(self) -> Path:
        ensure_private_dir(self.root)
        # The host's answer, kept with the images every state directory shares.
        return self._image_dir if self._image_dir.is_dir() else self.root

    def launch_config(self, arch: str | None = None) -> LaunchConfig:
        """The emulator, accelerator and TSC frequency for ``arch`` guests (default
        this machine's); probes KVM once per host boot."""
        return self.configs.get(arch or host_arch())[0]

    @property
    def accel_reason(self) -> str:
        """Why this machine's own guests run under the accelerator they do."""
        return self.configs.get(host_arch())[1]

    def memory_mode(self) -> tuple[MemoryMode, str]:
        """How this backend's booted states hold guest memory, and why."""
        return memory_mode(self._env, self.launch_config().version)

    def _dir(self, name: str) -> Path:
        return self._procs.dir(name)

    def _forget(self, name: str) -> None:
        self._starts.forget(name)
        self._save_after_boot.pop(name, None)
        self._fresh.pop(name, None)
        self._booting.pop(name, None)
        self._procs.forget(name)
        self.lans.leave(name)

    def import_image(
        self, name: str, source: str, *, boot_vm: str, retry: Retry, **options: Any
    ) -> Path:
        """Import a cloud image as ``name`` (see ``_imports.import_image`` for the
        options); its first boot is this backend's VM ``boot_vm``."""
        ensure_private_dir(self.root)
        return import_image(
            self._image_dir,
            name,
            source,
            config=self.launch_config(options.pop("arch", None)),
            state_dir=self._state_dir,
            runner=self._run,
            boot_root=self.root,
            boot_name=boot_vm,
            retry=retry,
            **options,
        ).path

    def image_usage(self) -> list[dict[str, object]]:
        return [u.as_dict() for u in usage(self._image_dir)]

    def prune_images(
        self, *, dry_run: bool = False, everything: bool = False
    ) -> list[dict[str, object]]:
        removed = prune(self._image_dir, dry_run=dry_run, everything=everything)
        return [r.as_dict() for r in removed]

    def classify(self, exc: BaseException) -> Fault:
        if isinstance(exc, DownloadError):  # a source that did not answer, or broke off
            return Fault.TRANSIENT if exc.transient else Fault.PERMANENT
        return super().classify(exc)

    # -- the Backend primitives ------------------------------------------

    def check_spec(self, spec: VMSpec) -> None:
        config = self.launch_config(spec.arch)
        self.require(self._qemu_img)
        image = find_image(self._image_dir, spec.image, spec.arch)
        check_fits(image, spec)
        require_firmware(config, image)
        check_room(self.root, self.warm, config, spec, image, self.memory_mode()[0])

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        config = self.launch_config(spec.arch)
        image = find_image(self._image_dir, spec.image, spec.arch)
        vm_dir = self._dir(name)
        try:
            vm_dir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise VMAlreadyExists(f"the qemu backend already has a VM named {name!r}") from exc
        deadline, ram = time.monotonic() + timeout_s, None
        try:
            add_user(image.path, vm_dir)  # no prune removes the build under this VM
            macs = self._join(name, vm_dir, spec.networks, spec.alias)  # switches hold its ports
            launch = qemu_argv(config, vm_dir, name, spec, image, macs=macs)
            record = {
                "name": name,
                "spec": json.loads(spec.to_json()),
                "image": str(image.path),
                "accel": config.accel,
                "argv": launch,
                "network": str(spec.network or image.network),
                "forwards": {},
            }
            mode, _why = self.memory_mode()
            key = warm_key(config, spec, image, mode) if self.warm is not None else None
            found = self.warm.find(key) if self.warm is not None and key else None
            if found is not None:
                write_record(vm_dir, record)
                if self._starts.start(name, launch, found, deadline, fall_back=True):
                    self._fresh[name] = found
                    return
            if image.ready and key is not None:
                progress.info(
                    "%s: no saved booted state of %s for %d vCPU, %d MB yet: booting it "
                    "(once; later VMs start from the state it saves)",
                    name,
                    image.name,
                    spec.cpus,
                    spec.memory_mb,
                )
            make_disk(
                self._run,
                self.require(self._qemu_img),
                name,
                vm_dir,
                image,
                max(1.0, deadline - time.monotonic()),
            )
            if key is not None and self.warm is not None and mode is MemoryMode.MAPPED:
                ram = boot_ram(self.warm, key, spec.memory_mb)
                record["boot_ram"] = str(ram.path)
            write_record(vm_dir, record)
            self._procs.launch(
                name, with_ram(launch, ram), max(1.0, deadline - time.monotonic()), qemu=launch[0]
            )
            self._booting[name] = image.ready
            if key is not None:
                self._save_after_boot[name] = (key, image, ram)
        except BaseException:
            # Leave nothing a retry could trip over: no directory, and no QEMU
            # that a launch which timed out may still have started.
            self._forget(name)
            kill_all(vm_dir)
            self._remove(vm_dir)
            remove_user(image.path, vm_dir)
            if ram is not None:
                shutil.rmtree(ram.path.parent, ignore_errors=True)
            raise

    def wait_ready(self, name: str, timeout_s: float) -> None:
        live = self._procs.attach(name)
        with live.lock:
            deadline = time.monotonic() + timeout_s
            try:
                channel = self._procs.channel(name, live, timeout_s)
                ready = self._booting.pop(name, ())
                if ready:
                    # A full system: ready once the image says so (systemd up, sshd
                    # listening), which is also when its booted state is worth saving.
                    channel.come_up(ready, deadline)
                self._authorize(name, channel, deadline)
                image = self._image_of(name)
                if ready and image is not None and image.boot == "firmware":
                    # A PVH image has its name from the kernel command line; an
                    # imported image boots with the name it was imported as.
                    name_guest(channel, name)
            except (BootError, ChannelError) as exc:
                tail = self.console_tail(name, 20)
                raise BootError(f"{exc}\n--- console (last lines) ---\n{tail}") from exc
            pending = self._save_after_boot.pop(name, None)
            restart = None
            if pending is not None and self.warm is not None:
                key, image_, ram = pending
                self.lans.prepare(name, channel, deadline)
                if ram is None:
                    self.warm.save(self._dir(name), name, key, image_)
                elif save_devices(self._dir(name), name, ram):
                    restart = (key, image_, ram)
            if restart is None:  # after the save: a state keeps the image's disk size
                self._grow_root(name, channel, deadline)
                told = self._lans_up(name, channel, deadline)
        if restart is not None:
            self._restart_saved(name, *restart, deadline)
        else:
            self._tell(told, deadline)

    def _restart_saved(
        self, name: str, key: str, image: Image, ram: RamFile, deadline: float
    ) -> None:
        """VM ``name`` booted on ``ram``, its devices' state written: end its QEMU (it would
        go on writing into the state's memory), publish the state, start the VM from it."""
        known = self._dir(name) / HOST_KEYS
        login = self._login(name, image) if known.is_file() else None
        authorized = login.saved(known.read_text()) if login is not None else None
        meta = state_meta(image.folder, image.path, name, authorized)
        self._fresh[name] = self._starts.publish(name, key, ram, meta, deadline)
        self._ready_again(name, deadline)

    def _ready_again(self, name: str, deadline: float) -> None:
        """After a start from a state: the SSH key, the forwards, the disk's size, networks."""
        live = self._procs.attach(name)
        with live.lock:
            channel = self._procs.channel(name, live, max(1.0, deadline - time.monotonic()))
            self._authorize(name, channel, deadline)
            self._starts.lap(name, "login")
            if self._read_record(name).get("forwards"):
                self._apply_forwards(name, {}, max(1.0, deadline - time.monotonic()))
            self._grow_root(name, channel, deadline)
            told = self._lans_up(name, channel, deadline)
            self._starts.lap(name, "forwards, disk size and networks")
        self._tell(told, deadline)
        log.debug("VM %s started from its state: %s", name, self.start_timings(name))

    def start_timings(self, name: str) -> dict[str, float]:
        return self._starts.timings(name)  # by phase, of its last start from a state or reset

    def reset(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        """Back to the moment VM ``name`` was made: a new QEMU from its mapped booted state, a
        new disk overlay; then its wake-up, SSH key, forwards, disk size and networks again."""
        deadline = time.monotonic() + timeout_s
        self._booting.pop(name, None)
        self._fresh[name] = self._starts.reset(name, deadline)
        self._ready_again(name, deadline)

    def can_reset(self, name: str) -> bool:
        try:
            return state_of(self._read_record(name)) is not None
        except VMNotFound:
            return False

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        vm_dir = self._dir(name)
        try:
            record = json.loads((vm_dir / "vm.json").read_text())
        except FileNotFoundError as exc:
            raise VMNotFound(f"the qemu backend has no VM named {name!r}") from exc
        if running_pid(vm_dir) is not None:
            return
        self._procs.launch(name, list(record["argv"]), timeout_s, qemu=record["argv"][0])
        if record.get("forwards"):
            live = self._procs.attach(name)
            with live.lock:
                self._apply_forwards(name, {}, timeout_s)  # on the host ports they had
        # Its build is there (a prune spares builds VMs lie on); if not, the agent must do.
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._booting[name] = tuple(load_build(Path(record["image"])).ready)

    def stop(self, name: str, timeout_s: float) -> None:
        vm_dir = self._dir(name)
        if not (vm_dir / "vm.json").exists():
            raise VMNotFound(f"the qemu backend has no VM named {name!r}")
        if running_pid(vm_dir) is None:
            self._forget(name)
            return
        live = self._procs.attach(name)
        with live.lock:
            # The guest's last writes reach the disk only if it syncs, also when
            # this process has not talked to the VM yet (it was made by another).
            # If that fails the disk may miss them; stop anyway.
            with contextlib.suppress(ChannelError):
                self._procs.channel(name, live, min(timeout_s, 5.0)).sync(min(timeout_s, 10.0))
            try_quit(vm_dir / QMP_SOCKET, timeout_s=min(timeout_s, 5.0))
            if not wait_exit(live, timeout_s):
                kill(live)
        self._forget(name)
        clear_runtime(vm_dir)

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        """Kill the VM's QEMU and remove its directory. Its owner may have died while QEMU
        started, with no pidfile yet: every QEMU whose command line names this VM's pidfile
        is killed, before and after the directory goes (a later one cannot open its files)."""
        vm_dir = self._dir(name)
        existed = vm_dir.is_dir()
        self._forget(name)
        killed = kill_all(vm_dir)
        self._remove(vm_dir)
        killed += kill_all(vm_dir)
        if vm_dir.exists():
            raise BackendError(f"could not remove {vm_dir}")
        if not existed and not killed:
            raise VMNotFound(f"the qemu backend has no VM named {name!r}")

    def _remove(self, vm_dir: Path) -> None:
        """Remove a VM's directory (its QEMU has ended), and its marks on the image
        build and saved state it used; a booted state it was saving goes too."""
        try:
            record = json.loads((vm_dir / "vm.json").read_text())
        except (OSError, ValueError):
            record = {}
        shutil.rmtree(vm_dir, ignore_errors=True)
        if record.get("image"):
            remove_user(Path(record["image"]), vm_dir)
        if record.get("state"):
            remove_user(Path(record["state"]), vm_dir)
        if record.get("boot_ram"):
            shutil.rmtree(Path(record["boot_ram"]).parent, ignore_errors=True)

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> list[BackendVM]:
        found = []
        for name, pid, detail in self._procs.listing():
            with contextlib.suppress(VMNotFound, ValueError, OSError):
                record = self._read_record(name)
                detail["start"] = f"{record['memory']} state" if record.get("warm") else "booted"
            found.append(BackendVM(name, "running" if pid else "stopped", detail))
        return found

    @contextlib.contextmanager
    def _agent(self, name: str, timeout_s: float = _RECONNECT_TIMEOUT_S) -> Iterator[AgentChannel]:
        """The agent channel of running VM ``name``, held for one operation (see
        ``Processes.operation``)."""
        with self._procs.operation(name, timeout_s) as channel:
            yield channel

    def forward(self, name: str, guest_port: int, *, timeout_s: float = DEFAULT.forward_s) -> int:
        record = self._read_record(name)
        if record.get("network", "none") == "none":
            raise ConfigError(
                f"VM {name} has no network (network='none'), so no port of it can be "
                "forwarded; create it with network='user' (or 'restricted')"
            )
        live = self._procs.attach(name)
        with live.lock:
            forwards = self._apply_forwards(name, {guest_port: 0}, timeout_s)
        return forwards[guest_port]

    def _image_of(self, name: str) -> Image | None:
        """The build VM ``name`` runs on (None if it is gone)."""
        try:
            return load_build(Path(self._read_record(name)["image"]))
        except (OSError, ValueError, KeyError):
            return None

    def _authorize(self, name: str, channel: AgentChannel, deadline: float) -> None:
        """Authorize this state directory's key in a guest with an SSH server, at every
        start (a VM started from a saved state carries whoever saved it; see
        ``_reach.authorize``)."""
        image = self._image_of(name)
        fresh = self._fresh.pop(name, None)
        if image is None or not image.ssh_user:
            return
        saved = fresh.meta().get("authorized") if fresh is not None else None
        authorize(self._dir(name), channel, image, self._login(name, image), saved, deadline)

    def _login(self, name: str, image: Image) -> Login:
        key, public = ensure_key(self._state_dir, self._run)
        return Login(self._ssh_user(name, image), key, public)

    def _grow_root(self, name: str, channel: AgentChannel, deadline: float) -> None:
        grow_disk(self._dir(name), name, self._image_of(name), channel, deadline)

    def ssh(self, name: str, *, timeout_s: float = DEFAULT.forward_s) -> SSHInfo:
        image = self._image_of(name)
        if image is None or not image.ssh_user:
            raise UnsupportedOperation(
                f"VM {name} runs no SSH server (its image is not a full system); "
                "reach it with vm.run or `vmlease exec`"
            )
        port = self.forward(name, 22, timeout_s=timeout_s)
        key, _public = ensure_key(self._state_dir, self._run)
        return ssh_info(self._dir(name), port, self._ssh_user(name, image), key)

    def _ssh_user(self, name: str, image: Image) -> str:
        """Who ``vm.ssh`` logs in as: the VM's spec's user, or else its image's."""
        spec = self._read_record(name).get("spec") or {}
        return str(spec.get("user") or image.ssh_user)

    def _read_record(self, name: str) -> dict[str, Any]:
        return read_record(self._dir(name))

    def _apply_forwards(
        self, name: str, wanted: dict[int, int], timeout_s: float
    ) -> dict[int, int]:
        """The VM's forwards, ``wanted`` added (see ``_reach.apply_forwards``); caller
        holds the VM's lock."""
        return apply_forwards(self._dir(name), wanted, timeout_s)

    def _hmp(self, name: str, command: str, timeout_s: float) -> None:
        snapshot_outcome(name, command, monitor_command(self._dir(name), command, timeout_s))

    def snapshot(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Save memory and disk as ``tag`` inside the VM's qcow2 disk (``savevm``)."""
        live = self._procs.attach(name)
        with live.lock:
            self._hmp(name, f"savevm {tag}", timeout_s)

    def restore(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        """Bring memory and disk back to ``tag`` (``loadvm``); then reset clock and randomness."""
        live = self._procs.attach(name)
        with live.lock:
            self._hmp(name, f"loadvm {tag}", timeout_s)
            # Back where it was at the snapshot: resynchronise the channel; today's
            # time, not the snapshot's; its networks' names as they are now.
            channel = self._procs.channel(name, live, _RECONNECT_TIMEOUT_S)
            channel.handshake(_RECONNECT_TIMEOUT_S)
            refresh(channel, _RECONNECT_TIMEOUT_S)
            self.lans.configure(name, channel, time.monotonic() + _RECONNECT_TIMEOUT_S)
            self._apply_forwards(name, {}, timeout_s)  # as they were before the restore

    def console_tail(self, name: str, lines: int = 40) -> str:
        return console_tail(self._dir(name), lines)

    def visit(self) -> None:
        self._procs.visit()

    def close(self) -> None:
        self._procs.close()
        self.lans.close()
