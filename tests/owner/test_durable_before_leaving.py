"""Issue 7, defect 1: nothing leaves a shard owner before its journal holds it durably.

A batch is decided on the live state before its journal append returns. If the crediting
pipeline sent a credit from that window and the append then failed ("not written"), the
credit was applied on the receiver, the owner reloaded, and the next transfer got the same
outbox sequence: the receiver dropped it as a duplicate while the sender answered OK (seen:
debited 15 + 70, credited 15: one credit out of nothing, one real credit lost).
"""

from __future__ import annotations

from ledger.core.model import Post
from ledger.store.port import StoreUnavailable
from tests.owner.memstore import settle


def transfer(key: str, amount: int, src: str = "a", dst: str = "c", to_shard: int = 1) -> Post:
    return Post("t", key, "t-" + key, "TRANSFER", src, dst, amount, "CNY", "", to_shard, 1_000)


async def test_credit_of_a_failed_append_never_leaves_and_books_balance(ledger):
    a_owner = await ledger.start(0)
    await ledger.start(1)
    await ledger.wallet(0, "a", balance=1_000)
    await ledger.wallet(1, "c")
    # T0 commits; its credit's delivery is held at the door, so the pipeline is busy.
    delivery = ledger.peers.hold(1)
    assert (await a_owner.submit(transfer("t0", 1))).ok
    await delivery.entered.wait()
    # T1's append is held too, and will fail without writing anything.
    append = ledger.store.gate(0, a_owner.state.seq + 1, error=StoreUnavailable("timed out"))
    t1 = __import__("asyncio").ensure_future(a_owner.submit(transfer("t1", 15)))
    await append.entered.wait()
    # While T1 is only in memory, T0's delivery completes and the pipeline looks again.
    delivery.release.set()
    await settle()
    append.release.set()
    answer = await t1
    assert answer.status.name == "SHARD_UNAVAILABLE"  # not written: the client retries
    await settle()
    assert a_owner.serving  # reloaded from its journal
    # The next, unrelated transfer.
    assert (await a_owner.submit(transfer("t2", 70))).ok
    await settle()
    balances = ledger.balances()
    # c got exactly what was committed for it (T0 and T2), nothing from the unwritten T1.
    assert balances["c"] == 1 + 70, balances
    assert balances["a"] == 1_000 - 1 - 70, balances
    assert sum(balances.values()) == 0, balances
    assert not a_owner.state.outbox or all(
        s <= ledger.peers.owners[1].state.inbox_applied.get(0, 0)
        for s in a_owner.state.outbox.get(1, {}))
