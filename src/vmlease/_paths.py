"""Where vmlease keeps its files.

- State (ledger, per-VM directories, locks): ``$VMLEASE_STATE_DIR``, else
  ``$XDG_STATE_HOME/vmlease``, else ``~/.local/state/vmlease``. Created with
  mode 0700: it holds sockets that control VMs.
- Cache (built images, downloaded packages): ``$VMLEASE_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/vmlease``, else ``~/.cache/vmlease``. Images live in its
  ``images`` folder unless ``$VMLEASE_IMAGE_DIR`` says otherwise.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from vmlease._errors import ConfigError

__all__ = [
    "ensure_private_dir",
    "free_bytes",
    "free_space",
    "give_to_sudo_user",
    "image_dir",
    "megabytes",
    "state_dir",
    "sudo_user",
]


def _base(env: Mapping[str, str], own: str, xdg: str, fallback: str) -> Path:
    if env.get(own):
        return Path(env[own]).expanduser()
    if env.get(xdg):
        return Path(env[xdg]).expanduser() / "vmlease"
    return Path.home() / fallback / "vmlease"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The state directory (not created)."""
    env = os.environ if env is None else env
    return _base(env, "VMLEASE_STATE_DIR", "XDG_STATE_HOME", ".local/state")


def image_dir(env: Mapping[str, str] | None = None) -> Path:
    """The image cache directory (not created)."""
    env = os.environ if env is None else env
    if env.get("VMLEASE_IMAGE_DIR"):
        return Path(env["VMLEASE_IMAGE_DIR"]).expanduser()
    return _base(env, "VMLEASE_CACHE_DIR", "XDG_CACHE_HOME", ".cache") / "images"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make sure only we can use it.

    Raises ConfigError if it exists but is not a directory or belongs to
    someone else: a state directory another user controls could hand us
    their sockets.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot create the directory {path}: {exc.strerror}; "
            "point VMLEASE_STATE_DIR at a writable place"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists but is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "use a directory of your own (VMLEASE_STATE_DIR)"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or would: its nearest
    existing parent), for this user; None if that cannot be told."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def free_space(path: Path) -> str:
    """Free space where ``path`` lives, for messages: ``"12 MiB"``."""
    free = free_bytes(path)
    return "an unknown amount" if free is None else megabytes(free)


def megabytes(n: int) -> str:
    """``n`` bytes for a person to read."""
    return f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**20:.0f} MiB"


def sudo_user(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(uid, gid) of the user who ran this process through sudo; None unless this
    is root started by ``sudo`` on someone else's behalf."""
    env = os.environ if env is None else env
    if os.geteuid() != 0:
        return None
    try:
        uid, gid = int(env.get("SUDO_UID", "")), int(env.get("SUDO_GID", ""))
    except ValueError:
        return None
    return (uid, gid) if uid != 0 else None


def give_to_sudo_user(path: Path, env: Mapping[str, str] | None = None) -> None:
    """Under sudo, when ``path`` lies in a folder of the user who ran sudo (their
    cache), make everything under it theirs: what ``sudo vmlease image build``
    makes in a user's cache is the user's to use, prune and rebuild."""
    who = sudo_user(env)
    if who is None:
        return
    # The nearest folder up from ``path`` that root does not own says whose
    # cache this is (what root made there, now or under an earlier sudo, is not
    # a sign: it is what this hands over).
    owner = path
    try:
        while owner != owner.parent and (not owner.exists() or owner.stat().st_uid == 0):
            owner = owner.parent
        if owner.stat().st_uid != who[0]:
            return  # not the user's folder (a shared cache, root's own): leave it be
        for top, dirs, files in os.walk(path):
            for entry in [Path(top), *(Path(top) / n for n in dirs + files)]:
                st = entry.lstat()
                if (st.st_uid, st.st_gid) != who:
                    os.lchown(entry, *who)
    except OSError:
        return  # best effort: what is left says so when the user meets it
