"""Limits of the ledger core, each with its unit and what happens when it is hit."""

# Largest amount or balance: signed 64-bit, as on the wire (int64). A request past it is
# refused with INVALID_AMOUNT; a posting that would push a balance past it is refused with
# BALANCE_OVERFLOW and changes nothing.
AMOUNT_MINOR_MAX = 2**63 - 1
BALANCE_MINOR_MIN = -(2**63)

# Identifiers. Longer or malformed ones are refused with INVALID_ARGUMENT naming the field.
WALLET_ID_BYTES_MAX = 64
IDEMPOTENCY_KEY_BYTES_MAX = 128
CALLER_BYTES_MAX = 64
MEMO_BYTES_MAX = 256

# Items per BatchTransfer call. A bigger batch is refused whole with BATCH_TOO_LARGE.
BATCH_TRANSFERS_MAX = 10_000

# Entries per ListWalletEntries page; a bigger page_size is clamped to this.
ENTRIES_PAGE_MAX = 1_000
ENTRIES_PAGE_DEFAULT = 100

# How old a credit reservation (the prepare step of a cross-shard transfer) gets before its
# credit shard asks the debit shard whether a credit is still coming under it (ms). It is
# dropped only when the answer is no (the transfer was refused, its credit landed, or it was
# never decided and is now fenced), never by time alone: a committed credit always finds its
# headroom, so no credit can overflow its receiver.
RESERVATION_TTL_MS = 30_000

# Headroom grants (see ``coordinator/PROTOCOL.md``, "Headroom grants"): a credit shard may
# promise a debit shard headroom for credits owed without a per-credit reservation. Every
# wallet of the credit shard then keeps that much room below the int64 ceiling for them, so
# a granted credit can always land. A debit shard asks for this much more each time it runs
# out. 10^15 per debit shard: 256 debit shards hold at most 2.6 * 10^17 of a wallet's
# 9.2 * 10^18 of room, and one grant covers 5 * 10^10 grabs of 20,000.
HEADROOM_GRANT_MINOR = 10**15
# ``reserved_at_ms`` of a credit owed under the credit shard's headroom grant, not under a
# reservation of its own.
UNDER_GRANT = -1

# How long an idempotency key and the result it guards are kept. Retries after this are
# executed as new requests. Configurable per deployment; this is the default.
IDEMPOTENCY_RETENTION_MS = 24 * 3600 * 1000

# Longest hold a client may ask for (ms). Longer is refused with INVALID_ARGUMENT.
HOLD_TIMEOUT_MS_MAX = 7 * 24 * 3600 * 1000

# A linked-chain item prepared this long ago without a decision is resolved by asking the
# chain's primary shard, which records an abort if nobody decided yet (ms). Together with the
# sweep period this bounds how long any transfer stays in doubt (the recovery timeout).
CHAIN_RESOLVE_AFTER_MS = 5_000
RECOVERY_TIMEOUT_MS = 10_000

# Red envelopes. The rules a deployment may change (``ledgerd`` flags), with the defaults of
# the real products: at most 200.00 CNY per envelope, 100 shares, every share at least one
# minor unit, expiry within 24 h. A request past a rule is refused with INVALID_ARGUMENT (or
# INVALID_AMOUNT) naming the field.
ENVELOPE_TOTAL_MINOR_MAX = 20_000
ENVELOPE_SHARES_MAX = 100
ENVELOPE_SHARE_MINOR_MIN = 1
ENVELOPE_EXPIRY_MS_MAX = 24 * 3600 * 1000
# Ceilings no configuration may pass: every grab reserves ENVELOPE_TOTAL_MINOR_CEILING of
# headroom on its receiver before the share is drawn (the amount is not known before), and an
# envelope's grabs are kept in its owner's memory (ENVELOPE_SHARES_CEILING bounds them).
ENVELOPE_TOTAL_MINOR_CEILING = 10**12
ENVELOPE_SHARES_CEILING = 100_000
# How long after its creation a grab of an envelope whose money has not arrived is answered
# REQUEST_IN_FLIGHT (retry: the funding credit is on its way) before ENVELOPE_UNFUNDED (ms).
ENVELOPE_FUNDING_WAIT_MS = 10_000
# Grabs per GetEnvelope page; a bigger page_size is clamped to this.
ENVELOPE_GRABS_PAGE_MAX = 1_000
ENVELOPE_GRABS_PAGE_DEFAULT = 100
# Envelopes per ListEnvelopes page.
ENVELOPES_PAGE_MAX = 1_000
ENVELOPES_PAGE_DEFAULT = 100
