"""Issue 7, defects 3 and 5, and supervised background work: input a client may send never
takes a shard down, and a failing background loop gives its shard up instead of vanishing.

3. For a wallet that may go negative, holds skipped the funds check, so the held amount
   passed int64; the journal took it and the Cassandra row writer then died on it.
5. A CreateHold retried after its key's retention re-derived the same hold id and tripped
   "hold created twice", which stopped the shard (and the router's resends made it flap).
"""

from __future__ import annotations

import asyncio

from ledger.core import constants as C
from ledger.core.model import CreateHold, ExpireIdempotency, Post
from ledger.core.shard import ShardState
from ledger.core.status import Status


def hold(key: str, wallet: str, amount: int, timeout_ms: int = 600_000) -> CreateHold:
    return CreateHold("t", key, "h-" + key, wallet, amount, "CNY", timeout_ms, 1_000)


async def test_holds_past_int64_are_refused_and_the_shard_serves_on(ledger):
    owner = await ledger.start(0)
    await ledger.wallet(0, "neg", allow_negative=True)
    first = await owner.submit(hold("h1", "neg", C.AMOUNT_MINOR_MAX))
    assert first.ok, first
    second = await owner.submit(hold("h2", "neg", 1))
    assert second.status is Status.BALANCE_OVERFLOW and second.field == "amount_minor", second
    debit = await owner.submit(Post("t", "p", "t-p", "TRANSFER", "neg", "x", 1, "CNY", "", 5,
                                    1_000))
    assert debit.status is Status.BALANCE_OVERFLOW, debit
    assert owner.serving and not ledger.stopped
    wallet = owner.state.wallets["neg"]
    assert wallet.held_minor == C.AMOUNT_MINOR_MAX
    assert wallet.balance_minor - wallet.held_minor >= C.BALANCE_MINOR_MIN
    owner.state.check()


async def test_a_hold_retried_after_its_key_expired_is_answered_not_created_twice(ledger):
    owner = await ledger.start(0)
    await ledger.wallet(0, "a", balance=1_000)
    created = await owner.submit(hold("k", "a", 100))
    assert created.ok
    # The key's retention ends while the hold (which may last days) is still open.
    assert (await owner.submit(ExpireIdempotency(10**12))).ok
    assert ("t", "k") not in owner.state.idempotency and "h-k" in owner.state.holds
    again = await owner.submit(hold("k", "a", 100))
    assert again.ok and again.replayed and again.value.hold_id == "h-k", again
    other = await owner.submit(hold("k", "a", 200))
    assert other.status is Status.IDEMPOTENCY_KEY_REUSED and other.field == "amount_minor"
    assert owner.serving and not ledger.stopped
    assert owner.state.wallets["a"].held_minor == 100


async def test_a_failing_background_loop_gives_the_shard_up(ledger, caplog, monkeypatch):
    owner = await ledger.start(0)
    stopped = asyncio.Event()
    previous = owner._on_stopped

    async def on_stopped(shard, epoch, reason):
        await previous(shard, epoch, reason)
        stopped.set()

    owner._on_stopped = on_stopped

    def sweep_bug(self, now_ms):  # a bug in one of the periodic duties
        raise TypeError("sweep bug")

    monkeypatch.setattr(ShardState, "expired_holds", sweep_bug)
    # The sweep runs once a second; the bound is generous for a busy machine.
    await asyncio.wait_for(stopped.wait(), 30)
    assert not owner.serving
    assert ledger.stopped and "sweep failed" in ledger.stopped[0][1]
    assert any("sweep failed" in r.getMessage() for r in caplog.records)
