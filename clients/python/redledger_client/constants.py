"""The client library's limits, each with its unit and what happens when it is hit.

The client carries its own copy of the limits it shares with the server (the message size),
so that it installs and imports without the server; ``tests/unit/test_client_exports.py``
pins that the copies agree.
"""

# The largest gRPC message sent or received, in bytes. Equal to the server's limit
# (``ledger.constants.GRPC_MESSAGE_BYTES_MAX``, sized for the largest BatchTransfer answer):
# a larger message fails the call with RESOURCE_EXHAUSTED.
GRPC_MESSAGE_BYTES_MAX = 32 * 1024 * 1024

# The deadline of one attempt of a call, in seconds, unless the client is given another.
# When it passes, the attempt ends with DEADLINE_EXCEEDED (retried like any transient answer).
DEFAULT_TIMEOUT_S = 10.0

# Attempts of one call, the first included, on transient answers; after the last one the
# call raises ``LedgerOutcomeUnknown`` (mutating calls) or ``LedgerUnavailable`` (reads).
RETRY_ATTEMPTS_MAX = 8

# Time, in seconds, after which no further attempt of a call starts (same outcome as above).
RETRY_TOTAL_S_MAX = 30.0

# Backoff between attempts, in seconds: this first wait, doubled after every attempt, plus a
# random jitter of up to RETRY_JITTER_S_MAX, so that clients refused together do not retry
# together.
RETRY_BACKOFF_S_FIRST = 0.05
RETRY_JITTER_S_MAX = 1.0

# The longest wait between two attempts, in seconds.
RETRY_BACKOFF_S_MAX = 2.0

# Metadata carrying the id of one logical call (the same on its retries), which the ledger
# puts on every log record of every node that handles it.
REQUEST_ID_METADATA = "ledger-request-id"
