"""What ``vmlease doctor --backend libvirt`` checks: the binding, and each host's
driver, KVM and room."""

from __future__ import annotations

from typing import Any

from vmlease._checks import Check, Severity
from vmlease._errors import BackendUnavailable
from vmlease._paths import megabytes
from vmlease.backends.libvirt._domains import version, words
from vmlease.backends.libvirt._hosts import Host, Hosts, libvirt_module

__all__ = ["preflight"]


def preflight(hosts: Hosts, *, kvm: bool, cheap: bool = False) -> list[Check]:
    """The checks of ``vmlease doctor --backend libvirt``: the binding, then each host."""
    try:
        libvirt = libvirt_module()
    except BackendUnavailable as exc:
        return [Check("libvirt: binding", Severity.FAIL, str(exc), BackendUnavailable)]
    checks = [
        Check(
            "libvirt: binding",
            Severity.OK,
            f"libvirt-python for libvirt {version(libvirt.getVersion())}",
        )
    ]
    if cheap:
        return checks
    answering = 0
    for host in hosts.hosts:
        try:
            conn = hosts.connect(host)
        except BackendUnavailable as exc:
            checks.append(
                Check(f"libvirt: {host.uri}", Severity.FAIL, str(exc), BackendUnavailable)
            )
            continue
        answering += 1
        checks.extend(_host_checks(hosts, host, conn, kvm))
    if len(hosts.hosts) > 1 and answering:
        checks.append(
            Check(
                "libvirt: hosts",
                Severity.OK if answering == len(hosts.hosts) else Severity.WARN,
                f"{answering} of {len(hosts.hosts)} hosts answer; VMs go to those",
            )
        )
    return checks


def _host_checks(hosts: Hosts, host: Host, conn: Any, kvm: bool) -> list[Check]:
    label = f"libvirt: {host.uri}"
    driver = str(conn.getType())
    checks = [
        Check(
            label,
            Severity.OK if driver == "QEMU" else Severity.FAIL,
            f"reachable; {driver} driver, libvirt {version(conn.getLibVersion())}, "
            f"hypervisor {version(conn.getVersion())}"
            + ("" if driver == "QEMU" else ": vmlease needs the QEMU driver"),
            BackendUnavailable,
        )
    ]
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        offered = "KVM is offered"
        if not kvm:
            offered += "; set VMLEASE_LIBVIRT_ACCEL=kvm to use it (guests run under TCG now)"
        checks.append(Check(f"{label} kvm", Severity.OK, offered))
    except Exception:
        checks.append(
            Check(
                f"{label} kvm",
                Severity.FAIL if kvm else Severity.WARN,
                "no KVM on this host; guests run under software emulation (TCG)",
            )
        )
    try:
        _free, pool_free = hosts.room(host)
        checks.append(
            Check(
                f"{label} room",
                Severity.OK if pool_free > 2**30 else Severity.WARN,
                f"{megabytes(int(conn.getFreeMemory()))} memory free; pool "
                f"{hosts.pool_name} has {megabytes(pool_free)} free",
            )
        )
    except Exception as exc:
        checks.append(
            Check(
                f"{label} room",
                Severity.FAIL,
                f"cannot use storage pool {hosts.pool_name}: {words(exc)}",
            )
        )
    return checks
