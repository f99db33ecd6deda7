"""The request id: one id per client request, carried in the gRPC metadata
``ledger-request-id`` from the client to every node that handles the request, and put on every
log record written while serving it (``ledger.logs``).

The client library sends one id per logical call (the same on its retries); a caller that sends
none gets one made by the first node. A node puts it on its calls to other nodes
(``ledger.api.shard_service``); a call's task and the tasks it starts carry it (asyncio copies
the context into new tasks), an owner's commit loop does not (one batch serves many
requests).
"""

from __future__ import annotations

import contextvars
import uuid

METADATA_KEY = "ledger-request-id"
# Longest id taken from a caller (longer ones are cut: an id is a label, not a payload).
REQUEST_ID_CHARS_MAX = 64

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("ledger_request_id",
                                                                 default="")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def from_metadata(metadata) -> str:
    """The request id a call carries, or a new one."""
    for key, value in metadata or ():
        if key == METADATA_KEY and value:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            return text[:REQUEST_ID_CHARS_MAX]
    return new_request_id()
