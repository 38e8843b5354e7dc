"""Root file systems built and packed by a normal user, through a user namespace.

A Debian image holds files that belong to root and to system users. As root,
mmdebstrap writes them as they are. A normal user has no such power on the
host, but inside a user namespace that maps uid 0 to the user and uids 1 to
65535 to the user's subordinate ids (``/etc/subuid``, ``/etc/subgid``), the
same tools see and write the same owners:

- mmdebstrap runs in its ``unshare`` mode and writes a tarball, whose entries
  carry the owners inside the image (0, 100, ...), and which belongs to the
  user;
- the tarball is unpacked and packed into ext4 (``mke2fs -d``) inside
  ``unshare --user --map-root-user --map-auto``, where those owners are real,
  and the unpacked tree is removed there too (outside, its files belong to
  subordinate ids the user cannot delete).

Root takes the same path without the namespace, so both make the same tree.
``blockers`` names what stops a user where this cannot work, each with the
one-line fix.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmlease._runner import Runner, find_program

__all__ = ["NAMESPACE", "Blocker", "as_root", "blockers", "has_subids", "is_root"]

#: The namespace a user's packing step runs in: 0 -> the user, 1.. -> subordinate ids.
NAMESPACE = ("unshare", "--user", "--map-root-user", "--map-auto", "--")


@dataclass(frozen=True, slots=True)
class Blocker:
    """Something that stops a normal user from building images, and the fix."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}; fix: {self.fix}"


def is_root() -> bool:
    """Whether this process may write any owner (the build needs no namespace)."""
    return os.geteuid() == 0


def as_root(argv: Sequence[str]) -> list[str]:
    """``argv`` as it runs with root's view of file owners: directly for root,
    in the mapped user namespace for anyone else (its program found here first,
    since a user's PATH may lack the folder it is in)."""
    command = [find_program(argv[0]) or argv[0], *argv[1:]]
    return command if is_root() else [*NAMESPACE, *command]


def _user(uid: int) -> tuple[str, int]:
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:
        return getpass.getuser(), uid


def has_subids(path: Path, name: str, uid: int, need: int = 65536) -> bool:
    """Whether ``path`` (``/etc/subuid`` or ``/etc/subgid``) gives the user
    ``need`` subordinate ids in one range."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(uid)):
            continue
        try:
            if int(parts[2]) >= need:
                return True
        except ValueError:
            continue
    return False


def _userns_knob() -> str:
    """The setting that turns unprivileged user namespaces back on, for this kernel."""
    apparmor = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    debian = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if apparmor.exists():
        return "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
    if debian.exists():
        return "sudo sysctl -w kernel.unprivileged_userns_clone=1"
    return "sudo sysctl -w user.max_user_namespaces=15000"


def blockers(runner: Runner, etc: Path = Path("/etc"), uid: int | None = None) -> list[Blocker]:
    """What stops this user (``uid``, by default this process's) from building
    Debian images: empty for root, or when nothing does. Probes the namespace
    for real, in about 10 ms."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return []
    name, uid = _user(uid)
    found = []
    tools = [t for t in ("unshare", "newuidmap", "newgidmap") if find_program(t) is None]
    if tools:
        found.append(
            Blocker(
                f"{', '.join(tools)} missing (user namespaces with subordinate ids)",
                "sudo apt-get install uidmap util-linux",
            )
        )
    for kind, flag in (("subuid", "--add-subuids"), ("subgid", "--add-subgids")):
        if not has_subids(etc / kind, name, uid):
            found.append(
                Blocker(
                    f"{etc / kind} gives {name} no range of 65536 subordinate ids",
                    f"sudo usermod {flag} 100000-165535 {name} (any free range of 65536)",
                )
            )
    if found:
        return found
    done = runner([*NAMESPACE, "true"], timeout_s=10)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        found.append(
            Blocker(
                f"a user namespace with subordinate ids cannot be made ({why[0]})", _userns_knob()
            )
        )
    return found


def remove_tree(path: Path, runner: Runner) -> None:
    """Remove ``path``, also where it holds files of subordinate ids (left by an
    interrupted build), which only the namespace may delete."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists() and not is_root():
        runner(as_root(["rm", "-rf", "--one-file-system", str(path)]), timeout_s=300)
