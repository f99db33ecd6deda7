"""Ids derived from idempotency keys: every retry of a request names the same object."""

from __future__ import annotations

from hashlib import blake2b


def transfer_id_for(debit_shard: int, caller: str, idempotency_key: str,
                    prefix: str = "t") -> str:
    """Transfer (and hold) ids are derived from the key, so every retry names the same
    transfer, and carry the debit shard, where the transfer's decision is kept (and where a
    spilled key's record is found again: ``ledger.core.spilled``)."""
    digest = blake2b(f"{caller}\x00{idempotency_key}".encode(), digest_size=12).hexdigest()
    return f"{prefix}{debit_shard:04x}{digest}"
