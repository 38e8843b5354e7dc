"""FlakyBackend: a wrapper that makes a share of its backend's operations fail
transiently or hang (see ``vmlease.testing``, its public home)."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from vmlease._errors import BackendError, BackendTimeout, ConfigError
from vmlease._spec import VMSpec
from vmlease._timeouts import DEFAULT
from vmlease.backends._base import Backend, BackendVM, ExecResult
from vmlease.backends._forwarding import ForwardingBackend

__all__ = ["FAULT_OPERATIONS", "FlakyBackend", "check_faults", "parse_faults"]

T = TypeVar("T")

#: The operations a FlakyBackend can make fail or hang.
FAULT_OPERATIONS = frozenset(
    {
        "create",
        "wait_ready",
        "start",
        "stop",
        "delete",
        "list",
        "exec",
        "put",
        "get",
        "snapshot",
        "restore",
        "reset",
    }
)


def _check(
    failure_rate: float = 0.3,
    hang_rate: float = 0.0,
    hang_s: float = 2.0,
    seed: int | None = None,
    operations: Sequence[str] | None = None,
) -> frozenset[str]:
    """Check FlakyBackend's settings; returns the operations that may fault."""
    for label, rate in (("failure_rate", failure_rate), ("hang_rate", hang_rate)):
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ConfigError(f"{label} must be a number from 0 to 1, not {rate!r}")
    if failure_rate + hang_rate > 1:
        raise ConfigError(
            f"failure_rate + hang_rate must be at most 1, not {failure_rate + hang_rate:g}"
        )
    if isinstance(hang_s, bool) or not isinstance(hang_s, int | float) or hang_s < 0:
        raise ConfigError(f"hang_s must be 0 or more seconds, not {hang_s!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be a whole number, not {seed!r}")
    if isinstance(operations, str):
        raise ConfigError(f"operations must be a list of names, not the string {operations!r}")
    chosen = frozenset(FAULT_OPERATIONS if operations is None else operations)
    unknown = chosen - FAULT_OPERATIONS
    if unknown:
        raise ConfigError(
            f"FlakyBackend cannot fault {', '.join(sorted(map(str, unknown)))}; "
            f"it knows {', '.join(sorted(FAULT_OPERATIONS))}"
        )
    return chosen


