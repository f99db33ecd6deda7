"""Failpoints: named places where a test or drill can make this process fail on purpose.

Armed by the environment: ``LEDGER_FAILPOINT=<name>[@<n>][,...]``: the n-th hit (default the
first) of ``<name>`` acts. Unset, a hit costs one dictionary lookup. Two kinds of places:

Crash points (``hit``): the process SIGKILLs itself, no cleanup, like a crash.

* ``coordinator.after_reserve``  credit reserved, transfer not yet posted
* ``coordinator.after_post``     transfer committed on the debit shard, answer not yet sent
* ``coordinator.after_prepare``  linked chain prepared, not yet decided
* ``coordinator.after_decide``   linked chain decided, items not yet finished
* ``owner.before_append``        batch decided in memory, journal append not yet made
* ``owner.after_append``         batch journaled, answers not yet released
* ``owner.after_deliver``        credit applied on the credit shard, ack not yet journaled

Fault points (``fault``): the process lives on and the store call fails, as a real store
does while everything else keeps running. The n-th hit and every later one until
``<n>+<k>`` (``<name>@<n>+<k>``, default one hit) act.

* ``owner.append_unavailable``   the journal append fails before writing (StoreUnavailable)
* ``owner.append_unknown``       the journal append is written, then reported as an unknown
                                 outcome (UnknownOutcome), as after an unresolved CAS timeout
* ``store.snapshot_before_marker``  a snapshot's parts are written, its completion mark is
                                 not (StoreUnavailable): the previous snapshot stays in force
* ``store.rows_behind``          SQLite: the transaction writing the rows behind the journal
                                 fails; every store call fails until they are written
"""

from __future__ import annotations

import os
import signal
import sys

# name -> [hits left before acting, hits that act]
_ARMED: dict[str, list[int]] = {}


def _load() -> None:
    _ARMED.clear()
    spec = os.environ.get("LEDGER_FAILPOINT", "")
    for part in filter(None, spec.split(",")):
        name, _, count = part.partition("@")
        first, _, extra = count.partition("+")
        _ARMED[name] = [int(first or 1), 1 + int(extra or 0)]


def arm(spec: str) -> None:
    """Arm failpoints in this process (tests), with the syntax of ``LEDGER_FAILPOINT``."""
    os.environ["LEDGER_FAILPOINT"] = spec
    _load()


def disarm() -> None:
    os.environ.pop("LEDGER_FAILPOINT", None)
    _ARMED.clear()


def _due(name: str) -> bool:
    state = _ARMED.get(name)
    if state is None:
        return False
    if state[0] > 1:
        state[0] -= 1
        return False
    state[1] -= 1
    if state[1] <= 0:
        del _ARMED[name]
    return True


def hit(name: str) -> None:
    """Die here (SIGKILL, no cleanup, like a crash) if ``name`` is armed and its count is up."""
    if not _ARMED or not _due(name):
        return
    sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault(name: str) -> bool:
    """True if the fault point ``name`` should fail now (the caller raises its own error)."""
    if not _ARMED or not _due(name):
        return False
    sys.stderr.write(f"failpoint {name}: injecting a fault in process {os.getpid()}\n")
    sys.stderr.flush()
    return True


_load()
