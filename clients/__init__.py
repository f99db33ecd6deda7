"""The users' side: the Python client library internal services use, and tools built on it.

    from clients import LedgerClient
    async with LedgerClient("localhost:50051", caller="payments") as ledger:
        await ledger.create_wallet("alice", "CNY")
        await ledger.deposit("alice", 10_000, "CNY")
"""

from clients.ledger_client import (LedgerClient, LedgerError, LedgerOutcomeUnknown,
                                   LedgerRefused, LedgerUnavailable, new_idempotency_key)

__all__ = ["LedgerClient", "LedgerError", "LedgerOutcomeUnknown", "LedgerRefused",
           "LedgerUnavailable", "new_idempotency_key"]
