from __future__ import annotations

import pickle

import pytest

import vmlease


def _exported(name: str) -> object:
    try:
        return getattr(vmlease, name)
    except ImportError:  # an integration whose tool is not installed (pyinfra's connector)
        return None


def _exported_errors() -> list[type[BaseException]]:
    return [
        obj
        for name in vmlease.__all__
        if isinstance(obj := _exported(name), type) and issubclass(obj, BaseException)
    ]


def test_every_exported_error_derives_from_the_root() -> None:
    errors = [e for e in _exported_errors() if e is not vmlease.Terminated]
    assert len(errors) >= 20
    for error in errors:
        assert issubclass(error, vmlease.VMLeaseError), error


def test_terminated_unwinds_like_ctrl_c_and_is_not_an_error() -> None:
    assert issubclass(vmlease.Terminated, KeyboardInterrupt)
    assert not issubclass(vmlease.Terminated, vmlease.VMLeaseError)


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (vmlease.ConfigError, ValueError),
        (vmlease.InvalidSpec, ValueError),
        (vmlease.ImageNotFound, LookupError),
        (vmlease.VMNotFound, LookupError),
        (vmlease.CommandTimeout, TimeoutError),
        (vmlease.ChannelError, ConnectionError),
        (vmlease.GuestFileError, OSError),
        (vmlease.UnsupportedOperation, NotImplementedError),
    ],
)
def test_errors_also_are_the_matching_builtin(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, builtin)


def test_the_tree_in_the_docstring_names_every_error() -> None:
    doc = vmlease._errors.__doc__ or ""
    for error in _exported_errors():
        assert error.__name__ in doc, error


def test_backend_error_keeps_command_exit_code_and_stderr() -> None:
    exc = vmlease.BackendError("failed", command=["qemu-img", "x"], exit_code=1, stderr="boom")
    assert (exc.command, exc.exit_code, exc.stderr) == (["qemu-img", "x"], 1, "boom")


def _example(error: type[BaseException]) -> BaseException:
    """An instance of ``error`` with every attribute set, as vmlease raises it."""
    if error is vmlease.CommandFailed:
        return error(vm="vm-1", argv=["sh", "-c", "exit 3"], exit_code=3, stdout="o", stderr="e")
    if error is vmlease.CommandTimeout:
        return error(vm="vm-1", argv=["sleep", "9"], timeout_s=1.5, stdout="o", stderr="e")
    if issubclass(error, vmlease.BackendError):
        return error(
            "failed", command=["qemu-img", "x"], exit_code=1, stderr="boom", transient=True
        )
    return error("it went wrong; do this instead")


@pytest.mark.parametrize("error", _exported_errors(), ids=lambda e: e.__name__)
def test_every_public_error_survives_pickling(error: type[BaseException]) -> None:
    # pytest-xdist sends errors from workers to the controller by pickling them.
    original = _example(error)
    original.add_note("attempt 3 of 5")
    copy = pickle.loads(pickle.dumps(original))  # noqa: S301 - our own bytes
    assert type(copy) is error
    assert str(copy) == str(original)
    assert copy.__notes__ == ["attempt 3 of 5"]
    attributes = {k: v for k, v in vars(original).items() if k != "__notes__"}
    assert {k: getattr(copy, k) for k in attributes} == attributes
