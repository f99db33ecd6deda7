"""Background tasks that cannot vanish.

``asyncio.create_task`` keeps only a weak reference to its task, and an exception of a task
nobody awaits is reported (if at all) when the task is garbage collected. Every background
task of the ledger is started with ``spawn``: the task is kept until it ends, and a failure
is logged with its name and handed to ``on_error`` (which may, e.g., give a shard up).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Coroutine

log = logging.getLogger("ledger.tasks")

_LIVE: set[asyncio.Task] = set()


def spawn(coro: Coroutine, name: str,
          on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
    """Start ``coro`` as a task named ``name``; log its failure and call ``on_error``."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _LIVE.add(task)

    def done(t: asyncio.Task) -> None:
        _LIVE.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            return
        log.error("background task %s failed: %r", name, exc, exc_info=exc)
        if on_error is not None:
            try:
                on_error(exc)
            except Exception:
                log.exception("error handler of task %s failed", name)

    task.add_done_callback(done)
    return task


def live() -> int:
    """How many spawned tasks are still running (for tests and metrics)."""
    return len(_LIVE)
