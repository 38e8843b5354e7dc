"""A VM's interfaces on its private networks, and its names for the other VMs
on them, set in its guest.

An agent of protocol 4 does it in one exchange (NET) without starting a
process: after a start from a saved state, or a reset, each program a guest
runs is new to TCG's translation cache and costs tens of milliseconds, so
the shell that an older agent (an image imported earlier) is given instead
uses its builtins and one ``ip`` only.

A link's interface is the VM's Nth Ethernet interface by ifindex, other than
the user-mode one (QEMU's default MAC): the private networks' NICs follow
it in the order the spec names the networks. It gets its own MAC and
address, whatever a saved state left there, and no IPv6: its link-local
address, made from the MAC of the VM that saved a state, would be the same in
every VM started from that state. A network's names are a block
of ``/etc/hosts`` between ``# vmlease network NAME`` and ``... end``, replaced
whole; an agent of protocol 4 appends it where the file has none yet (after a
start from a saved state, or a reset), which costs less under TCG than a new
file renamed into place.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vmlease._errors import ChannelError
from vmlease.backends.guest._agent import NET, AgentChannel

__all__ = ["NET_SINCE", "LanLink", "LanNames", "pack", "set_lans"]

#: The first agent protocol that understands NET.
NET_SINCE = 4
#: The user-mode interface's MAC (QEMU's default), which is never a private one.
USER_MAC = "52:54:00:12:34:56"


@dataclass(frozen=True, slots=True)
class LanLink:
    """The interface on a VM's ``index``-th private network: ``mac`` and
    ``address`` (``192.168.100.10/24``; None: no IPv4 address)."""

    index: int
    mac: str
    address: str | None


@dataclass(frozen=True, slots=True)
class LanNames:
    """Network ``tag``'s names: ``lines`` of ``ADDRESS NAME``."""

    tag: str
    lines: str


def set_lans(
    channel: AgentChannel,
    links: Sequence[LanLink],
    names: Sequence[LanNames],
    deadline: float,
    vm: str,
) -> None:
    """Set ``links`` and ``names`` in VM ``vm``'s guest through ``channel``;
    ChannelError naming the VM if the guest cannot."""
    if not links and not names:
        return
    left = max(1.0, deadline - time.monotonic())
    try:
        if channel.protocol >= NET_SINCE:
            channel.request(NET, pack(links, names), left, what="setting its private networks")
        else:
            _by_shell(channel, links, names, left)
    except ChannelError as exc:
        raise ChannelError(f"VM {vm}: setting up its private network failed: {exc}") from exc


def pack(links: Sequence[LanLink], names: Sequence[LanNames]) -> bytes:
    """NET's payload (see ``images/agent.c``)."""
    out = bytearray(struct.pack(">I", len(links)))
    for link in links:
        interface = ipaddress.IPv4Interface(link.address or "0.0.0.0/0")
        out += struct.pack(">I", link.index)
        out += bytes.fromhex(link.mac.replace(":", ""))
        out += interface.ip.packed + bytes([interface.network.prefixlen])
    out += struct.pack(">I", len(names))
    for block in names:
        tag, lines = block.tag.encode(), block.lines.encode()
        out += struct.pack(">I", len(tag)) + tag + struct.pack(">I", len(lines)) + lines
    return bytes(out)


#: Sets the interface on the VM's ``$index``-th private network, with the shell's
#: builtins and one ``ip``.
_LINK = f"""found=
for d in /sys/class/net/*; do
  name=${{d##*/}}; [ "$name" = lo ] && continue
  read -r a < "$d/address"; [ "$a" = {USER_MAC} ] && continue
  read -r t < "$d/type"; [ "$t" = 1 ] || continue
  read -r i < "$d/ifindex"; found="$found $i:$name"
done
n=0 dev=
while [ $n -le "$index" ]; do
  low=
  for e in $found; do
    i=${{e%%:*}}
    if [ -z "$low" ] || [ "$i" -lt "${{low%%:*}}" ]; then low=$e; fi
  done
  [ -n "$low" ] || {{ echo "no interface for private network $index" >&2; exit 1; }}
  dev=${{low#*:}} rest=
  for e in $found; do [ "$e" = "$low" ] || rest="$rest $e"; done
  found=$rest n=$((n + 1))
done
echo 1 > "/proc/sys/net/ipv6/conf/$dev/disable_ipv6"
set_addr="addr flush dev $dev scope global"
[ -z "$addr" ] || set_addr="addr replace $addr dev $dev"
printf 'link set dev %s address %s up\\n%s\\n' "$dev" "$mac" "$set_addr" | ip -batch -
"""
#: Replaces network ``$tag``'s block of names in ``$hosts``, with the shell's builtins.
NAMES_SCRIPT = """begin="# vmlease network $tag" end="# vmlease network $tag end"
kept= skip=
if [ -e "$hosts" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    [ "$line" = "$begin" ] && skip=1
    [ -z "$skip" ] && kept="$kept$line
"
    [ "$line" = "$end" ] && skip=
  done < "$hosts"
else
  kept="127.0.0.1 localhost
::1 localhost
"
fi
printf '%s%s\\n%s\\n%s\\n' "$kept" "$begin" "$lines" "$end" > "$hosts.vmlease"
mv -f "$hosts.vmlease" "$hosts"
"""


def _by_shell(
    channel: AgentChannel, links: Sequence[LanLink], names: Sequence[LanNames], timeout_s: float
) -> None:
    """What NET does, by a shell in the guest (an agent older than protocol 4)."""
    script = ["set -e", "hosts=/etc/hosts"]
    args: list[str] = []
    for link in links:
        first = len(args) + 1
        script.append(f"index=${{{first}}} mac=${{{first + 1}}} addr=${{{first + 2}}}\n{_LINK}")
        args += [str(link.index), link.mac, link.address or ""]
    for block in names:
        first = len(args) + 1
        script.append(f"tag=${{{first}}} lines=${{{first + 1}}}\n{NAMES_SCRIPT}")
        args += [block.tag, block.lines]
    done = channel.exec(
        ["sh", "-c", "\n".join(script), "sh", *args],
        stdin=None,
        env=None,
        cwd=None,
        timeout_s=timeout_s,
    )
    if done.exit_code != 0:
        said = (done.stdout + done.stderr).decode(errors="replace").strip()[-500:]
        raise ChannelError(said or f"the set-up shell exited {done.exit_code}")
