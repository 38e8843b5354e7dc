"""Tools for testing how a suite copes when VMs misbehave.

:class:`FlakyBackend` wraps a real backend and makes a share of its
operations fail, or hang until their time limit, the way a busy host or a
struggling daemon does. It is not a backend of its own: every VM is made by
the backend it wraps, and vmlease records it under that backend's name, so
the reaper and ``vmlease cleanup`` delete it the ordinary way.

::

    from vmlease import Session
    from vmlease.backends import get
    from vmlease.testing import FlakyBackend

    flaky = FlakyBackend(get("qemu"), failure_rate=0.3, hang_rate=0.05, seed=1)
    with Session(backend=flaky) as session:
        vm = session.create()          # retried until it works, or the policy runs out
        print(flaky.injected)          # {"create": 1, "exec": 2, ...}

With the pytest plugin: ``pytest --vm-faults=failure_rate=0.3,hang_rate=0.05,seed=1``
(or ``VMLEASE_FAULTS``).

What is injected, so that retrying is always safe:

- a *failure* is raised before the wrapped operation runs: nothing happened;
- a *hang* blocks for ``hang_s`` seconds (at most the operation's own time
  limit) and then raises :class:`~vmlease.BackendTimeout`. A hung
  ``create`` has made the VM by then, as a slow create really does, so the
  session meets "already exists" when it tries again; every other hung
  operation has not run. A command in the guest is never run by a hang.
"""

from __future__ import annotations

from vmlease.backends._flaky import FAULT_OPERATIONS, FlakyBackend, check_faults, parse_faults

__all__ = ["FAULT_OPERATIONS", "FlakyBackend", "check_faults", "parse_faults"]
