"""Progress of long operations for a person: live on a terminal, plain lines in logs.

On a terminal the current step is shown on one line with the seconds it has
taken so far, rewritten in place (a step that runs a minute, like
mmdebstrap, visibly moves); each finished step stays as a line with its
time. Anywhere else (CI logs, pipes) every step is one plain line, written
once, so logs stay short and readable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A ``progress(line)`` callable for builds, writing to ``stream``.

    Use as a context manager so the live line is finished on the way out.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        prefix: str = "vmlease: ",
        live: bool | None = None,
        tick_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._prefix = prefix
        self._live = stream.isatty() if live is None else live
        self._tick_s = tick_s
        self._clock = clock
        self._lock = threading.Lock()
        self._step = ""
        self._since = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, line: str) -> None:
        with self._lock:
            if not self._live:
                self._stream.write(f"{self._prefix}{line}\n")
                self._stream.flush()
                return
            self._finish_step()
            self._step, self._since = line, self._clock()
            self._draw()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="vmlease-progress", daemon=True)
            self._ticker.start()

    def _draw(self) -> None:
        elapsed = self._clock() - self._since
        self._stream.write(f"\r\033[K{self._prefix}{self._step} ({elapsed:.0f} s)")
        self._stream.flush()

    def _finish_step(self) -> None:
        if self._step:
            self._draw()
            self._stream.write("\n")
            self._step = ""

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            with self._lock:
                if self._step:
                    self._draw()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            self._finish_step()
            self._stream.flush()
