"""``coordinator.changes.ChangeFeed`` against a journal whose oldest batches were compacted
into a snapshot: a resume inside the compacted range ends with ``Compacted`` (never a silent
gap), a new consumer starts at the oldest kept batch, and nothing past the owner's durable
head is sent."""

from __future__ import annotations

import pytest

from coordinator.changes import ChangeFeed, Compacted
from ledger.core import codec
from ledger.core.model import IdempotencyExpired
from ledger.store.port import JournalBatch


class Journal:
    def __init__(self, kept_from: int, head: int) -> None:
        self.batches = [JournalBatch(s, 3, codec.dumps([IdempotencyExpired(s)]))
                        for s in range(kept_from, head + 1)]

    async def read_journal(self, shard: int, after_seq: int = 0, limit: int = 1000):
        return [b for b in self.batches if b.seq > after_seq][:limit]


class Owner:
    def __init__(self, durable_seq: int) -> None:
        self.durable_seq = durable_seq

    async def wait_appended(self, after_seq: int, timeout_s: float) -> None:
        return None


def feed(journal: Journal, durable: int) -> ChangeFeed:
    owner = Owner(durable)
    return ChangeFeed(executor=None, journal=journal, local_owner=lambda shard: owner)


async def collect(f: ChangeFeed, positions: dict[int, int]) -> list[int]:
    return [c.seq async for c in f.watch([0], positions, follow=False)]


async def test_a_resume_inside_the_compacted_range_is_refused_not_skipped():
    f = feed(Journal(kept_from=5, head=9), durable=9)
    with pytest.raises(Compacted) as err:
        await collect(f, {0: 2})
    assert (err.value.shard, err.value.after_seq, err.value.kept_from) == (0, 2, 5)
    assert "resume after 4" in str(err.value)
    assert await collect(f, {0: 4}) == [5, 6, 7, 8, 9]  # right after the snapshot: fine


async def test_a_new_consumer_starts_at_the_oldest_kept_batch():
    assert await collect(feed(Journal(kept_from=5, head=9), durable=9), {}) == [5, 6, 7, 8, 9]
    # Every batch compacted: nothing to send, and the stream ends.
    assert await collect(feed(Journal(kept_from=10, head=9), durable=9), {}) == []


async def test_nothing_past_the_durable_head_is_sent():
    # Batches 8 and 9 are in the journal (an append in flight, say) but not durable yet.
    assert await collect(feed(Journal(kept_from=1, head=9), durable=7), {0: 5}) == [6, 7]
