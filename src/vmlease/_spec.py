"""What a VM should be: the validated request a session hands a backend."""

from __future__ import annotations

import enum
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from vmlease._distros import canonical
from vmlease._errors import InvalidSpec

__all__ = [
    "ALIAS_RULE",
    "ARCHES",
    "MAX_CPUS",
    "MAX_MEMORY_MB",
    "MAX_NETWORKS",
    "NETWORK_NAME",
    "USER_RULE",
    "Network",
    "VMSpec",
    "debian_arch",
    "host_arch",
    "parse_arch",
    "parse_network",
    "parse_networks",
    "spec_fields",
]

MAX_CPUS = 256
MAX_MEMORY_MB = 1024 * 1024
MAX_DISK_GB = 64 * 1024
#: What a guest user's name may be (POSIX-portable, as useradd takes it).
USER_RULE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _positive_int(field: str, value: object, maximum: int) -> int:
    # bool is an int subclass: True cpus is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{field} must be a whole number, not {value!r}")
    if value < 1:
        raise InvalidSpec(f"{field} must be at least 1, not {value}")
    if value > maximum:
        raise InvalidSpec(f"{field} must be at most {maximum}, not {value}")
    return value


class Network(enum.StrEnum):
    """What network a VM gets."""

    USER = "user"  # user-mode networking: outbound through the host, no root, no bridges
    NONE = "none"  # no network interface at all
    RESTRICTED = "restricted"  # an interface, but no outbound traffic: forwards only


def parse_network(value: object) -> Network | None:
    """``value`` (a Network, its word, or None for the image's default) as a Network."""
    if value is None:
        return None
    try:
        return Network(str(value)) if isinstance(value, str) else Network(repr(value))
    except ValueError:
        choices = ", ".join(n.value for n in Network)
        raise InvalidSpec(f"network must be one of {choices}, not {value!r}") from None


#: Machine architectures by each name they go by, to the one vmlease records
#: (the kernel's, as ``uname -m`` prints it).
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


def host_arch(machine: str | None = None) -> str:
    """This machine's architecture as vmlease names it (``x86_64``, ``aarch64``);
    an architecture vmlease knows no other name for keeps its own."""
    found = (machine if machine is not None else platform.machine()).lower()
    return ARCHES.get(found, found)


def parse_arch(value: object) -> str:
    """``value`` (``x86_64``/``amd64``, ``aarch64``/``arm64``, or None for this
    machine's, as is "") as the name vmlease records; InvalidSpec names the choices."""
    if value is None or value == "":
        return host_arch()
    if isinstance(value, str):
        known = ARCHES.get(value.strip().lower())
        if known is not None:
            return known
        if value == host_arch():
            return value
    raise InvalidSpec(f"arch must be one of {', '.join(ARCHES)}, not {value!r}")


def debian_arch(arch: str) -> str:
    """Debian's name for ``arch`` (``amd64``, ``arm64``), as dpkg and OrbStack use it."""
    return _DEBIAN_ARCHES.get(arch, arch)


