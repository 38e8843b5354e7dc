"""The contract every backend keeps, run against each one.

QEMU runs for real. OrbStack and Multipass run against command-line doubles
of ``orbctl`` and ``multipass`` (tests/doubles/): these prove that the
backends drive the documented commands, read the documented output and
classify the documented messages, and that commands and copies really reach
a guest (each double machine is a QEMU VM). They cannot prove that the real
tools behave as documented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlease
from tests.doubles.tools import TOOLS, Double
from tests.support.ledger import dead_owner
from tests.support.libvirtd import destroy_domain, foreign_domain
from tests.support.suites import EVERY_FIXTURE
from vmlease import backends
from vmlease._checks import Severity
from vmlease._cleanup import cleanup
from vmlease._doctor import doctor
from vmlease._errors import BackendError, BackendTimeout, GuestFileError
from vmlease._inventory import inventory
from vmlease._ledger import Ledger, VMState
from vmlease._retry import RetryPolicy
from vmlease._spec import VMSpec
from vmlease.backends import Backend
from vmlease.backends.guest.images import Image
from vmlease.backends.libvirt import LibvirtBackend
from vmlease.backends.multipass import MultipassBackend
from vmlease.backends.qemu import QemuBackend

pytestmark = pytest.mark.timeout(300)

KINDS = ["qemu", "libvirt", "orbstack", "multipass"]
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "libvirt":
        request.getfixturevalue("libvirt_uri")
    elif request.param != "qemu":
        request.getfixturevalue("double")
    return str(request.param)


@pytest.fixture
def backend(kind: str, state: Path) -> Iterator[Backend]:
    made = backends.get(kind, state_dir=state)
    yield made
    for vm in made.list():
        if vm.name.startswith("contract-"):
            made.delete(vm.name)
    made.close()


def states(backend: Backend) -> dict[str, str]:
    return {vm.name: vm.state for vm in backend.list()}


def run(backend: Backend, name: str, argv: list[str], **kw: object) -> backends.ExecResult:
    options: dict[str, object] = {"stdin": None, "env": None, "cwd": None, "timeout_s": 60.0}
    options.update(kw)
    return backend.exec(name, argv, **options)  # type: ignore[arg-type]


def test_lifecycle(backend: Backend) -> None:
    name = "contract-life"
    backend.check_spec(VMSpec())
    backend.create(name, VMSpec())
    backend.wait_ready(name, 60.0)
    assert states(backend)[name] == "running"
    with pytest.raises(vmlease.VMAlreadyExists):
        backend.create(name, VMSpec())

    if backend.capabilities.stop_start:
        run(backend, name, ["sh", "-c", "echo kept > /root/kept; sync"])
        backend.stop(name, 60.0)
        assert states(backend)[name] == "stopped"
        backend.start(name)
        backend.wait_ready(name, 60.0)
        assert run(backend, name, ["cat", "/root/kept"]).stdout == b"kept\n"
    else:
        with pytest.raises(vmlease.UnsupportedOperation):
            backend.stop(name, 60.0)

    backend.delete(name)
    assert name not in states(backend)
    with pytest.raises(vmlease.VMNotFound):
        backend.delete(name)


def test_exec_passes_exit_codes_output_stdin_env_and_cwd(backend: Backend) -> None:
    name = "contract-exec"
    backend.create(name, VMSpec())
    backend.wait_ready(name, 60.0)

    done = run(backend, name, ["sh", "-c", r"printf '\000\377'; echo err >&2; exit 3"])
    assert (done.exit_code, done.stdout, done.stderr) == (3, b"\x00\xff", b"err\n")
    data = bytes(range(256)) * 64
    assert run(backend, name, ["cat"], stdin=data).stdout == data
    done = run(
        backend,
        name,
        ["sh", "-c", 'echo "$GREETING"; pwd'],
        env={"GREETING": "hi there"},
        cwd="/tmp",
    )
    assert done.stdout == b"hi there\n/tmp\n"
    # A root login's environment under the one given: dpkg, for one, needs PATH.
    path = run(backend, name, ["sh", "-c", 'echo "$PATH"'], env={"X": "1"}).stdout.decode()
    assert {"/usr/sbin", "/usr/bin", "/bin"} <= set(path.strip().split(":"))
    assert run(backend, name, ["no-such-command"]).exit_code == 127
    # 255 is also what ssh exits with when the connection fails; a command's own 255 stays.
    assert run(backend, name, ["sh", "-c", "exit 255"]).exit_code == 255


def test_copies_are_binary_safe_and_keep_the_mode(backend: Backend, tmp_path: Path) -> None:
    name = "contract-copy"
    backend.create(name, VMSpec())
    backend.wait_ready(name, 60.0)
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 1024 + os.urandom(100_000))
    blob.chmod(0o640)
    backend.put(name, blob, "/root/blob")
    assert run(backend, name, ["stat", "-c", "%a", "/root/blob"]).stdout == b"640\n"
    back = tmp_path / "back"
    backend.get(name, "/root/blob", back)
    assert back.read_bytes() == blob.read_bytes()
    with pytest.raises(GuestFileError):
        backend.get(name, "/root/missing", tmp_path / "missing")


class HangOnce(QemuBackend):
    """A QEMU backend whose first create makes the VM and then times out."""

    hung = False

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        super().create(name, spec, timeout_s=timeout_s)
        if not HangOnce.hung:
            HangOnce.hung = True
            raise BackendTimeout(f"creating {name} took too long (injected)")


class HangOnceLibvirt(LibvirtBackend):
    """The same on libvirt: the domain exists, the create reports a timeout."""

    def create(self, name: str, spec: VMSpec, *, timeout_s: float = 300.0) -> None:
        super().create(name, spec, timeout_s=timeout_s)
        if not HangOnce.hung:
            HangOnce.hung = True
            raise BackendTimeout(f"creating {name} took too long (injected)")


def test_a_create_that_hangs_after_making_the_vm_is_adopted(
    kind: str, state: Path, request: pytest.FixtureRequest
) -> None:
    HangOnce.hung = False
    if kind == "qemu":
        made: Backend = HangOnce(state_dir=state)
    elif kind == "libvirt":
        made = HangOnceLibvirt(state_dir=state)
    else:
        tool = TOOLS[kind]
        command = "create" if kind == "orbstack" else "launch"
        request.getfixturevalue("double").inject(tool, command, after=True, hang_s=120)
        made = backends.get(kind, state_dir=state)
    retry = RetryPolicy.parse("create_s=15,waits=off")
    with vmlease.Session(backend=made, state_dir=state, retry=retry) as session:
        vm = session.create()
        assert vm.run(["echo", "adopted"]).stdout == "adopted\n"
        assert session.stats().adopted == 1
        name = vm.name
    assert name not in states(made)


def test_cleanup_never_touches_instances_that_are_not_in_the_ledger(
    kind: str, backend: Backend, state: Path, request: pytest.FixtureRequest
) -> None:
    # Someone's own machine, and one whose name merely looks like ours.
    foreign = ["contract-dev-box", "vmlease-zzzzzzzzzz-1"]
    for name in foreign:
        make_foreign(kind, backend, name, request)
    with vmlease.Session(backend=backend, state_dir=state) as session:
        session.create().run(["true"])
    cleanup(state, everything=True, confirm=lambda rows: True, known={kind: backend})
    left = states(backend)
    assert all(name in left for name in foreign)
    for name in foreign:
        delete_foreign(kind, backend, name, request)
    if kind == "orbstack":
        stops = request.getfixturevalue("double").calls("orbctl")
        assert all(call[1:] for call in stops if call[0] == "stop"), "a bare `orbctl stop`"


def make_foreign(kind: str, backend: Backend, name: str, request: pytest.FixtureRequest) -> None:
    """A machine of the user's own, made without vmlease (on libvirt: a domain
    without vmlease's metadata; the doubles and QEMU cannot tell the difference)."""
    if kind == "libvirt":
        image: Image = request.getfixturevalue("tiny_image")
        uri = request.getfixturevalue("libvirt_uri")
        foreign_domain(uri, name, image.kernel, image.initrd)
    else:
        backend.create(name, VMSpec())


