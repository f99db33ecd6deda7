"""Which idempotency keys of a shard left its memory for the store: Bloom filters by time.

An owner keeps the idempotency records (and the kept transfers and key claims) of the last
``idempotency memory window`` in memory; older ones are *spilled*: a journaled
``IdempotencySpilled(before_ms)`` drops them from the state, and their keys go into the
filter of the time bucket they were created in. The records themselves are rows in the store
(written with the batch that created them), so a retry with a spilled key is answered from
the store: before a step, the owner loads the records of every key the filters may hold
(``ShardState.loaded``). A key the filters do not hold was never spilled: no store read.

Memory is then flat however long the ledger runs: about 1.2 bytes per spilled key at
``FALSE_POSITIVE_RATE`` (instead of ~1.1 KiB per key for a record and its kept transfer),
and a bucket's filter is dropped once the bucket is past the retention window (the keys it
covers have expired anyway).

Deterministic: the filters are a function of the journal (the same spills in the same
order give the same bits), so a replay and a snapshot build reproduce what the live owner
holds. Keys are hashed with BLAKE2b (stable across processes, unlike ``hash``).
"""

from __future__ import annotations

import base64
from hashlib import blake2b

from rbloom import Bloom

# Fraction of never-spilled keys the filters answer "maybe" for (each costs a store read).
FALSE_POSITIVE_RATE = 0.01
# Width of a time bucket (ms): one filter chain per hour of creation times.
BUCKET_MS = 3_600_000
# Keys the first filter of a bucket is sized for when the bucket before it was empty; a
# bucket's first filter is sized for twice the keys of the bucket before it.
FILTER_CAPACITY_MIN = 4096


def key_hash(caller: str, idempotency_key: str) -> int:
    """The 128-bit signed hash rbloom indexes with, stable across processes."""
    digest = blake2b(f"{caller}\x00{idempotency_key}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "big", signed=True)


def _identity(value: int) -> int:
    return value


class _Filter:
    __slots__ = ("capacity", "count", "bloom")

    def __init__(self, capacity: int, count: int = 0, bloom: Bloom | None = None) -> None:
        self.capacity = capacity
        self.count = count
        self.bloom = bloom if bloom is not None else Bloom(capacity, FALSE_POSITIVE_RATE,
                                                           _identity)


class SpilledKeys:
    """The filters of one shard: bucket start (ms) -> filters, oldest first."""

    __slots__ = ("_buckets", "_last_count")

    def __init__(self) -> None:
        self._buckets: dict[int, list[_Filter]] = {}
        # Keys of the most recently started bucket: sizes the next bucket's first filter.
        self._last_count = 0

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpilledKeys) and self.records() == other.records()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __len__(self) -> int:
        """Keys added (a key spilled twice counts twice)."""
        return sum(f.count for chain in self._buckets.values() for f in chain)

    def add(self, caller: str, idempotency_key: str, created_at_ms: int) -> None:
        start = created_at_ms - created_at_ms % BUCKET_MS
        chain = self._buckets.get(start)
        if chain is None:
            previous = max(self._buckets) if self._buckets else None
            if previous is not None:
                self._last_count = sum(f.count for f in self._buckets[previous])
            chain = self._buckets[start] = [
                _Filter(max(FILTER_CAPACITY_MIN, 2 * self._last_count))]
        current = chain[-1]
        if current.count >= current.capacity:
            current = _Filter(2 * current.capacity)
            chain.append(current)
        current.bloom.add(key_hash(caller, idempotency_key))
        current.count += 1

    def maybe(self, caller: str, idempotency_key: str) -> bool:
        """False if the key was certainly never spilled; True if it may have been."""
        if not self._buckets:
            return False
        h = key_hash(caller, idempotency_key)
        return any(h in f.bloom for chain in self._buckets.values() for f in chain)

    def expire(self, before_ms: int) -> None:
        """Drop the buckets that end at or before ``before_ms`` (their keys have expired)."""
        for start in [s for s in self._buckets if s + BUCKET_MS <= before_ms]:
            del self._buckets[start]

    def expirable(self, before_ms: int) -> bool:
        """True if ``expire(before_ms)`` would drop a bucket."""
        return any(s + BUCKET_MS <= before_ms for s in self._buckets)

    def size_bytes(self) -> int:
        return sum(f.bloom.size_in_bits // 8 for chain in self._buckets.values()
                   for f in chain)

    # --- snapshot records ------------------------------------------------------------------

    def records(self) -> list[list]:
        """One record per filter: [bucket start, capacity, count, bits (base64)]."""
        return [[start, f.capacity, f.count, base64.b64encode(f.bloom.save_bytes()).decode()]
                for start, chain in sorted(self._buckets.items()) for f in chain] + (
            [["last_count", self._last_count]] if self._last_count else [])

    def load_records(self, records: list) -> None:
        for record in records:
            if record[0] == "last_count":
                self._last_count = record[1]
                continue
            start, capacity, count, bits = record
            bloom = Bloom.load_bytes(base64.b64decode(bits), _identity)
            self._buckets.setdefault(start, []).append(_Filter(capacity, count, bloom))
