"""Shard routing: the stable wallet -> shard hash, the shard map, and shard ownership.

``hashing`` is pure. ``ownership`` defines the port; ``local`` is the in-process adapter of
``ledgerd dev``; ``etcd`` keeps the map and elects owners in etcd.
"""

from shard_router.hashing import DEFAULT_SHARD_COUNT, shard_of

__all__ = ["DEFAULT_SHARD_COUNT", "shard_of"]
