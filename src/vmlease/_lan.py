"""Private networks as a test holds them: ``session.network("lan")``.

VMs join a network by the name the test gives it (``networks=["lan"]``), and
the session's backend makes it on the first VM that does. The handle is for
what happens on the network as a whole: partitions and their healing, and
frames delayed or lost on their way to a VM. A VM's own link is
``vm.link_down()`` and ``vm.link_up()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vmlease._errors import ConfigError
from vmlease._spec import NETWORK_NAME

__all__ = ["PrivateNetwork"]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


#: Sends a request to a network's switch through the session (its name, the request).
Ask = Callable[[str, dict[str, Any]], dict[str, Any]]


def _name_of(vm: _Named | str) -> str:
    name = vm if isinstance(vm, str) else getattr(vm, "name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{vm!r} is not a VM or a VM's name")
    return name


class PrivateNetwork:
    """A private network of one session's VMs.

    Args:
        name: the name VMs join it by.
        ask: sends a request to its switch (the session's, timed and retried).
        members: the names of the session's VMs on it, now.
    """

    def __init__(self, name: str, ask: Ask, members: Callable[[], list[str]]) -> None:
        if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name):
            raise ConfigError(
                f"{name!r} cannot name a network: use at most 15 lower-case letters, digits "
                "and '-', starting with a letter"
            )
        self.name = name
        self._ask = ask
        self._members = members

    def __repr__(self) -> str:
        return f"<PrivateNetwork {self.name}: {', '.join(self.vms) or 'no VMs'}>"

    @property
    def vms(self) -> list[str]:
        """The names of the session's VMs on this network."""
        return self._members()

    def _known(self, vm: _Named | str) -> str:
        name = _name_of(vm)
        if name not in self.vms:
            raise ConfigError(f"VM {name} is not on network {self.name} (it has {self.vms})")
        return name

    def partition(self, *groups: Sequence[_Named | str]) -> None:
        """Split the network into ``groups`` of VMs that hear only each other (a VM
        in no group hears nobody), as NixOS's tests ``block`` links; until :meth:`heal`."""
        if not groups:
            raise ConfigError("partition takes at least one group of VMs")
        names = [[self._known(vm) for vm in group] for group in groups]
        self._ask(self.name, {"op": "partition", "groups": names})

    def heal(self) -> None:
        """Every VM on the network hears every other again."""
        self._ask(self.name, {"op": "heal"})

    def clear(self) -> None:
        """No partition and no impairment any more: the network as it was made."""
        self._ask(self.name, {"op": "clear"})

    def impair(self, vm: _Named | str, *, delay_s: float = 0.0, loss: float = 0.0) -> None:
        """Delay the frames ``vm`` receives on this network by ``delay_s`` seconds
        (at most 60) and drop a share ``loss`` of them (0 to 1); both 0 to stop."""
        for label, value, most in (("delay_s", delay_s, 60.0), ("loss", loss, 1.0)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{label} must be a number, not {value!r}")
            if not 0 <= value <= most:
                raise ConfigError(f"{label} must be between 0 and {most:g}, not {value!r}")
        request = {"op": "impair", "port": self._known(vm), "delay_s": delay_s, "loss": loss}
        self._ask(self.name, request)
