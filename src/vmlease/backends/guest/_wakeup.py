"""What a guest is told when it comes up, through its agent, on either QEMU-based
backend: its name, the SSH key that may log in, its grown disk, today's time.

A guest started from a saved booted state wakes up as whoever saved it (the
agent's ``wake_as`` renames it); a booted one is named here when its image
does not take the name from the kernel command line.
"""

from __future__ import annotations

import os
import time

from vmlease._errors import BootError, InvalidSpec
from vmlease.backends.guest._agent import AgentChannel

__all__ = ["authorize_key", "grow_root", "name_guest", "refresh"]

_SEED_BYTES = 64

_AUTHORIZE = (
    'entry=$(getent passwd "$1") || { echo "no user $1" >&2; exit 3; }; '
    'home=$(echo "$entry" | cut -d: -f6) && umask 077 && mkdir -p "$home/.ssh" '
    '&& cat > "$home/.ssh/authorized_keys" && chown -R "$1:" "$home/.ssh" '
    "&& cat /etc/ssh/ssh_host_*_key.pub"
)


def name_guest(channel: AgentChannel, name: str) -> None:
    """Give the guest VM ``name``'s name (``hostname``)."""
    done = channel.exec(["hostname", name], stdin=None, env=None, cwd=None, timeout_s=10.0)
    if done.exit_code != 0:
        raise BootError(f"VM {name}: naming the guest failed: {done.stderr!r}")


def authorize_key(
    channel: AgentChannel,
    name: str,
    *,
    image: str,
    image_user: str,
    user: str,
    public_key: str,
    deadline: float,
) -> str:
    """Make ``public_key`` the one key ``user`` accepts in VM ``name``; returns the
    guest's SSH host keys (``ssh_host_*_key.pub``). ``image`` and ``image_user``
    (the image's own SSH user) are for the message when ``user`` does not exist."""
    done = channel.exec(
        ["sh", "-c", _AUTHORIZE, "sh", user],
        stdin=(public_key + "\n").encode(),
        env=None,
        cwd=None,
        timeout_s=max(1.0, deadline - time.monotonic()),
    )
    if done.exit_code == 3:
        raise InvalidSpec(
            f"image {image!r} has no user {user!r} (user= names who vm.ssh logs in "
            f"as): leave user out for the image's own ({image_user}), or name one "
            "it has (root, or the user it was imported with)"
        )
    if done.exit_code != 0:
        raise BootError(
            f"VM {name}: cannot authorize the SSH key for {user}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout.decode(errors="replace")


def grow_root(
    channel: AgentChannel, name: str, command: tuple[str, ...], gib: int, deadline: float
) -> None:
    """Run the image's ``command`` that grows the root file system to the disk's new
    size (``gib``), once the disk has grown."""
    limit = max(1.0, deadline - time.monotonic())
    done = channel.exec(list(command), stdin=None, env=None, cwd=None, timeout_s=limit)
    if done.exit_code != 0:
        raise BootError(
            f"VM {name}: growing its root file system to {gib} GiB failed: "
            f"{(done.stdout + done.stderr).decode(errors='replace').strip()[-1000:]}"
        )


def refresh(channel: AgentChannel, timeout_s: float) -> None:
    """After a restore or a start from a saved state: today's time and fresh randomness."""
    channel.set_time(time.time(), timeout_s, seed=os.urandom(_SEED_BYTES))
