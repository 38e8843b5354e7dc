"""A session's create: claiming the VM's name in the ledger, one attempt of the
backend's create, and adopting what an earlier attempt made.

A create that failed transiently may have made its VM anyway; that VM is the
session's own (its name was claimed in the ledger first), so the next
attempt adopts it if it answers, or deletes it to make it again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from vmlease._cleanup import mark_prefix
from vmlease._errors import (
    BackendError,
    ConfigError,
    VMAlreadyExists,
    VMLeaseError,
    VMNotFound,
)
from vmlease._identity import Owner
from vmlease._ledger import Ledger, Record
from vmlease._naming import validate_name
from vmlease._retry import RetryPolicy
from vmlease._spec import VMSpec
from vmlease._timeouts import DEFAULT
from vmlease.backends import Backend

__all__ = ["CreateAttempts", "check_session", "claim", "mark", "positive", "requested"]

log = logging.getLogger("vmlease")


def requested(spec: VMSpec | None, asked: Mapping[str, object]) -> VMSpec:
    """The spec a create asks for: ``spec`` whole, or the keywords ``asked``, not both."""
    if spec is None:
        return VMSpec.of(**asked)
    if not isinstance(spec, VMSpec):
        raise ConfigError(f"spec must be a VMSpec, not {spec!r}")
    if VMSpec.of(**asked) != VMSpec():
        raise ConfigError("give a VM's spec whole (spec=...) or by keywords, not both")
    return spec


def check_session(name_prefix: object, boot_s: object, max_age_s: object, retry: object) -> None:
    """ConfigError for a session's settings that cannot be."""
    if not isinstance(name_prefix, str) or not name_prefix:
        raise ConfigError("name_prefix must be a non-empty string")
    validate_name(name_prefix)
    for label, value in (("boot_timeout_s", boot_s), ("max_age_s", max_age_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{label} must be a positive number of seconds, not {value!r}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigError(f"retry must be a vmlease.RetryPolicy, not {retry!r}")


def positive(timeout: object) -> float:
    """``timeout`` as the seconds a boot may take; ConfigError unless it is more than 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"boot_timeout_s must be a positive number, not {timeout!r}")
    return float(timeout)


def claim(
    ledger: Ledger,
    backend: Backend,
    owner: Owner,
    spec: VMSpec,
    *,
    name: str | None,
    names: Callable[[int], str],
    first: int,
    expires_at: float,
) -> tuple[Record, int]:
    """Write the ledger row for a new VM, before the backend makes it: named
    ``name``, or else ``names(n)`` for the first counter ``n >= first`` that no
    live VM's name uses (processes may share a session id). Returns the row
    and the counter used (``first - 1`` for a given name)."""
    asked: list[int] = []

    def generated(counter: int) -> str:
        asked.append(counter)
        candidate = names(counter)
        backend.validate_name(candidate)
        return candidate

    record = ledger.claim(
        name=name if name is not None else generated,
        backend=backend.name,
        owner=owner,
        spec=spec.to_json(),
        expires_at=expires_at,
        first=first,
    )
    return record, asked[-1] if asked else first - 1


class CreateAttempts:
    """The create step of ``Session.create``, called once per attempt.

    A create that failed transiently (a timeout, say) may have made the VM
    anyway, so the next attempt can meet "already exists". That VM is ours:
    it is adopted if it answers, or deleted so that the attempt after can
    make it again. "Already exists" on the first attempt means another
    program's VM has the name, which is never touched.
    """

    def __init__(
        self,
        backend: Backend,
        name: str,
        spec: VMSpec,
        *,
        boot_timeout_s: float,
        delete_timeout_s: float,
    ) -> None:
        self._backend = backend
        self._name = name
        self._spec = spec
        self._boot_timeout_s = boot_timeout_s
        self._delete_timeout_s = delete_timeout_s
        self.may_exist = False  # whether an earlier attempt may have made the VM
        self.adopted = False

    def __call__(self, limit_s: float) -> None:
        name = self._name
        try:
            self._backend.create(name, self._spec, timeout_s=limit_s)
        except VMAlreadyExists:
            if not self.may_exist:
                raise
            self._adopt_or_clear(limit_s)
            return
        except BaseException:
            self.may_exist = True
            raise
        self.may_exist = True

    def _adopt_or_clear(self, limit_s: float) -> None:
        name = self._name
        try:
            self._backend.wait_ready(name, min(limit_s, self._boot_timeout_s))
        except VMLeaseError as exc:
            log.warning("VM %s, made by a create that failed, does not answer: %s", name, exc)
            with contextlib.suppress(VMNotFound):
                self._backend.delete(name, timeout_s=self._delete_timeout_s)
            raise BackendError(
                f"VM {name} was made by a create that failed, and did not answer; "
                "it was deleted, to be made again",
                transient=True,
            ) from exc
        log.warning("adopted VM %s, made by a create that failed", name)
        self.adopted = True


def mark(
    backend: Backend,
    ledger: Ledger,
    record: Record,
    call: Callable[..., Any],
    *,
    timeout_s: float = DEFAULT.mark_s,
) -> None:
    """On a backend whose VMs live among the user's own, mark the new VM as ours
    and record the mark, for cleanup to compare before deleting; ``call`` runs
    the backend's operation with the session's retries and timing, each
    attempt within ``timeout_s``.

    A VM that cannot be marked still serves; cleanup then knows it by its
    generated name alone (an explicitly named one it leaves for the user).
    """
    if not backend.capabilities.shared_namespace:
        return
    name = record.name
    token = mark_prefix(record) + secrets.token_hex(8)
    try:
        made = call(
            "mark",
            lambda limit: backend.mark(name, token, timeout_s=limit),
            timeout_s=timeout_s,
            subject=name,
        )
    except VMLeaseError as exc:
        log.warning("%s: could not mark %s as vmlease's (%s)", backend.name, name, exc)
        return
    if made:
        ledger.set_instance_id(record.id, made)
