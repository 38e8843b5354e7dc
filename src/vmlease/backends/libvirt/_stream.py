"""A libvirt stream as a socket: the agent channel speaks to one end of a
socket pair, and libvirt's event loop carries bytes between the other end
and a non-blocking stream.

Both directions run in the event loop's thread, in callbacks (the way
``virsh console`` drives a stream), so the stream is never used from two
threads at once. Streams work the same over every URI (``qemu+ssh://`` and
``qemu+tcp://`` included), so the agent is reached wherever the domain runs.
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
_AGAIN = -2


class StreamSocket:
    """Bridges the non-blocking libvirt stream ``stream`` to :attr:`sock`, until
    :meth:`close` or until either side ends.

    Args:
        stream: a stream made with ``VIR_STREAM_NONBLOCK``, already opened on a channel.
        libvirt: the libvirt module (its event loop must be running).
        name: the VM's name, for messages.
    """

    def __init__(self, stream: Any, libvirt: Any, name: str) -> None:
        self.sock, self._far = socket.socketpair()
        self._far.setblocking(False)
        self._stream = stream
        self._lv = libvirt
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._pending = b""  # host-to-guest bytes the stream has not taken yet
        self._inbox = b""  # guest-to-host bytes the socket has not taken yet
        self._base = (
            libvirt.VIR_STREAM_EVENT_READABLE
            | libvirt.VIR_STREAM_EVENT_ERROR
            | libvirt.VIR_STREAM_EVENT_HANGUP
        )
        stream.eventAddCallback(self._base, self._on_stream, None)
        self._watch = libvirt.virEventAddHandle(
            self._far.fileno(), libvirt.VIR_EVENT_HANDLE_READABLE, self._on_socket, None
        )

    # -- callbacks, in the event loop's thread --------------------------------
    #
    # Nothing here blocks the loop (it also answers keepalive probes): bytes
    # one side cannot take yet wait in a buffer, and the other side is not
    # read until they are gone.

    def _on_stream(self, _stream: Any, events: int, _opaque: object) -> None:
        lv = self._lv
        with self._lock:
            if self._closed:
                return
            try:
                if events & lv.VIR_STREAM_EVENT_READABLE:
                    self._receive()
                if events & lv.VIR_STREAM_EVENT_WRITABLE:
                    self._to_guest()
                if events & (lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP):
                    self._end("the stream ended")
                    return
                self._update()
            except Exception as exc:  # any failure ends the bridge; the channel reports it
                self._end(str(exc))

    def _on_socket(self, _watch: int, _fd: int, events: int, _opaque: object) -> None:
        lv = self._lv
        with self._lock:
            if self._closed:
                return
            try:
                if events & lv.VIR_EVENT_HANDLE_WRITABLE:
                    self._to_host()
                if events & lv.VIR_EVENT_HANDLE_READABLE and not self._pending:
                    data = self._far.recv(_CHUNK)
                    if not data:
                        self._end("the channel closed its end")
                        return
                    self._pending = data
                    self._to_guest()
                self._update()
            except BlockingIOError:
                self._update()
            except Exception as exc:  # any failure ends the bridge; the channel reports it
                self._end(str(exc))

    def _receive(self) -> None:
        """Guest to host: what the stream holds, into the socket, while it takes it."""
        while not self._inbox:
            data = self._stream.recv(_CHUNK)
            if data == _AGAIN:
                return
            if isinstance(data, int) or not data:
                raise OSError("the guest side closed")
            self._inbox = data
            self._to_host()

    def _to_host(self) -> None:
        while self._inbox:
            try:
                sent = self._far.send(self._inbox)
            except BlockingIOError:
                return
            self._inbox = self._inbox[sent:]

    def _to_guest(self) -> None:
        while self._pending:
            sent = self._stream.send(self._pending)
            if sent == _AGAIN:
                return
            if sent <= 0:
                raise OSError("the stream refused data")
            self._pending = self._pending[sent:]

    def _update(self) -> None:
        """Watch each side for what the buffers allow."""
        lv = self._lv
        stream = self._base if not self._inbox else self._base & ~lv.VIR_STREAM_EVENT_READABLE
        if self._pending:
            stream |= lv.VIR_STREAM_EVENT_WRITABLE
        sock = 0 if self._pending else lv.VIR_EVENT_HANDLE_READABLE
        if self._inbox:
            sock |= lv.VIR_EVENT_HANDLE_WRITABLE
        self._stream.eventUpdateCallback(stream)
        lv.virEventUpdateHandle(self._watch, sock)

    def _end(self, why: str) -> None:
        """Stop both directions once; the channel sees its socket close. Caller holds the lock."""
        if self._closed:
            return
        self._closed = True
        log.debug("channel stream of %s ended: %s", self._name, why)
        with contextlib.suppress(Exception):
            self._lv.virEventRemoveHandle(self._watch)
        with contextlib.suppress(Exception):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(Exception):
            self._stream.abort()
        with contextlib.suppress(OSError):
            self._far.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._end("closed")
        self._far.close()
        self.sock.close()
