"""The ownership a libvirt domain carries: vmlease's ``<metadata>`` element.

Every domain vmlease creates holds one element in vmlease's XML namespace,
written in the same call that creates the domain, so no domain of ours ever
exists without it:

.. code-block:: xml

    <vmlease:lease xmlns:vmlease="urn:vmlease:lease:1">
      <session>v3k9x2m4qa</session>
      <runner host="ci-7" pid="4242" start-time="123456" boot-id="..."/>
      <created>1764620000.0</created>
      <expires>1764620120.0</expires>
      <kept>no</kept>
      <mark>vmlease:v3k9x2m4qa:7:1f2e...</mark>
    </vmlease:lease>

A domain without it is not vmlease's, whatever its name, and nothing here
touches it. ``expires`` is the lease: a session renews it while it runs,
a kept VM has its whole lease at once, and any vmlease process that
connects to a host deletes the vmlease domains whose lease has run out.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

from vmlease._identity import Owner

__all__ = ["NAMESPACE", "PREFIX", "Lease", "parse_lease"]

#: vmlease's namespace for libvirt metadata (a URI libvirt keys the element by).
NAMESPACE = "urn:vmlease:lease:1"
#: The prefix libvirt writes the element with.
PREFIX = "vmlease"


@dataclass(frozen=True, slots=True)
class Lease:
    """Who owns a domain and until when.

    Attributes:
        session: the vmlease session that created it.
        host, pid, start_time, boot_id: the runner process that created it.
        created: when, in seconds since the epoch.
        expires: when its lease runs out; past it, any vmlease process may delete it.
        kept: left for a person (``--vm-keep``): no autodestroy, the lease decides.
        mark: the token the session recorded in its ledger ("" before it is marked).
    """

    session: str
    host: str
    pid: int
    start_time: int
    boot_id: str
    created: float
    expires: float
    kept: bool = False
    mark: str = ""

    @classmethod
    def new(cls, owner: Owner, *, lease_s: float, now: float | None = None) -> Lease:
        at = time.time() if now is None else now
        return cls(
            session=owner.session_id,
            host=owner.host,
            pid=owner.pid,
            start_time=owner.start_time,
            boot_id=owner.boot_id,
            created=at,
            expires=at + lease_s,
        )

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def renewed(self, until: float) -> Lease:
        return replace(self, expires=until)

    def to_xml(self) -> str:
        """The element's body as ``virDomainSetMetadata`` takes it (no namespace prefix)."""
        root = ET.Element("lease")
        ET.SubElement(root, "session").text = self.session
        ET.SubElement(
            root,
            "runner",
            {
                "host": self.host,
                "pid": str(self.pid),
                "start-time": str(self.start_time),
                "boot-id": self.boot_id,
            },
        )
        ET.SubElement(root, "created").text = f"{self.created:.3f}"
        ET.SubElement(root, "expires").text = f"{self.expires:.3f}"
        ET.SubElement(root, "kept").text = "yes" if self.kept else "no"
        ET.SubElement(root, "mark").text = self.mark
        return ET.tostring(root, encoding="unicode")

    def to_domain_xml(self) -> str:
        """The whole ``<metadata>`` child, namespaced, for a new domain's XML."""
        body = self.to_xml()
        return body.replace("<lease>", f'<{PREFIX}:lease xmlns:{PREFIX}="{NAMESPACE}">', 1).replace(
            "</lease>", f"</{PREFIX}:lease>"
        )


def parse_lease(text: str | None) -> Lease | None:
    """The lease in ``text`` (what ``virDomainGetMetadata`` returned), None if it is not one."""
    if not text:
        return None
    try:
        root = ET.fromstring(text)  # noqa: S314 - from the host's libvirtd
    except ET.ParseError:
        return None
    if root.tag.rsplit("}", 1)[-1] != "lease":
        return None

    def field(tag: str) -> str:
        found = root.find(tag)
        if found is None:
            found = root.find(f"{{{NAMESPACE}}}{tag}")
        return (found.text or "") if found is not None else ""

    runner = root.find("runner")
    if runner is None:
        runner = root.find(f"{{{NAMESPACE}}}runner")
    attrs = runner.attrib if runner is not None else {}
    try:
        return Lease(
            session=field("session"),
            host=attrs.get("host", ""),
            pid=int(attrs.get("pid", "0")),
            start_time=int(attrs.get("start-time", "0")),
            boot_id=attrs.get("boot-id", ""),
            created=float(field("created")),
            expires=float(field("expires")),
            kept=field("kept") == "yes",
            mark=field("mark"),
        )
    except ValueError:
        return None
