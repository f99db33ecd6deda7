"""The SQLite store's writer thread is supervised: if it dies on a bug, the call it was running
and every later call fail with ``StoreUnavailable`` (and the failure is logged) instead of
waiting forever for a thread that is gone.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from ledger.store import sqlite as sqlite_store
from ledger.store.port import StoreUnavailable
from ledger.store.sqlite import SqliteStore

# No call may take this long once the writer is gone (s).
NO_HANG_S = 10.0


class WriterBug(BaseException):
    """Escapes the per-call ``except Exception`` of the writer, as a bug in it would."""


async def test_a_dead_writer_fails_calls_instead_of_hanging(tmp_path, monkeypatch, caplog):
    store = await SqliteStore.open(tmp_path / "ledger.db")
    try:
        assert await store.fence(1, 1) == 0

        def broken(*_args):
            raise WriterBug("injected")

        monkeypatch.setattr(sqlite_store, "_append", broken)
        with caplog.at_level(logging.CRITICAL, logger="ledger.store.sqlite"):
            with pytest.raises(StoreUnavailable, match="writer thread stopped: WriterBug"):
                await asyncio.wait_for(store.append(1, 1, 1, b"x", []), NO_HANG_S)
        assert any("the SQLite writer thread stopped" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(StoreUnavailable, match="writer thread stopped"):
            await asyncio.wait_for(store.journal_position(1), NO_HANG_S)
    finally:
        await asyncio.wait_for(store.close(), NO_HANG_S)
