"""Transient answers that any part of the ledger gives when a shard cannot take commands now.

They are the same values whoever answers (the shard's owner, or the router that found no
owner), so a caller tells them apart by status alone and retries unchanged.
"""

from __future__ import annotations

from ledger.core.status import Status, refuse

# The shard has no serving owner right now (moving, fenced, its node down, or the caller's
# deadline passed before an owner answered). Not a guess about an outcome: nothing was
# refused, and a retry with the same idempotency key is answered from the record.
UNAVAILABLE = refuse(Status.SHARD_UNAVAILABLE, "", "the shard's owner is not serving; retry")

# The shard owner's queue is full (``ledger.constants.OWNER_QUEUE_COMMANDS_MAX``).
OVERLOADED = refuse(Status.OVERLOADED, "", "the shard's queue is full; retry with backoff")
