"""A deterministic asyncio event loop on a virtual clock.

The loop is asyncio's own ``SelectorEventLoop`` with two changes: ``time()`` returns a virtual
clock, and its selector never waits for I/O: when no callback is ready, the selector moves the
clock forward to the next timer instead of sleeping. So ``asyncio.sleep``, ``call_later``,
``wait_for`` and everything else built on loop time run unchanged, as fast as the CPU allows,
and in an order fixed by the program alone: the same program and seed give the same trace.

Work handed to the default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``)
runs inline, at once, on the loop's thread: a worker thread would finish at a moment the
program does not decide. Its result is delivered through the loop like any other callback.

What it cannot make deterministic: threads the program starts itself, real I/O, and iteration
over sets whose order depends on ``hash()`` of ``str``/``bytes`` (salted per process: set
``PYTHONHASHSEED`` to compare traces across processes) or on ``id()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors


class SimulationDeadlock(RuntimeError):
    """Every task waits for something and no timer is scheduled: nothing can ever run again."""


class _ClockSelector(selectors.SelectSelector):
    """Keeps the loop's registrations (its self-pipe) but never polls: a wait is a jump."""

    def __init__(self, loop: "VirtualClockLoop") -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise SimulationDeadlock("every task is waiting and no timer is scheduled")
        if timeout > 0:
            self._loop.advance(timeout)
        return []


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each submitted call at once, in the caller's thread: it never starts a thread.
    (A ``ThreadPoolExecutor`` only because asyncio accepts no other default executor.)"""

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)
        return future


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """``asyncio`` loop whose clock starts at 0 s and jumps to the next timer when idle.

    Use it through ``asyncio.Runner(loop_factory=VirtualClockLoop)``.
    """

    def __init__(self) -> None:
        self._now_s = 0.0
        super().__init__(_ClockSelector(self))
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        return self._now_s

    async def shutdown_default_executor(self) -> None:
        """Nothing to join: the inline executor has no threads."""

    def advance(self, seconds: float) -> None:
        """Move the clock forward (only the selector does, when nothing else can run)."""
        self._now_s += seconds