class FlakyBackend(ForwardingBackend):
    """Wraps ``inner`` and makes its operations fail transiently or hang.

    Args:
        inner: the backend that does the work.
        failure_rate: share of operations (0 to 1) that fail at once.
        hang_rate: share of operations that hang (see the module docstring).
        hang_s: how long a hang lasts, at most the operation's time limit.
        seed: makes the sequence of faults repeatable.
        operations: which operations may fault (default: all of
            ``FAULT_OPERATIONS``).
        sleep: how a hang waits (injected for tests).

    Attributes:
        injected: faults injected so far, by operation.
        calls: operations called so far, by operation.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        failure_rate: float = 0.3,
        hang_rate: float = 0.0,
        hang_s: float = 2.0,
        seed: int | None = None,
        operations: Sequence[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(inner, Backend):
            raise ConfigError(f"FlakyBackend wraps a vmlease Backend, not {inner!r}")
        chosen = _check(failure_rate, hang_rate, hang_s, seed, operations)
        # VMs are the inner backend's: recorded, reaped and cleaned up under its name.
        super().__init__(inner)
        self.failure_rate = float(failure_rate)
        self.hang_rate = float(hang_rate)
        self.hang_s = float(hang_s)
        self.operations = chosen
        self.injected: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._random = random.Random(seed)  # noqa: S311 - fault injection, not secrets
        self._lock = threading.Lock()
        self._sleep = sleep

    def __repr__(self) -> str:
        return (
            f"<FlakyBackend around {self.inner.name}: failure_rate={self.failure_rate:g} "
            f"hang_rate={self.hang_rate:g}>"
        )

    def _draw(self, op: str) -> str:
        """``fail``, ``hang`` or ``run`` for one call of ``op``."""
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            if op not in self.operations:
                return "run"
            r = self._random.random()
            what = (
                "fail"
                if r < self.failure_rate
                else "hang"
                if r < self.failure_rate + self.hang_rate
                else "run"
            )
            if what != "run":
                self.injected[op] = self.injected.get(op, 0) + 1
            return what

    def _hang(self, op: str, name: str, limit_s: float | None) -> BackendTimeout:
        wait = self.hang_s if limit_s is None else min(self.hang_s, limit_s)
        self._sleep(wait)
        return BackendTimeout(f"{op} {name}: injected hang of {wait:g} s (FlakyBackend)")

    def _faulty(self, op: str, name: str, limit_s: float | None, run: Callable[[], T]) -> T:
        what = self._draw(op)
        if what == "fail":
            raise BackendError(f"{op} {name}: injected failure (FlakyBackend)", transient=True)
        if what == "hang":
            raise self._hang(op, name, limit_s)
        return run()

    def injected_faults(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    # -- operations that fault ----------------------------------------------------

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = DEFAULT.create_s) -> None:
        what = self._draw("create")
        if what == "fail":
            raise BackendError(f"create {name}: injected failure (FlakyBackend)", transient=True)
        self.inner.create(name, spec, timeout_s=timeout_s)
        if what == "hang":
            raise self._hang("create", name, timeout_s)  # slow, but the VM is made

    def wait_ready(self, name: str, timeout_s: float) -> None:
        self._faulty("wait_ready", name, timeout_s, lambda: self.inner.wait_ready(name, timeout_s))

    def start(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self._faulty("start", name, timeout_s, lambda: self.inner.start(name, timeout_s=timeout_s))

    def stop(self, name: str, timeout_s: float) -> None:
        self._faulty("stop", name, timeout_s, lambda: self.inner.stop(name, timeout_s))

    def delete(self, name: str, *, timeout_s: float = DEFAULT.delete_s) -> None:
        self._faulty(
            "delete", name, timeout_s, lambda: self.inner.delete(name, timeout_s=timeout_s)
        )

    def list(self, *, timeout_s: float = DEFAULT.list_s) -> list[BackendVM]:
        return self._faulty("list", "", timeout_s, lambda: self.inner.list(timeout_s=timeout_s))

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: bytes | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout_s: float | None,
    ) -> ExecResult:
        return self._faulty(
            "exec",
            name,
            None if timeout_s is None or math.isinf(timeout_s) else timeout_s,
            lambda: self.inner.exec(name, argv, stdin=stdin, env=env, cwd=cwd, timeout_s=timeout_s),
        )

    def put(
        self, name: str, local: Path, remote: str, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        self._faulty(
            "put", name, timeout_s, lambda: self.inner.put(name, local, remote, timeout_s=timeout_s)
        )

    def get(
        self, name: str, remote: str, local: Path, *, timeout_s: float = DEFAULT.copy_s
    ) -> None:
        self._faulty(
            "get", name, timeout_s, lambda: self.inner.get(name, remote, local, timeout_s=timeout_s)
        )

    def snapshot(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        self._faulty(
            "snapshot",
            name,
            timeout_s,
            lambda: self.inner.snapshot(name, tag, timeout_s=timeout_s),
        )

    def restore(self, name: str, tag: str, *, timeout_s: float = DEFAULT.snapshot_s) -> None:
        self._faulty(
            "restore", name, timeout_s, lambda: self.inner.restore(name, tag, timeout_s=timeout_s)
        )

    def reset(self, name: str, *, timeout_s: float = DEFAULT.start_s) -> None:
        self._faulty("reset", name, timeout_s, lambda: self.inner.reset(name, timeout_s=timeout_s))

    def forward(self, name: str, guest_port: int, *, timeout_s: float = DEFAULT.forward_s) -> int:
        return self._faulty(
            "forward",
            name,
            timeout_s,
            lambda: self.inner.forward(name, guest_port, timeout_s=timeout_s),
        )


_FAULT_KEYS: dict[str, Callable[[str], object]] = {
    "failure_rate": float,
    "hang_rate": float,
    "hang_s": float,
    "seed": int,
    "operations": lambda v: [o for o in v.split("+") if o],
}


def parse_faults(text: str) -> dict[str, object]:
    """Parse ``failure_rate=0.3,hang_rate=0.05,hang_s=1,seed=7,operations=create+exec``
    into FlakyBackend's keyword arguments (checked by FlakyBackend itself)."""
    found: dict[str, object] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _FAULT_KEYS:
            raise ConfigError(
                f"cannot read the fault setting {part!r}: write KEY=VALUE pairs separated by "
                f"commas, with KEY one of {', '.join(_FAULT_KEYS)} "
                "(e.g. failure_rate=0.3,hang_rate=0.05,seed=1)"
            )
        try:
            found[key] = _FAULT_KEYS[key](value.strip())
        except ValueError:
            raise ConfigError(f"the fault setting {key} must be a number, not {value!r}") from None
    return found


def check_faults(text: str) -> dict[str, object]:
    """Parse fault settings and check their values; ConfigError if they are wrong."""
    faults = parse_faults(text)
    _check(**faults)  # type: ignore[arg-type]
    return faults
