"""Stable hash from wallet id to virtual shard.

BLAKE2b is used because it is stable across processes, platforms and Python versions (unlike
``hash()``, which is salted per process) and spreads similar ids evenly. The number of
virtual shards is fixed for the life of a ledger; moving load means moving whole shards
between owners, never rehashing wallets.
"""

from hashlib import blake2b

DEFAULT_SHARD_COUNT = 256


def shard_of(wallet_id: str, shard_count: int = DEFAULT_SHARD_COUNT) -> int:
    digest = blake2b(wallet_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count