def delete_foreign(kind: str, backend: Backend, name: str, request: pytest.FixtureRequest) -> None:
    if kind == "libvirt":
        with pytest.raises(vmlease.VMNotFound, match="not one vmlease made"):
            backend.delete(name)  # never touched, even when asked by name
        destroy_domain(request.getfixturevalue("libvirt_uri"), name)
    else:
        backend.delete(name)


# -- ownership where the user's machines share the namespace -----------------

SHARED = ["orbstack", "multipass"]  # QEMU's VMs live in vmlease's own directory


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest, state: Path) -> Iterator[Backend]:
    request.getfixturevalue("double")
    made = backends.get(request.param, state_dir=state)
    yield made
    made.close()


def test_cleanup_leaves_machines_the_user_put_in_place_of_ours(
    shared: Backend, state: Path
) -> None:
    with vmlease.Session(backend=shared, state_dir=state) as session:
        named = session.create(name="contract-db")
        generated = session.create()
        untouched = session.create(name="contract-web")
        for vm in (named, generated, untouched):
            vm.keep("left for this test")
    marks = [row.as_dict()["mark"] for row in inventory(state)]
    assert len(marks) == 3
    assert all(marks), "every VM on a shared namespace is marked when made"
    # The user deletes two of them and makes machines of their own with those names.
    replaced = [named.name, generated.name]
    for name in replaced:
        shared.delete(name)
        shared.create(name, VMSpec())
    outcomes = {o.name: o for o in cleanup(state, known={shared.name: shared})}
    assert {name: o.action for name, o in outcomes.items()} == {
        named.name: "not ours",
        generated.name: "not ours",
        "contract-web": "deleted",
    }
    assert "is not the VM vmlease made" in (outcomes[named.name].error or "")
    assert sorted(states(shared)) == sorted(replaced)
    assert cleanup(state, known={shared.name: shared}) == []  # their rows are closed
    for name in replaced:
        shared.delete(name)


