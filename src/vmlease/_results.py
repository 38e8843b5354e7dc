"""What a command did in a VM, as its caller gets it and as a VM's transcript keeps it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandResult", "TranscriptEntry"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did in a VM.

    Attributes:
        argv: the command.
        exit_code: its exit status; 127 if the command does not exist,
            128 + N if killed by signal N.
        stdout_bytes, stderr_bytes: its raw output.
        duration_s: wall time of the round trip, in seconds.
    """

    argv: tuple[str, ...]
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration_s: float

    @property
    def stdout(self) -> str:
        """Standard output, decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Standard error, decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr_bytes.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class TranscriptEntry:
    """One command as a VM's transcript keeps it (output truncated)."""

    argv: tuple[str, ...]
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str
