"""vmlease's pytest plugin: options, hooks and fixtures. The work is done in
``vmlease._testrun``; this module only connects it to pytest.

Fixtures: ``vm`` (a clean VM per test), ``worker_vm`` (one per worker, state
shared), ``vm_factory`` and ``vm_pool`` (VMs made inside a test, deleted at
its end), ``vm_session`` (the run's Session). Marker:
``@pytest.mark.vm(image=..., cpus=..., memory_mb=..., network=..., disk_gb=..., user=...,
fresh=False)``.

Settings, strongest first: the command line (``--vm-backend``), the
environment (``VMLEASE_BACKEND``), the ini file (``vm_backend``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from vmlease._errors import ConfigError
from vmlease._naming import new_session_id
from vmlease._options import Keep, RunOptions
from vmlease._spec import VMSpec, spec_fields

if TYPE_CHECKING:
    # The machinery that makes VMs loads when a test first asks for one, so a
    # run without VMs pays almost nothing for the plugin.
    from vmlease._lan import PrivateNetwork
    from vmlease._session import Session
    from vmlease._testrun import TestRun, Use
    from vmlease._vm import VM

_OPTIONS = pytest.StashKey[RunOptions]()
_RUN = pytest.StashKey["TestRun"]()
_USES = pytest.StashKey[list["Use"]]()
_FAILED = pytest.StashKey[bool]()
_SUMMARY = pytest.StashKey[dict[str, Any]]()

#: option name -> (environment variable, help)
_SETTINGS = {
    "vm_backend": ("VMLEASE_BACKEND", "backend for VMs (default: qemu)"),
    "vm_image": ("VMLEASE_IMAGE", "image VMs get unless a test asks for another (default: tiny)"),
    "vm_network": (
        "VMLEASE_NETWORK",
        "network VMs get unless a test asks for another: user, none or restricted "
        "(default: the image's)",
    ),
    "vm_arch": (
        "VMLEASE_ARCH",
        "architecture of VMs unless a test asks for another: x86_64 (amd64) or "
        "aarch64 (arm64) (default: this machine's)",
    ),
    "vm_keep": (
        "VMLEASE_KEEP",
        "keep VMs for inspection: never (default), failed (those of failed tests), always",
    ),
    "vm_libvirt_uris": (
        "VMLEASE_LIBVIRT_URIS",
        "with --vm-backend=libvirt: the hosts' libvirt URIs, comma-separated "
        "(default: qemu:///system)",
    ),
    "vm_max": ("VMLEASE_MAX", "at most N VMs at once across all workers"),
    "vm_max_age": ("VMLEASE_MAX_AGE", "seconds a VM may live before cleanup may delete it"),
    "vm_retry": (
        "VMLEASE_RETRY",
        "how transient backend failures are retried, and time limits per operation: "
        "attempts=5,total_s=600,create_s=300,start_s=120,delete_s=60,waits=on",
    ),
    "vm_faults": (
        "VMLEASE_FAULTS",
        "inject transient backend failures and hangs, to test the suite's resilience: "
        "failure_rate=0.3,hang_rate=0.05,hang_s=1,seed=7 (see vmlease.testing)",
    ),
}
_MARKER_ARGS = spec_fields() | {"fresh"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmlease", "disposable VMs (vmlease)")
    for name, (env, text) in _SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        group.addoption(flag, dest=name, default=None, help=f"{text} [env {env}, ini {name}]")
        parser.addini(name, text, default=None)
    group.addoption(
        "--vm-report",
        dest="vm_report",
        default=None,
        metavar="PATH",
        help="write the run's VM figures (counts, seconds per operation) to PATH as JSON",
    )


def _setting(config: pytest.Config, name: str) -> str | None:
    value: str | None = config.getoption(name)
    if value is None:
        value = os.environ.get(_SETTINGS[name][0]) or None
    if value is None:
        ini = config.getini(name)
        value = ini if isinstance(ini, str) and ini else None
    return value


def _number(config: pytest.Config, name: str, kind: Callable[[str], Any]) -> Any:
    value = _setting(config, name)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise pytest.UsageError(
            f"{flag} (or {_SETTINGS[name][0]}) must be a number, not {value!r}"
        ) from None


def _backend_options(config: pytest.Config) -> dict[str, str]:
    """What the run's backend is made with. The libvirt backend reads
    ``$VMLEASE_LIBVIRT_URIS`` itself; the flag and the ini setting are passed on."""
    uris = config.getoption("vm_libvirt_uris") or config.getini("vm_libvirt_uris")
    return {"uris": uris} if isinstance(uris, str) and uris else {}


def _options(config: pytest.Config) -> RunOptions:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        session_id = workerinput.get("vmlease_session_id") or (
            "r" + str(workerinput["testrunuid"])[:11]
        )
        worker = str(workerinput["workerid"])
    else:
        session_id, worker = new_session_id(), ""
    try:
        return RunOptions(
            backend=_setting(config, "vm_backend") or "qemu",
            spec=VMSpec.of(
                image=_setting(config, "vm_image"),
                network=_setting(config, "vm_network"),
                arch=_setting(config, "vm_arch"),
            ),
            keep=Keep.parse(_setting(config, "vm_keep") or "never"),
            max_vms=_number(config, "vm_max", int),
            max_age_s=_number(config, "vm_max_age", float),
            faults=_setting(config, "vm_faults"),
            backend_options=_backend_options(config),
            retry=_setting(config, "vm_retry"),
            session_id=session_id,
            worker=worker,
        )
    except ConfigError as exc:
        raise pytest.UsageError(f"vmlease: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"vm({', '.join(f'{f}=None' for f in sorted(spec_fields()))}, fresh=False): the VM "
        "the `vm` fixture gives this test (network: user, none or restricted; user: who "
        "vm.ssh logs in as); fresh=True for a new VM of its own",
    )
    config.stash[_OPTIONS] = _options(config)
    config.stash[_SUMMARY] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker joins the controller's session."""
    node.workerinput["vmlease_session_id"] = node.config.stash[_OPTIONS].session_id


