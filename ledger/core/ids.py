"""Ids derived from idempotency keys: every retry of a request names the same object."""

from __future__ import annotations

import functools
from hashlib import blake2b

# Recent ids kept (~200 bytes each): the coordinator derives a transfer's id, and the debit
# shard derives it again when it records the key (``ledger.core.shard._derived``), moments
# apart. The second hash was ~10% of a hot envelope's grab step (py-spy).
TRANSFER_IDS_CACHED = 1 << 16


@functools.lru_cache(maxsize=TRANSFER_IDS_CACHED)
def transfer_id_for(debit_shard: int, caller: str, idempotency_key: str,
                    prefix: str = "t") -> str:
    """Transfer (and hold) ids are derived from the key, so every retry names the same
    transfer, and carry the debit shard, where the transfer's decision is kept (and where a
    spilled key's record is found again: ``ledger.core.spilled``). A pure function, so its
    recent answers are cached."""
    digest = blake2b(f"{caller}\x00{idempotency_key}".encode(), digest_size=12).hexdigest()
    return f"{prefix}{debit_shard:04x}{digest}"


def envelope_id_for(caller: str, idempotency_key: str) -> str:
    """An envelope's id, from the key that created it: "e" and 24 hex digits. Its shard is
    the one its escrow wallet hashes to (``ledger.core.model.escrow_wallet_id``)."""
    digest = blake2b(f"{caller}\x00{idempotency_key}".encode(), digest_size=12).hexdigest()
    return "e" + digest


def grab_key(envelope_id: str, idempotency_key: str) -> str:
    """A grab's key as its envelope's shard records it: the caller's key, scoped to the
    envelope (a space cannot occur in a caller's key, so no other request's key collides)."""
    return f"{envelope_id} {idempotency_key}"


def refund_key(envelope_id: str) -> str:
    """The key the expiry refund of an envelope is recorded under (one per envelope)."""
    return f"{envelope_id} refund"
