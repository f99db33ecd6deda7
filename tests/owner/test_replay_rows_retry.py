"""A takeover whose row writes time out a few times still serves; one that keeps failing gives
up with StoreUnavailable (bounded), never hangs.

Why: seen in drills at load, a new owner replayed the journal, its row writes timed out against
a just-restarted region, the takeover failed, the shard was released, and the next owner failed
the same way: the shard passed between nodes without serving for 20 s and more.
"""

from __future__ import annotations

import pytest

from ledger import constants as K
from ledger.owner import ShardOwner
from ledger.store.port import StoreUnavailable
from tests.owner.conftest import Ledger
from tests.owner.memstore import MemStore


class FlakyRows(MemStore):
    def __init__(self) -> None:
        super().__init__()
        self.row_failures_left = 0
        self.row_calls = 0

    async def write_rows(self, shard: int, rows, *args, **kwargs) -> None:
        self.row_calls += 1
        if self.row_failures_left:
            self.row_failures_left -= 1
            raise StoreUnavailable("WriteTimeout (test)")
        await super().write_rows(shard, rows, *args, **kwargs)


async def _journal_with_rows() -> Ledger:
    led = Ledger()
    led.store = FlakyRows()
    await led.start(0)
    await led.wallet(0, "a", balance=500)
    await led.close()
    led.peers.owners.clear()
    return led


async def test_takeover_retries_row_writes_then_serves():
    led = await _journal_with_rows()
    led.store.row_failures_left = 2
    owner = await led.start(0, epoch=2)
    assert owner.serving
    assert led.store.row_calls == 3
    assert owner.state.wallets["a"].balance_minor == 500
    await led.close()


async def test_takeover_gives_up_after_the_bound():
    led = await _journal_with_rows()
    led.store.row_failures_left = K.REPLAY_ROW_WRITE_ATTEMPTS_MAX
    owner = ShardOwner(0, 2, led.store, led.peers, clock_ms=lambda: led.now)
    with pytest.raises(StoreUnavailable):
        await owner.start()
    assert led.store.row_calls == K.REPLAY_ROW_WRITE_ATTEMPTS_MAX
    assert not owner.serving
