"""Unix-socket helpers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["connect_unix"]

_SUN_PATH_MAX = 107


def connect_unix(path: Path, timeout_s: float) -> socket.socket:
    """Connect to a Unix socket, even one whose path is longer than sockaddr_un allows."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    target = str(path)
    dir_fd = None
    try:
        if len(target.encode()) > _SUN_PATH_MAX:
            # Resolve through an open directory: /proc/self/fd/N/name is short.
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            target = f"/proc/self/fd/{dir_fd}/{path.name}"
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock
