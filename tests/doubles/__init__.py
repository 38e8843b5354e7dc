"""Test doubles, all in one place: none of them is shipped to users.

- ``fakes``: hand-written recording fakes of a ``Backend``, for unit tests of
  policy (``FakeBackend``, ``SnapshottingFake``, ``SharedFake``);
- ``orbctl``, ``multipass`` (with ``_engine``): command-line doubles of the
  real tools, each machine a real vmlease QEMU VM, for the contract suite;
- ``tools``: putting those command-line doubles on PATH for a test
  (the ``double`` and ``doubles_bin`` fixtures).
"""
