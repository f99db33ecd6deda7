"""Failpoints: named places where a test or drill can make this process die (SIGKILL itself).

Armed by the environment: ``LEDGER_FAILPOINT=<name>`` (optionally ``<name>@<n>`` to die on
the n-th hit). Unset, ``hit()`` costs one dictionary lookup. Names in use:

* ``coordinator.after_reserve``  credit reserved, transfer not yet posted
* ``coordinator.after_post``     transfer committed on the debit shard, answer not yet sent
* ``coordinator.after_prepare``  linked chain prepared, not yet decided
* ``coordinator.after_decide``   linked chain decided, items not yet finished
* ``owner.before_append``        batch decided in memory, journal append not yet made
* ``owner.after_append``         batch journaled, answers not yet released
* ``owner.after_deliver``        credit applied on the credit shard, ack not yet journaled
"""

from __future__ import annotations

import os
import signal
import sys

_ARMED: dict[str, int] = {}


def _load() -> None:
    spec = os.environ.get("LEDGER_FAILPOINT", "")
    for part in filter(None, spec.split(",")):
        name, _, count = part.partition("@")
        _ARMED[name] = int(count or 1)


def hit(name: str) -> None:
    """Die here (SIGKILL, no cleanup, like a crash) if ``name`` is armed and its count is up."""
    left = _ARMED.get(name)
    if left is None:
        return
    if left > 1:
        _ARMED[name] = left - 1
        return
    sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


_load()