def _run(request: pytest.FixtureRequest) -> TestRun:
    """This process's TestRun, made when a test first asks for a VM."""
    config = request.config
    run = config.stash.get(_RUN, None)
    if run is None:
        from vmlease._testrun import TestRun

        run = config.stash[_RUN] = TestRun(config.stash[_OPTIONS])
    return run


def _track(request: pytest.FixtureRequest, uses: list[Use]) -> None:
    request.node.stash.setdefault(_USES, []).extend(uses)


def _finish(request: pytest.FixtureRequest, uses: list[Use]) -> None:
    _run(request).finish(uses, failed=request.node.stash.get(_FAILED, False))


def _marker_spec(request: pytest.FixtureRequest) -> tuple[dict[str, Any], bool]:
    marker = request.node.get_closest_marker("vm")
    if marker is None:
        return {}, False
    if marker.args:
        raise pytest.UsageError("@pytest.mark.vm takes keyword arguments only")
    unknown = set(marker.kwargs) - _MARKER_ARGS
    if unknown:
        raise pytest.UsageError(
            f"@pytest.mark.vm does not know {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(_MARKER_ARGS))}"
        )
    kwargs = dict(marker.kwargs)
    fresh = bool(kwargs.pop("fresh", False))
    return kwargs, fresh


@pytest.fixture(scope="session")
def vm_session(request: pytest.FixtureRequest) -> Session:
    """The run's vmlease Session (shared by the fixtures of this worker)."""
    return _run(request).session


@pytest.fixture
def vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    """A clean VM for this test: the worker's VM restored to its clean snapshot,
    or with ``@pytest.mark.vm(fresh=True)`` (or a backend without snapshots) a new one.

    Parametrized indirectly, each parameter is a dict of spec fields laid over the
    marker's: ``@pytest.mark.parametrize("vm", [{"arch": "amd64"}, {"arch": "arm64"}],
    indirect=True)`` runs the test on both."""
    run = _run(request)
    kwargs, fresh = _marker_spec(request)
    param = getattr(request, "param", {})
    if not isinstance(param, dict):
        raise pytest.UsageError(
            f"a parameter of the vm fixture is a dict of spec fields, not {param!r}: "
            'parametrize("vm", [{"arch": "arm64"}], indirect=True)'
        )
    spec = run.spec({**kwargs, **param})
    use = run.fresh_vm(spec) if fresh else run.clean_vm(spec)
    _track(request, [use])
    yield use.vm
    _finish(request, [use])


@pytest.fixture
def worker_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    """This worker's VM for the whole run; what a test leaves in it, the next one finds."""
    run = _run(request)
    use = run.worker_vm(run.spec())
    _track(request, [use])
    yield use.vm
    _finish(request, [use])


@pytest.fixture
def vm_host(vm: VM) -> Any:
    """A testinfra ``Host`` for this test's ``vm``, over vmlease's channel (no SSH)."""
    from vmlease._testinfra import as_testinfra_host

    return as_testinfra_host(vm)


@pytest.fixture
def vm_network(vm_session: Session) -> Iterator[Callable[[str], PrivateNetwork]]:
    """``vm_network("lan")``: the run's private network ``lan``, which VMs join with
    ``networks=["lan"]`` (the marker's, ``vm_factory``'s), known there by their names
    and ``alias=``; partition, heal, impair.
    Whatever the test did to it is undone at its end (its VMs' links stay as they are)."""
    asked: dict[str, PrivateNetwork] = {}

    def network(name: str) -> PrivateNetwork:
        return asked.setdefault(name, vm_session.network(name))

    yield network
    for lan in asked.values():
        if lan.vms:
            lan.clear()


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """``vm_factory(image=..., cpus=..., memory_mb=..., network=..., disk_gb=..., user=...,
    arch=..., networks=[...], alias=...)`` makes a VM; all are deleted at the end."""
    run = _run(request)
    uses: list[Use] = []

    def make(**asked: Any) -> VM:
        use = run.fresh_vm(run.spec(asked))
        uses.append(use)
        _track(request, [use])
        return use.vm

    yield make
    _finish(request, uses)


