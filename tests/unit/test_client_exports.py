"""The client library's public API is pinned (Trio's ``test_exports.py``): the names users
import from ``redledger_client`` (and the same names from ``clients``), the methods of
``LedgerClient`` and the attributes of its errors. A name that disappears, or a new one that
appears without being added here, fails the test: changing the API is a decision.

Also: the library imports nothing of the server, and its limits agree with the server's.
"""

import ast
import inspect
from pathlib import Path

import clients
import redledger_client
from redledger_client import constants as client_constants

PUBLIC_NAMES = {
    "LedgerClient",
    "LedgerError",
    "LedgerOutcomeUnknown",
    "LedgerRefused",
    "LedgerUnavailable",
    "TRANSIENT_CODES",
    "mutual_tls",
    "new_idempotency_key",
}

CLIENT_METHODS = {
    "close", "create_wallet", "get_wallet", "deposit", "withdraw", "transfer", "batch_transfer",
    "create_hold", "capture_hold", "release_hold", "get_hold", "get_transfer", "list_entries",
    "set_wallet_frozen", "set_risk_limits", "confirm_device",
    "all_entries", "balance_at", "watch_changes",
    # ledger.v1.RedEnvelopeService
    "create_envelope", "grab_envelope", "grab_envelopes", "get_envelope", "list_envelopes",
}

ERROR_ATTRIBUTES = {"code", "status", "field", "message", "error_id"}
UNKNOWN_OUTCOME_ATTRIBUTES = ERROR_ATTRIBUTES | {"idempotency_key", "attempts"}

LIBRARY_DIR = Path(redledger_client.__file__).parent


def _public(module) -> set[str]:
    """Names a user can import from the package: not private, not a submodule."""
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)}


def test_the_public_names_are_pinned():
    assert set(redledger_client.__all__) == PUBLIC_NAMES
    assert _public(redledger_client) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(redledger_client, name) is not None


def test_clients_reexports_the_same_objects():
    assert set(clients.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(clients, name) is getattr(redledger_client, name)


def test_the_client_methods_are_pinned():
    methods = {name for name, _ in inspect.getmembers(redledger_client.LedgerClient,
                                                      inspect.isfunction)
               if not name.startswith("_")}
    assert methods == CLIENT_METHODS


def test_the_error_hierarchy_and_attributes_are_pinned():
    from redledger_client import (LedgerError, LedgerOutcomeUnknown, LedgerRefused,
                                  LedgerUnavailable)
    for error in (LedgerRefused, LedgerOutcomeUnknown, LedgerUnavailable):
        assert error.__bases__ == (LedgerError,)
    import grpc
    error = LedgerOutcomeUnknown(grpc.StatusCode.UNAVAILABLE, "", "", "down", "ref")
    assert ERROR_ATTRIBUTES <= set(vars(error))
    assert UNKNOWN_OUTCOME_ATTRIBUTES <= set(vars(error)) | set(vars(LedgerOutcomeUnknown))


def test_the_library_imports_nothing_of_the_server():
    server_packages = {"ledger", "coordinator", "shard_router", "clients", "cassandra",
                       "pyetcd", "tests"}
    for path in LIBRARY_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").partition(".")[0]}
            else:
                continue
            assert not roots & server_packages, f"{path.name} imports {roots & server_packages}"


def test_the_client_limits_agree_with_the_server():
    from ledger import constants as server_constants
    assert (client_constants.GRPC_MESSAGE_BYTES_MAX
            == server_constants.GRPC_MESSAGE_BYTES_MAX)