def test_a_machine_whose_owner_died_before_marking_it_is_judged_by_its_name(
    shared: Backend, state: Path
) -> None:
    # The owner wrote its rows and died while asking for the machines. The one
    # with a chosen name may be the user's (which made the create fail): left.
    # The one with a generated name cannot be anyone else's: deleted.
    owner = dead_owner()
    generated = f"vmlease-{owner.session_id}-1"
    ledger = Ledger(state / "ledger.sqlite3")
    for name in ("contract-db", generated):
        shared.create(name, VMSpec())
        row = ledger.claim(name=name, backend=shared.name, owner=owner, spec=VMSpec().to_json())
        ledger.transition(row.id, VMState.CREATING)
    ledger.close()
    outcomes = {o.name: o for o in cleanup(state, known={shared.name: shared})}
    assert outcomes[generated].action == "deleted"
    assert outcomes["contract-db"].action == "unconfirmed"
    assert "no mark was recorded" in (outcomes["contract-db"].error or "")
    assert list(states(shared)) == ["contract-db"]
    # The user decides: deleted by hand, the row is forgotten at the next cleanup.
    shared.delete("contract-db")
    [again] = cleanup(state, known={shared.name: shared})
    assert (again.name, again.action) == ("contract-db", "already gone")


def test_stopped_machines_are_judged_by_what_can_be_read(shared: Backend, state: Path) -> None:
    with vmlease.Session(backend=shared, state_dir=state) as session:
        named = session.create(name="contract-db")
        generated = session.create()
        for vm in (named, generated):
            vm.stop()
            vm.keep("left for this test")
    outcomes = {o.name: o.action for o in cleanup(state, known={shared.name: shared})}
    # OrbStack reports a stopped machine's id; a stopped Multipass instance
    # cannot be asked for its mark, and a chosen name proves nothing.
    named_action = "deleted" if shared.name == "orbstack" else "unconfirmed"
    assert outcomes == {named.name: named_action, generated.name: "deleted"}
    if named_action == "unconfirmed":
        shared.start(named.name)
        shared.wait_ready(named.name, 60.0)
        assert [o.action for o in cleanup(state, known={shared.name: shared})] == ["deleted"]
    assert states(shared) == {}


