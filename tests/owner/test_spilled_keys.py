"""Idempotency records that left owner memory (issue 9, item 3): a real ``ShardOwner`` spills
key records and their transfers older than its memory window (journaled), keeps only the
keys' filter bits, and still answers every retry from the store's key rows: the recorded
outcome for the same request, a refusal naming the field for another one. A store that cannot
answer the lookup gets the batch UNAVAILABLE, never a second execution.
"""

from __future__ import annotations

from ledger.core.ids import transfer_id_for
from ledger.core.model import ClaimKey, Post, SpillIdempotency
from ledger.core.outcomes import UNAVAILABLE
from ledger.core.shard import transfer_fingerprint
from ledger.core.status import Status
from ledger.store.port import StoreUnavailable
from tests.owner.conftest import Ledger


def post(key: str, src: str = "a", dst: str = "b", amount: int = 5, now: int = 1_000,
         transfer_id: str | None = None) -> Post:
    """A transfer on shard 0 with the id the coordinator derives from its key (its record is
    then found again through the transfer row), or with ``transfer_id``."""
    return Post("c", key, transfer_id or transfer_id_for(0, "c", key), "TRANSFER", src, dst,
                amount, "CNY", "", 0, now)


async def started(now: int = 1_000) -> tuple[Ledger, object]:
    ledger = Ledger(shards=1)
    ledger.now = now
    owner = await ledger.start(0)
    await ledger.wallet(0, "a", 1_000)
    await ledger.wallet(0, "b")
    return ledger, owner


async def test_a_spilled_key_is_answered_from_the_store_with_its_recorded_outcome():
    ledger, owner = await started()
    first = await owner.submit(post("k1"))
    assert first.ok and not first.replayed
    spilled = await owner.submit(SpillIdempotency(2_000))
    assert spilled.ok
    # Memory holds neither the record nor the transfer any more; the filters hold the key.
    assert ("c", "k1") not in owner.state.idempotency
    assert first.value.transfer_id not in owner.state.transfers
    assert owner.state.spilled.maybe("c", "k1")
    again = await owner.submit(post("k1"))
    assert again.ok and again.replayed and again.value.transfer_id == first.value.transfer_id
    assert ledger.balances()["a"] == 995  # executed once
    reused = await owner.submit(post("k1", amount=6))
    assert reused.status is Status.IDEMPOTENCY_KEY_REUSED and reused.field == "amount_minor"
    assert ledger.balances()["a"] == 995
    await ledger.close()


async def test_a_transfer_whose_id_does_not_derive_from_its_key_keeps_a_key_row():
    ledger, owner = await started()
    odd = post("k2", transfer_id="t0000" + "9" * 24)
    assert (await owner.submit(odd)).ok
    assert (await owner.submit(SpillIdempotency(2_000))).ok
    assert ("c", "k2") not in owner.state.idempotency
    assert (await owner.submit(odd)).replayed
    assert ledger.balances()["a"] == 995
    await ledger.close()


async def test_a_spilled_claim_still_refuses_another_payload():
    ledger, owner = await started()
    fp = transfer_fingerprint("TRANSFER", "x", "y", 5, "CNY", "")
    assert (await owner.submit(ClaimKey("c", "k9", fp, "t-x", 1_000))).ok
    assert (await owner.submit(SpillIdempotency(2_000))).ok
    assert ("c", "k9") not in owner.state.claims
    other = transfer_fingerprint("TRANSFER", "x", "y", 6, "CNY", "")
    refused = await owner.submit(ClaimKey("c", "k9", other, "t-x", 1_000))
    assert refused.status is Status.IDEMPOTENCY_KEY_REUSED and refused.field == "amount_minor"
    # A Post decided here with that key honours the claim made for another shard's request.
    assert (await owner.submit(post("k9"))).status is Status.IDEMPOTENCY_KEY_REUSED
    await ledger.close()


async def test_no_key_is_decided_while_its_record_cannot_be_read():
    ledger, owner = await started()
    assert (await owner.submit(post("k1"))).ok
    assert (await owner.submit(SpillIdempotency(2_000))).ok

    async def down(shard, keys):
        raise StoreUnavailable("test: key rows unreadable")
    read = ledger.store.load_keys
    ledger.store.load_keys = down
    answer = await owner.submit(post("k1"))
    assert answer == UNAVAILABLE and ledger.balances()["a"] == 995
    ledger.store.load_keys = read
    assert (await owner.submit(post("k1"))).replayed
    assert ledger.balances()["a"] == 995
    await ledger.close()


async def test_spilling_is_replayed_and_the_filters_survive_a_takeover():
    ledger, owner = await started()
    assert (await owner.submit(post("k1"))).ok
    assert (await owner.submit(SpillIdempotency(2_000))).ok
    await owner.stop()
    again = await ledger.start(0, epoch=2)
    assert ("c", "k1") not in again.state.idempotency and again.state.spilled.maybe("c", "k1")
    assert (await again.submit(post("k1"))).replayed
    assert ledger.balances()["a"] == 995
    await ledger.close()


async def test_memory_stays_flat_while_keys_are_spilled():
    """Records in memory are bounded by the window, not by how long the owner runs."""
    ledger, owner = await started()
    held = []
    for round_ in range(5):
        now = 10_000 * (round_ + 1)
        for i in range(200):
            assert (await owner.submit(post(f"r{round_}-{i}", amount=1, now=now))).ok
        assert (await owner.submit(SpillIdempotency(now))).ok  # everything older than now
        held.append(len(owner.state.idempotency) + len(owner.state.transfers))
    # This round's 200 records and 200 transfers (and the deposits'), the same every round.
    assert held == [held[0]] * 5 and held[0] <= 2 * 200 + 4
    assert len(owner.state.spilled) == 4 * 200 + 1  # four rounds and the deposit
    await ledger.close()
