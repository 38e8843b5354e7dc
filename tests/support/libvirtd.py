"""A throwaway libvirt host on this machine: libvirtd and virtlogd in a mount
namespace of their own, reached through a Unix socket, TCP on 127.0.0.1 and
(``SSHGate``) a throwaway sshd on 127.0.0.1.

The namespace gives the daemons private ``/etc/libvirt``, ``/run/libvirt``
and ``/var/{lib,cache,log}/libvirt`` (bind mounts of a temporary directory),
so several can run side by side, none touches the machine's own libvirt
set-up, and QEMU runs as root (``qemu.conf``), which spares the 44 s
per-create penalty of a root-only ``/dev/kvm``. libvirtd runs under a child
subreaper (``subreaper.py``), which reaps its ended QEMUs at once, as a
host's init does. Stopping kills every process in the namespace, QEMU
included, and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LibvirtDaemon", "SSHGate", "missing_tools"]

_TOOLS = ("libvirtd", "virtlogd", "unshare", "nsenter")
_PRIVATE = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
)


def missing_tools() -> str:
    """Why a private libvirtd cannot run here ("" if it can)."""
    missing = [
        t
        for t in _TOOLS
        if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
    ]
    if missing:
        return f"not installed: {', '.join(missing)} (./scripts/test installs libvirt)"
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount namespaces, QEMU as root)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt Python binding is missing: pip install 'vmlease[libvirt]'"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sbin(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found is not None, tool
    return found


class LibvirtDaemon:
    """One private libvirt host.

    Args:
        keepalive: the daemon's (interval s, count): a client that answers no
            probe for interval * (count + 1) seconds is dropped, and its
            autodestroy domains with it.
    """

    def __init__(
        self,
        *,
        keepalive: tuple[int, int] = (2, 2),
        cache: Path | None = None,
        group: str | None = None,
    ) -> None:
        """``group``: its members may use the daemon's socket too, as Debian's
        ``libvirt`` group may use ``qemu:///system``; otherwise root alone."""
        self.root = Path(tempfile.mkdtemp(prefix="vml-lv-", dir="/tmp"))
        # libvirtd probes QEMU's capabilities once per cache (about 8 s): the cache
        # is kept beside vmlease's image cache and shared by the daemons.
        self.cache = cache
        self.port = _free_port()
        self.keepalive = keepalive
        for part in ("etc", "run", "lib", "cache", "log", "sock"):
            (self.root / part).mkdir(mode=0o700)
        interval, count = keepalive
        access = 'unix_sock_rw_perms = "0700"\n'
        if group is not None:
            access = f'unix_sock_group = "{group}"\nunix_sock_rw_perms = "0770"\n'
            for folder in (self.root, self.root / "sock"):
                folder.chmod(0o755)
        (self.root / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.root / "sock"}"\n' + access + 'auth_unix_rw = "none"\n'
            "listen_tls = 0\n"
            "listen_tcp = 1\n"
            'listen_addr = "127.0.0.1"\n'
            f'tcp_port = "{self.port}"\n'
            'auth_tcp = "none"\n'
            f"keepalive_interval = {interval}\n"
            f"keepalive_count = {count}\n"
            'log_outputs = "3:stderr"\n'
        )
        # Debian's qemu.conf sets nothing: libvirt's defaults hold (dynamic_ownership,
        # remember_owner, a mount namespace per QEMU, the host's security driver).
        # This machine forces one change: with /dev/kvm root-only, QEMU as
        # libvirt-qemu makes libvirt probe KVM for about 44 s on every create.
        (self.root / "etc" / "qemu.conf").write_text('user = "root"\ngroup = "root"\n')
        (self.root / "etc" / "virtlogd.conf").write_text("")
        self._holder: subprocess.Popen[bytes] | None = None
        self._daemon: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def unix_uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def start(self) -> LibvirtDaemon:
        """The namespace (held by virtlogd), then libvirtd in it; waits until it answers."""
        for path in _PRIVATE:
            Path(path).mkdir(parents=True, exist_ok=True)
        sources = [self.root / p for p in ("etc", "run", "lib", "cache", "log")]
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
            sources[3] = self.cache
        mounts = "; ".join(
            f"mount --bind {source} {path}" for source, path in zip(sources, _PRIVATE, strict=True)
        )
        # Pid files default to /run itself, shared: each daemon gets its own.
        pidfile = self.root / "virtlogd.pid"
        script = f"set -e; {mounts}; exec {_sbin('virtlogd')} --pid-file {pidfile}"
        with (self.root / "virtlogd.log").open("ab") as out:
            self._holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # virtlogd's socket appears in the namespace's /run/libvirt = root/run.
        self._wait(lambda: (self.root / "run" / "virtlogd-sock").exists(), "virtlogd")
        self.start_libvirtd()
        return self

    def start_libvirtd(self) -> None:
        assert self._holder is not None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with self.log.open("ab") as out:
            self._daemon = subprocess.Popen(
                [
                    "nsenter",
                    "-t",
                    str(self._holder.pid),
                    "-m",
                    "--",
                    sys.executable,
                    str(Path(__file__).with_name("subreaper.py")),
                    _sbin("libvirtd"),
                    "--listen",
                    "--pid-file",
                    str(self.root / "libvirtd.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait(self._answers, "libvirtd")

    def _answers(self) -> bool:
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        try:
            conn = libvirt.open(self.unix_uri)
        except libvirt.libvirtError:
            return False
        conn.close()
        return True

    def _wait(self, ready: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():  # type: ignore[operator]
            for proc in (self._holder, self._daemon):
                if proc is not None and proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"{what} ended at start ({proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not start within {timeout_s:g} s")
            time.sleep(0.05)

    def stop_libvirtd(self, sig: int = signal.SIGTERM) -> None:
        """Stop libvirtd alone (``SIGKILL`` for a crash); QEMU and virtlogd stay."""
        if self._daemon is not None and self._daemon.poll() is None:
            try:
                pid = int((self.root / "libvirtd.pid").read_text().split()[0])
                os.kill(pid, sig)
            except (OSError, ValueError, IndexError):
                self._daemon.send_signal(sig)  # the subreaper passes it on
            try:
                self._daemon.wait(15)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait()
        self._daemon = None

    def libvirtd_pid(self) -> int:
        return int((self.root / "libvirtd.pid").read_text().split()[0])

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop_libvirtd(sig)
        self.start_libvirtd()

    def processes(self) -> list[int]:
        """Every process in the daemon's mount namespace (QEMU included)."""
        if self._holder is None or self._holder.poll() is not None:
            return []
        try:
            ns = Path(f"/proc/{self._holder.pid}/ns/mnt").readlink()
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "ns" / "mnt").readlink() == ns:
                        found.append(int(entry.name))
        return found

    def qemu_pids(self) -> list[int]:
        found = []
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def stop(self) -> None:
        """Kill everything in the namespace and remove the directory."""
        self.stop_libvirtd()
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._holder.kill()
            self._holder.wait()
            self._holder = None
        shutil.rmtree(self.root, ignore_errors=True)


class SSHGate:
    """A throwaway sshd on 127.0.0.1 that lets one key in as root, for
    ``qemu+ssh://`` URIs to ``daemon`` (libvirt's netcat proxy to its socket)."""

    def __init__(self, daemon: LibvirtDaemon) -> None:
        self.daemon = daemon
        self.root = Path(tempfile.mkdtemp(prefix="vml-ssh-", dir="/tmp"))
        self.port = _free_port()
        self.key = self.root / "id_ed25519"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return (
            f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={self.key}"
            f"&command={self.root / 'ssh'}&proxy=netcat&socket={self.daemon.socket}"
        )

    def start(self) -> SSHGate:
        host_key = self.root / "host_key"
        for path in (self.key, host_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True
            )
        # libvirt runs this as its ssh: the gate's host key is trusted without
        # touching the user's known_hosts.
        wrapper = self.root / "ssh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec ssh -o UserKnownHostsFile={self.root / 'known_hosts'} "
            '-o StrictHostKeyChecking=accept-new -o BatchMode=yes "$@"\n'
        )
        wrapper.chmod(0o700)
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        config = self.root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with (self.root / "sshd.log").open("ab") as out:
            self._proc = subprocess.Popen(
                [_sbin("sshd"), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError("sshd did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)


def foreign_domain(uri: str, name: str, kernel: Path, initrd: Path) -> None:
    """Start a domain the way a person would, with no vmlease metadata: not ours."""
    import libvirt

    xml = f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0</cmdline></os>
  <devices><controller type='usb' model='none'/><memballoon model='none'/></devices>
</domain>"""
    conn = libvirt.open(uri)
    try:
        conn.createXML(xml, 0)
    finally:
        conn.close()


def destroy_domain(uri: str, name: str) -> None:
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.lookupByName(name).destroy()
    finally:
        conn.close()
