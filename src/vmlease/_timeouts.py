"""How long each backend operation may take: the one place that says so.

A session gives every backend call the limit of its operation here (cut to
what is left of its retry policy's total); a backend called without a
session (``vmlease cleanup``, the reaper, a test) gets the same defaults.
Every backend bounds each operation by the limit it is given, including the
parts spent waiting on a daemon, a monitor or a guest.

All times are in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vmlease._errors import ConfigError

__all__ = ["DEFAULT", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long one attempt of each backend operation may take before it
    counts as hung (and, like any transient failure, is retried).

    Booting has its own limit (``Session(boot_timeout_s=...)``) and commands
    theirs (``VM.run(timeout_s=...)``), to which ``answer_s`` is added: the
    time the guest has to report a command it killed at its limit.
    """

    create_s: float = 300.0
    start_s: float = 120.0
    stop_s: float = 60.0
    delete_s: float = 60.0
    snapshot_s: float = 120.0
    list_s: float = 30.0
    #: ``put`` and ``get`` of one file.
    copy_s: float = 300.0
    #: ``mark``, ``identity`` and ``keep``: small exchanges with a backend or guest.
    mark_s: float = 60.0
    #: ``forward`` and ``ssh``.
    forward_s: float = 60.0
    answer_s: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and float(value) > 0):
                raise ConfigError(
                    f"Timeouts.{f.name} must be a number of seconds, more than 0, not {value!r}"
                )


#: The limits a backend operation gets when its caller names none.
DEFAULT = Timeouts()