def test_multipass_never_purges_the_users_deleted_instances(double: Double, state: Path) -> None:
    backend = MultipassBackend(state_dir=state)
    backend.create("old-work", VMSpec())
    backend.call(["delete", "old-work"], timeout_s=60)  # recoverable, the user's
    with vmlease.Session(backend=backend, state_dir=state) as session:
        session.create().run(["true"])
    cleanup(state, everything=True, confirm=lambda rows: True, known={"multipass": backend})
    assert states(backend)["old-work"] == "deleted"
    calls = double.calls("multipass")
    assert not [c for c in calls if c[0] == "purge"]
    assert all("--purge" in c for c in calls if c[0] == "delete" and "old-work" not in c)


def test_an_ssh_failure_under_multipass_exec_is_a_transient_channel_error(
    double: Double, state: Path
) -> None:
    backend = backends.get("multipass", state_dir=state)
    backend.create("contract-ssh", VMSpec())
    backend.wait_ready("contract-ssh", 60.0)
    # The command and the probe that follows both fail the way ssh does.
    double.inject(
        "multipass", "exec", times=2, exit=255, stderr="ssh connection failed: 'No route to host'"
    )
    with pytest.raises(vmlease.ChannelError) as info:
        run(backend, "contract-ssh", ["true"])
    assert info.value.transient
    backend.delete("contract-ssh")


def _errors(kind: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads((DATA / kind / "errors.json").read_text())
    return rows


@pytest.mark.parametrize(
    ("kind_name", "case"),
    [(k, c) for k in ("orbstack", "multipass") for c in _errors(k)],
    ids=lambda v: v if isinstance(v, str) else str(v["source"])[:40],
)
def test_recorded_failures_are_classified_through_the_tool(
    double: Double, state: Path, kind_name: str, case: dict[str, object]
) -> None:
    backend = backends.get(kind_name, state_dir=state)
    double.inject(TOOLS[kind_name], "list", exit=case["exit"], stderr=case["stderr"])
    with pytest.raises(BackendError) as info:
        backend.list()
    assert type(info.value).__name__ == case["error"]
    assert backend.classify(info.value).value == ("transient" if case["transient"] else "permanent")


@pytest.mark.parametrize("kind_name", ["orbstack", "multipass"])
def test_every_fixture_works_on_the_backend(
    double: Double,
    state: Path,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tiny_image: Image,
    kind_name: str,
) -> None:
    monkeypatch.setenv("VMLEASE_STATE_DIR", str(state))
    monkeypatch.setenv("VMLEASE_IMAGE_DIR", str(tiny_image.path.parent.parent))
    for name in ("VMLEASE_KEEP", "VMLEASE_IMAGE", "VMLEASE_BACKEND", "VMLEASE_MAX", "VMLEASE_ARCH"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(EVERY_FIXTURE.replace("BACKEND", kind_name))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--vm-backend={kind_name}", timeout=240
    )
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*nothing left behind*"])
    assert double.machines() == {}


@pytest.mark.parametrize("kind_name", ["orbstack", "multipass"])
def test_doctor_checks_the_tool_and_its_daemon(
    double: Double, state: Path, monkeypatch: pytest.MonkeyPatch, kind_name: str
) -> None:
    tool = TOOLS[kind_name]
    by_name = {c.name: c for c in doctor(state, kind_name)}
    assert by_name[f"{kind_name}: {tool}"].status is Severity.OK
    assert by_name[f"{kind_name}: daemon"].status is Severity.OK

    down = {
        "orbstack": "OrbStack is not running; start it with orbctl start",
        "multipass": "list failed: cannot connect to the multipass socket",
    }[kind_name]
    double.inject(tool, "list", times=10, stderr=down)
    daemon = {c.name: c for c in doctor(state, kind_name)}[f"{kind_name}: daemon"]
    assert daemon.status is Severity.FAIL
    start = "orbctl start" if kind_name == "orbstack" else "snap start multipass"
    assert start in daemon.message

    monkeypatch.setenv("PATH", "/nonexistent")
    missing = {c.name: c for c in doctor(state, kind_name)}[f"{kind_name}: {tool}"]
    assert missing.status is Severity.FAIL
    assert f"{tool} not found" in missing.message
    assert ("orbstack.dev" if kind_name == "orbstack" else "snap install multipass") in (
        missing.message
    )