#: A private network's name: short, so that it fits in paths and interface names.
NETWORK_NAME = re.compile(r"[a-z][a-z0-9-]{0,14}")
#: The most private networks one VM joins.
MAX_NETWORKS = 4
#: A name other VMs resolve: one DNS label, lower case.
ALIAS_RULE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_networks(value: object) -> tuple[str, ...]:
    """The private networks a spec names, checked; InvalidSpec for a bad one."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidSpec(f"networks must be a list of network names, not {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name):
            raise InvalidSpec(
                f"{name!r} cannot name a network: use at most 15 lower-case letters, digits "
                "and '-', starting with a letter"
            )
    if len(set(names)) != len(names):
        raise InvalidSpec(f"networks names a network twice: {list(names)}")
    if len(names) > MAX_NETWORKS:
        raise InvalidSpec(f"a VM joins at most {MAX_NETWORKS} networks, not {len(names)}")
    return names


@dataclass(frozen=True, slots=True)
class VMSpec:
    """A VM request.

    Attributes:
        image: image name: one of the catalog's (``ubuntu-22.04``, the same on every
            backend; ``ubuntu:22.04`` is read as it), ``tiny``, or a name the
            backend knows (an imported image, an OrbStack or Multipass image).
        cpus: virtual CPUs.
        memory_mb: memory in MiB.
        network: ``user``, ``none`` or ``restricted`` (:class:`Network`); None
            for the image's own default (``user`` for full distributions,
            ``none`` for tiny).
        disk_gb: the root disk's size in GiB, at least the image's; the root
            file system grows to fill it when the VM first starts. None keeps
            the image's size.
        user: the guest user ``vm.ssh`` logs in as, who gets vmlease's key; None
            for the image's (root on Debian, the import's ``--user`` on an
            imported image). The user must exist in the image.
        arch: the guest's machine architecture: ``x86_64`` (or ``amd64``),
            ``aarch64`` (or ``arm64``); left out (or "") for this machine's.
            Recorded by the kernel's name (``aarch64``).
        networks: the private networks the VM joins, by the names the test gives
            them (``["lan"]``): each is a second interface on a segment the VMs
            of the session that name it share, beside the VM's own ``network``.
        alias: a name the other VMs on its networks resolve it by, besides its
            VM name (``server``): one DNS label, unique on each of its networks.
    """

    image: str = "tiny"
    cpus: int = 1
    memory_mb: int = 256
    network: Network | None = None
    disk_gb: int | None = None
    user: str | None = None
    arch: str = ""
    networks: tuple[str, ...] = ()
    alias: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image.strip():
            raise InvalidSpec(f"image must be a non-empty string, not {self.image!r}")
        # The seeds' and OrbStack's spelling (``ubuntu:22.04``) is the catalog's name.
        object.__setattr__(self, "image", canonical(self.image))
        _positive_int("cpus", self.cpus, MAX_CPUS)
        _positive_int("memory_mb", self.memory_mb, MAX_MEMORY_MB)
        object.__setattr__(self, "network", parse_network(self.network))
        object.__setattr__(self, "arch", parse_arch(self.arch))
        object.__setattr__(self, "networks", parse_networks(self.networks))
        if self.disk_gb is not None:
            _positive_int("disk_gb", self.disk_gb, MAX_DISK_GB)
        if self.alias is not None:
            if not isinstance(self.alias, str) or not ALIAS_RULE.fullmatch(self.alias):
                raise InvalidSpec(
                    "alias must be a host name (lower-case letters, digits and '-', at "
                    f"most 63, not starting or ending with '-'), not {self.alias!r}"
                )
            if not self.networks:
                raise InvalidSpec(
                    f"alias {self.alias!r} names the VM on its private networks: give "
                    "networks=[...] too"
                )
        if self.user is not None and (
            not isinstance(self.user, str) or not USER_RULE.fullmatch(self.user)
        ):
            raise InvalidSpec(
                f"user must be a user name (lower-case letters, digits, '_' and '-', "
                f"starting with a letter or '_', at most 32 characters), not {self.user!r}"
            )

    def asking(self, asked: Mapping[str, object]) -> VMSpec:
        """This spec with what a request ``asked`` for (a marker's, a factory's
        keyword arguments); a value of None keeps this spec's. InvalidSpec names
        a field the spec does not have, or a value it refuses."""
        unknown = sorted(set(asked) - spec_fields())
        if unknown:
            raise InvalidSpec(
                f"a VM has no {', '.join(unknown)}; it takes {', '.join(sorted(spec_fields()))}"
            )
        changes: dict[str, Any] = {k: v for k, v in asked.items() if v is not None}
        return replace(self, **changes)

    @classmethod
    def of(cls, **values: Any) -> VMSpec:
        """A spec from values as a person gives them (a network by its word)."""
        return cls().asking(values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VMSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def spec_fields() -> frozenset[str]:
    """The names a VM request may use: the fields of :class:`VMSpec`."""
    return frozenset(f.name for f in fields(VMSpec))
