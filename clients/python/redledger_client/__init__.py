"""The Python client library of the red-envelope ledger (``ledger.v1.LedgerService``).

Installs without the server (``pip install clients/python``: grpcio, protobuf, tenacity):

    from redledger_client import LedgerClient
    async with LedgerClient("localhost:50051", caller="payments") as ledger:
        await ledger.create_wallet("alice", "CNY")
        await ledger.deposit("alice", 10_000, "CNY")

The request and response messages are in the generated package ``ledgerpb``
(``from ledgerpb import ledger_pb2``). The names below are the library's public API;
``tests/unit/test_client_exports.py`` pins them.
"""

from redledger_client.client import (
    TRANSIENT_CODES, LedgerClient, LedgerError, LedgerOutcomeUnknown, LedgerRefused,
    LedgerUnavailable, mutual_tls, new_idempotency_key,
)

__all__ = ["LedgerClient", "LedgerError", "LedgerOutcomeUnknown", "LedgerRefused",
           "LedgerUnavailable", "TRANSIENT_CODES", "mutual_tls", "new_idempotency_key"]
