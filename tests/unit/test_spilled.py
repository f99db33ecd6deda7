"""The filters of spilled idempotency keys (``ledger.core.spilled``): no false negatives,
few false positives, buckets expire with retention, and they are a deterministic function of
what was spilled (a replay and a snapshot hold the live owner's bits)."""

from __future__ import annotations

from ledger.core import codec
from ledger.core.shard import ShardState
from ledger.core.spilled import BUCKET_MS, FALSE_POSITIVE_RATE, SpilledKeys


def filled(n: int, start_ms: int = 0, step_ms: int = 1) -> SpilledKeys:
    keys = SpilledKeys()
    for i in range(n):
        keys.add("c", f"k{i}", start_ms + i * step_ms)
    return keys


def test_every_spilled_key_is_found_and_few_others_are():
    keys = filled(20_000, step_ms=500)  # spans several buckets, chains filters past capacity
    assert all(keys.maybe("c", f"k{i}") for i in range(20_000))
    false = sum(keys.maybe("c", f"new{i}") for i in range(20_000))
    # Each bucket answers "maybe" for about FALSE_POSITIVE_RATE of new keys.
    buckets = len({r[0] for r in keys.records() if r[0] != "last_count"})
    assert false <= 20_000 * FALSE_POSITIVE_RATE * buckets * 1.5
    assert not SpilledKeys().maybe("c", "k0")


def test_buckets_past_retention_are_dropped():
    keys = SpilledKeys()
    keys.add("c", "old", 10)
    keys.add("c", "new", BUCKET_MS + 10)
    assert keys.expirable(BUCKET_MS) and not keys.expirable(BUCKET_MS - 1)
    keys.expire(BUCKET_MS)
    assert keys.maybe("c", "new") and len(keys) == 1


def test_the_same_spills_give_the_same_bits_and_a_snapshot_keeps_them():
    assert filled(5_000).records() == filled(5_000).records()
    state = ShardState(3)
    state.spilled = filled(5_000)
    loaded = codec.snapshot_loads(codec.snapshot_dumps(state))
    assert loaded.spilled == state.spilled and loaded.spilled.maybe("c", "k4999")
