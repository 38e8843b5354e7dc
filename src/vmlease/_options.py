"""What a test run was asked for: the settings of the pytest plugin, checked.

Kept apart from ``_testrun`` so the plugin can check its options without
importing the machinery that makes VMs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmlease._errors import ConfigError
from vmlease._spec import VMSpec

__all__ = ["KEEP_CHOICES", "Keep", "RunOptions"]


class Keep(enum.StrEnum):
    """Which VMs a test run leaves running for inspection."""

    NEVER = "never"
    FAILED = "failed"  # those of failed tests
    ALWAYS = "always"

    @classmethod
    def parse(cls, text: object) -> Keep:
        """``text`` as a Keep; ConfigError naming the choices."""
        if text not in KEEP_CHOICES:
            raise ConfigError(f"keep must be one of {', '.join(KEEP_CHOICES)}, not {text!r}")
        return cls(text)


#: The words ``--vm-keep`` takes.
KEEP_CHOICES = tuple(k.value for k in Keep)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Settings for a test run (from the command line, environment or ini file).

    Attributes:
        backend: backend name.
        spec: what VMs are unless a test asks otherwise (``--vm-image``,
            ``--vm-network``).
        keep: ``never``, ``failed`` (keep the VMs of failed tests) or ``always``.
        max_vms: at most this many VMs at once across the run's workers.
        max_age_s: each VM's lease, in seconds.
        session_id: the run's session id, shared by its workers.
        worker: the xdist worker id (``gw0``), "" without xdist.
        state_dir: the state directory (default: vmlease's).
        faults: faults to inject, for testing a suite's resilience
            (``failure_rate=0.3,hang_rate=0.05,seed=1``; see vmlease.testing).
        retry: the retry policy and time limits (``attempts=8,total_s=300,
            create_s=600``; see RetryPolicy.parse).
        backend_options: options for making the backend (``--vm-libvirt-uris``
            gives the libvirt backend's ``uris``); a backend that does not take
            one says so.
    """

    backend: str = "qemu"
    spec: VMSpec = field(default_factory=VMSpec)
    keep: Keep = Keep.NEVER
    max_vms: int | None = None
    max_age_s: float | None = None
    session_id: str | None = None
    worker: str = ""
    state_dir: Path | None = None
    faults: str | None = None
    retry: str | None = None
    backend_options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", Keep.parse(self.keep))
        if not isinstance(self.spec, VMSpec):
            raise ConfigError(f"spec must be a VMSpec, not {self.spec!r}")
        if self.max_vms is not None and (
            isinstance(self.max_vms, bool) or not isinstance(self.max_vms, int) or self.max_vms < 1
        ):
            raise ConfigError(
                f"the VM limit must be a whole number of at least 1, not {self.max_vms!r}"
            )
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ConfigError(
                f"the maximum VM age must be more than 0 seconds, not {self.max_age_s!r}"
            )
        if self.faults:
            from vmlease.testing import check_faults

            check_faults(self.faults)
        if self.retry:
            from vmlease._retry import RetryPolicy

            RetryPolicy.parse(self.retry)
