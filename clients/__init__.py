"""The users' side: the Python client library internal services use, and tools built on it.

The library itself is the ``redledger-client`` distribution in ``clients/python``
(package ``redledger_client``, with the generated stubs ``ledgerpb``), which installs
without the server. Its public names are re-exported here for the tools beside it:

    from clients import LedgerClient
    async with LedgerClient("localhost:50051", caller="payments") as ledger:
        await ledger.create_wallet("alice", "CNY")
        await ledger.deposit("alice", 10_000, "CNY")
"""

from redledger_client import (TRANSIENT_CODES, LedgerClient, LedgerError, LedgerOutcomeUnknown,
                              LedgerRefused, LedgerUnavailable, mutual_tls, new_idempotency_key)

__all__ = ["LedgerClient", "LedgerError", "LedgerOutcomeUnknown", "LedgerRefused",
           "LedgerUnavailable", "TRANSIENT_CODES", "mutual_tls", "new_idempotency_key"]
