"""Limits of the coordinator, each with its unit and what happens when it is hit."""

# The deadline of an API request whose caller sent none (s), counted from its arrival: no
# shard call of the request starts after it, and the router stops retrying a shard without
# owner then (the request is answered SHARD_UNAVAILABLE: transient, retry with the same key).
# Equal to the client library's default call timeout (``clients.ledger_client``), so a call
# without a deadline gets the budget a call from the client library gets.
REQUEST_DEADLINE_DEFAULT_S = 10.0

# How long ListWalletEntries waits for history rows that lag the journal (ms), within the
# request's deadline, and how often it looks again (ms). After the wait it answers with what
# is written (a caller may then miss its own latest entries).
HISTORY_WAIT_MS = 2_000
HISTORY_POLL_MS = 10
