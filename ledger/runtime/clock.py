"""The clock: wall time in milliseconds for stamps, and the port through which it is given.

Commands are stamped with wall time (``now_ms`` fields, compared with hold and idempotency
expiries, which outlive a process). Deadlines are points on the event loop's monotonic clock
(``asyncio.AbstractEventLoop.time``), never on this one, so a wall clock set back or forward
does not stretch or cut a caller's deadline.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall time in milliseconds since the epoch; simulations pass a virtual one."""

    def __call__(self) -> int:
        """The current time (ms). May go backwards if the system clock is set back."""
        ...


def now_ms() -> int:
    """Wall time in milliseconds since the epoch (the default ``Clock``)."""
    return time.time_ns() // 1_000_000
