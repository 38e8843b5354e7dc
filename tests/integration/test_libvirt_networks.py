"""Private networks on the libvirt backend: the same API as on the qemu backend,
on the session's own switches, with nothing of a network left on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmlease
from tests.integration.test_libvirt import domains, vm_volumes
from tests.integration.test_networks import partition_and_unplug, three_on_a_network
from tests.support.libvirtd import LibvirtDaemon
from vmlease import InvalidSpec
from vmlease.backends.guest.images import Image

pytestmark = pytest.mark.timeout(300)


def test_vms_on_a_libvirt_host_share_a_network_with_its_faults(
    libvirt_daemon: LibvirtDaemon, state: Path, debian_image: Image
) -> None:
    options = {"uris": [libvirt_daemon.unix_uri]}
    with vmlease.Session(backend="libvirt", state_dir=state, backend_options=options) as s:
        server, a, b = three_on_a_network(s)
        # The first VM on the host booted and was saved; the others started from it.
        assert "started from booted state" in b.console_tail(200)
        partition_and_unplug(s.network("lan"), server, a, b)
        # A restored snapshot knows the VMs that joined after it was taken.
        a.snapshot("before")
        late = s.create("debian-12", memory_mb=512, networks=["lan"], name="late")
        a.restore("before")
        assert a.run(["getent", "hosts", "late"]).exit_code == 0
        assert late.run(["getent", "hosts", "server"]).exit_code == 0
    assert domains(libvirt_daemon.unix_uri) == {}
    assert vm_volumes(libvirt_daemon) == []
    assert not list((state / "libvirt").glob(".lan-*"))  # the switches are gone


def test_a_network_on_a_remote_libvirt_host_is_refused_before_anything_is_made(
    libvirt_daemon: LibvirtDaemon, state: Path, debian_image: Image
) -> None:
    options = {"uris": [libvirt_daemon.tcp_uri]}
    with (
        vmlease.Session(backend="libvirt", state_dir=state, backend_options=options) as s,
        pytest.raises(InvalidSpec, match="this machine"),
    ):
        s.create("debian-12", memory_mb=512, networks=["lan"])
    assert domains(libvirt_daemon.unix_uri) == {}
