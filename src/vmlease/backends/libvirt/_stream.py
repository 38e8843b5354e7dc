"""A libvirt stream as a socket: the agent channel speaks to a socket pair,
and two threads carry bytes between its far end and the stream.

Streams work the same over every URI (``qemu+ssh://`` and ``qemu+tcp://``
included), so the agent is reached wherever the domain runs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

__all__ = ["StreamSocket"]

log = logging.getLogger("vmlease.libvirt")

_CHUNK = 256 * 1024


class StreamSocket:
    """Bridges the libvirt stream ``stream`` to :attr:`sock`, until :meth:`close`
    or until either side ends."""

    def __init__(self, stream: Any, name: str) -> None:
        self.sock, self._far = socket.socketpair()
        self._stream = stream
        self._name = name
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._inbound, name=f"vmlease-stream-in-{name}", daemon=True),
            threading.Thread(target=self._outbound, name=f"vmlease-stream-out-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _inbound(self) -> None:
        """Guest to host: the stream's bytes into the socket."""
        try:
            while not self._closed.is_set():
                data = self._stream.recv(_CHUNK)
                if isinstance(data, int) or not data:
                    break  # -2 cannot happen on a blocking stream; b"" is the end
                self._far.sendall(data)
        except Exception as exc:  # any failure ends the bridge; the channel reports it
            log.debug("stream of %s ended: %s", self._name, exc)
        finally:
            self._shut()

    def _outbound(self) -> None:
        """Host to guest: the socket's bytes into the stream."""
        try:
            while not self._closed.is_set():
                data = self._far.recv(_CHUNK)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    sent = self._stream.send(view.tobytes())
                    if sent <= 0:
                        raise OSError("the stream refused data")
                    view = view[sent:]
        except Exception as exc:  # any failure ends the bridge; the channel reports it
            log.debug("stream of %s ended: %s", self._name, exc)
        finally:
            self._shut()

    def _shut(self) -> None:
        """End both sides once: the agent channel then sees the socket close."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._far.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._stream.abort()

    def close(self) -> None:
        self._shut()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._far.close()
        self.sock.close()