@pytest.fixture
def vm_pool(request: pytest.FixtureRequest) -> Iterator[Callable[..., list[VM]]]:
    """``vm_pool(n, image=...)`` makes n VMs at once; all are deleted at the end."""
    run = _run(request)
    uses: list[Use] = []

    def make(n: int, **asked: Any) -> list[VM]:
        made = run.pool(n, run.spec(asked))
        uses.extend(made)
        _track(request, made)
        return [u.vm for u in made]

    yield make
    _finish(request, uses)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        item.stash[_FAILED] = True
        uses = item.stash.get(_USES, [])
        if uses:
            run = item.config.stash[_RUN]
            run.mark_kept_on_failure(uses)
            for title, text in run.report(uses):
                report.sections.append((title, text))
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture is torn down: delete this process's VMs."""
    config = session.config
    run = config.stash.get(_RUN, None)
    if run is None:
        return  # no test asked for a VM
    figures = run.close()
    workeroutput: dict[str, Any] | None = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["vmlease"] = figures
    else:
        _merge(config.stash[_SUMMARY], figures)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: add up what each worker reports."""
    figures = getattr(node, "workeroutput", {}).get("vmlease")
    if figures:
        _merge(node.config.stash[_SUMMARY], figures)


def _merge(into: dict[str, Any], figures: dict[str, Any]) -> None:
    for key, value in figures.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        elif isinstance(value, dict):
            counts = into.setdefault(key, {})
            for k, n in value.items():
                # durations are the longest seen; counts add up
                counts[k] = max(counts.get(k, 0), n) if key.endswith("_s") else counts.get(k, 0) + n
        elif value is not None:
            into.setdefault("sessions", set()).add(value)


class _TerminalProgress(logging.Handler):
    """vmlease's long waits (a first boot of an image) as lines on the terminal."""

    def __init__(self, reporter: Any) -> None:
        super().__init__(logging.INFO)
        self._reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self._reporter.write_line(f"vmlease: {record.getMessage()}")


_PROGRESS = pytest.StashKey[_TerminalProgress]()


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """On a terminal, show long waits as they start; in CI logs (no terminal), stay quiet."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not reporter.isatty or hasattr(config, "workerinput"):
        return
    handler = _TerminalProgress(reporter)
    logger = logging.getLogger("vmlease.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    config.stash[_PROGRESS] = handler


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = config.stash.get(_PROGRESS, None)
    if handler is not None:
        logging.getLogger("vmlease.progress").removeHandler(handler)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    summary = config.stash.get(_SUMMARY, {})
    if not summary.get("created"):
        return
    tests_s = sum(
        getattr(report, "duration", 0.0)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
    )
    write = terminalreporter.write_line
    terminalreporter.section("vmlease")
    write(
        f"VMs: {summary.get('created', 0)} created, {summary.get('reused', 0)} reused, "
        f"{summary.get('restored', 0)} restored, {summary.get('deleted', 0)} deleted, "
        f"{len(summary.get('kept', []))} kept"
    )
    restored = summary.get("restored", 0)
    if restored:
        by_start = summary.get("reset_by_start", 0)
        write(
            f"resets: {by_start} by a new start from the mapped booted state, "
            f"{restored - by_start} by restoring a snapshot"
        )
    retries = summary.get("retries", {})
    if retries or summary.get("faults"):
        by_op = ", ".join(f"{op} {n}" for op, n in sorted(retries.items()))
        write(
            f"retries: {sum(retries.values())} after transient failures"
            + (f" ({by_op})" if by_op else "")
            + (f"; {summary['faults']} faults injected" if summary.get("faults") else "")
            + (f"; {summary['adopted']} VMs adopted" if summary.get("adopted") else "")
        )
    write(
        f"time: {summary.get('boot_s', 0.0):.1f} s starting VMs, "
        f"{summary.get('restore_s', 0.0):.1f} s snapshotting and resetting, "
        f"{tests_s:.1f} s in tests"
    )
    report_path = config.getoption("vm_report")
    if report_path:
        figures = {k: v for k, v in summary.items() if k != "sessions"}
        figures["tests_s"] = tests_s
        figures["sessions"] = sorted(summary.get("sessions", set()))
        with open(report_path, "w") as f:  # noqa: PTH123 - a path string from the command line
            json.dump(figures, f, indent=2)
    kept = summary.get("kept", [])
    if kept:
        write(f"kept for inspection: {', '.join(kept)}")
        write(
            "  reach one with `vmlease exec NAME -- sh -c '...'`; "
            "remove them with `vmlease cleanup`"
        )
    from vmlease._testrun import left_behind

    left = left_behind(config.stash[_OPTIONS], summary.get("sessions", set()))
    if left:
        write(f"LEFT BEHIND: {', '.join(left)} (vmlease cleanup --all removes them)", red=True)
    else:
        write("nothing left behind: no VM of this run is still running", green=True)
