"""SSH to real guests: one key pair per state directory, and how to reach a VM.

The key pair (ed25519, no passphrase) is made on first use in
``<state>/ssh/`` (0700; the private key 0600) and authorized for the image's
SSH user in every real guest when it starts. A VM's ``known_hosts`` holds its
real host key, read through the agent, so clients connect with host-key
checking on. VMs started from one saved booted state share their host keys
(they are one booted system, copied); each VM's ``known_hosts`` names its
own forwarded port, so checking still holds per VM.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from vmlease._errors import BackendUnavailable, ConfigError
from vmlease._paths import ensure_private_dir
from vmlease._runner import Runner, SubprocessRunner

__all__ = ["SSHInfo", "ensure_key"]

KEY_NAME = "id_ed25519"


@dataclass(frozen=True, slots=True)
class SSHInfo:
    """How to reach a VM with SSH, host-key checking on.

    Attributes:
        host: always ``127.0.0.1`` (forwards are never on other addresses).
        port: the forwarded host port of the guest's port 22.
        user: the user the key is authorized for (``root``).
        key: the private key.
        known_hosts: a file holding the VM's real host key for ``[host]:port``.
    """

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path

    def options(self) -> list[str]:
        """``ssh`` options (``-o``, ``-i``, ``-p``) that reach this VM and only it."""
        return [
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "LogLevel=ERROR",
        ]

    def argv(self, command: list[str] | None = None) -> list[str]:
        """An ``ssh`` command line that runs ``command`` in the VM (a shell if None)."""
        remote = [shlex.join(command)] if command else []
        return ["ssh", *self.options(), f"{self.user}@{self.host}", *remote]

    def config(self, alias: str) -> str:
        """An OpenSSH ``Host`` block for ``ssh -F``, ``scp -F``, ``rsync -e`` and testinfra."""
        return (
            f"Host {alias}\n"
            f"  HostName {self.host}\n"
            f"  Port {self.port}\n"
            f"  User {self.user}\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  StrictHostKeyChecking yes\n"
            "  PasswordAuthentication no\n"
            "  LogLevel ERROR\n"
        )


def ensure_key(state_dir: Path, runner: Runner | None = None) -> tuple[Path, str]:
    """The state directory's key pair, made on first use: (private key, public key line)."""
    folder = ensure_private_dir(state_dir / "ssh")
    key = folder / KEY_NAME
    public = folder / f"{KEY_NAME}.pub"
    if not (key.is_file() and public.is_file()):
        tmp = folder / f".{KEY_NAME}.new"
        for leftover in (tmp, tmp.with_name(tmp.name + ".pub")):
            leftover.unlink(missing_ok=True)
        done = (runner or SubprocessRunner())(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmlease", "-f", str(tmp)],
            timeout_s=60,
        )
        if done.returncode == 127:
            raise BackendUnavailable(
                "ssh-keygen not found: install it with `apt-get install openssh-client`"
            )
        if done.returncode != 0:
            raise ConfigError(f"ssh-keygen failed: {done.stderr.strip()}")
        tmp.chmod(0o600)
        tmp.with_name(tmp.name + ".pub").replace(public)
        tmp.replace(key)  # the private key last: its presence means the pair is whole
    return key, public.read_text().strip()
