"""VM names: the rule every backend accepts, and unique generated names.

The rule is the intersection of what QEMU (our own directories), OrbStack and
Multipass accept, and what a host name may be: 1 to 63 characters, letters,
digits and hyphens, starting with a letter and ending with a letter or digit.
"""

from __future__ import annotations

import re
import secrets
import string

from ._errors import InvalidName

__all__ = ["MAX_NAME_LENGTH", "NAME_RULE", "new_session_id", "validate_name", "vm_name"]

MAX_NAME_LENGTH = 63
NAME_RULE = (
    "1 to 63 characters: letters, digits and hyphens, "
    "starting with a letter and ending with a letter or digit"
)
_NAME_RE = re.compile(r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ALPHABET = string.ascii_lowercase + string.digits


def validate_name(name: object) -> str:
    """Return ``name`` if it follows the rule; raise InvalidName saying the rule otherwise."""
    if not isinstance(name, str):
        raise InvalidName(f"a VM name must be a string, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid VM name {name!r}: a name is {NAME_RULE}")
    return name


def new_session_id() -> str:
    """A fresh session id: 10 characters, lowercase letters and digits, starting with a letter.

    About 52 bits of randomness: two live sessions sharing an id is
    negligible, and the ledger's unique names catch it if it ever happens.
    """
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(_ALPHABET) for _ in range(9)
    )


def vm_name(prefix: str, session_id: str, counter: int, tag: str = "") -> str:
    """The generated name of a session's ``counter``-th VM.

    ``prefix-session-[tag-]counter``, for example ``vmlease-k3x9q2mz0a-gw1-4``.
    Unique across processes and runs because session ids are; a long prefix
    or tag is shortened so the result always follows the rule.
    """
    tail = f"-{session_id}-{tag + '-' if tag else ''}{counter}"
    room = MAX_NAME_LENGTH - len(tail)
    head = prefix[:room].rstrip("-") or "vm"
    return validate_name(head + tail)
