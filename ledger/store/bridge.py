"""Handing results from a store's threads to asyncio futures (shared by the adapters)."""

from __future__ import annotations

import asyncio
from typing import Any


def settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    """Complete ``future`` on its event loop, unless its awaiter was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
