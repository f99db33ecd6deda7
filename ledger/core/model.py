"""Plain data of the ledger: wallets, transfers, entries, and the commands and events of a shard.

Commands are what a shard owner is asked to do; events are what it decided, appended to the
shard's journal and replayed on takeover. Both are frozen, slotted dataclasses of primitives so
that ``ledger.core.codec`` can journal them and send them between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Transfer kinds.
KIND_TRANSFER = "TRANSFER"
KIND_DEPOSIT = "DEPOSIT"
KIND_WITHDRAWAL = "WITHDRAWAL"
KIND_HOLD_CAPTURE = "HOLD_CAPTURE"
# Red envelopes: sender -> escrow at creation, escrow -> receiver per grab, escrow -> sender
# for what is left at expiry.
KIND_ENVELOPE_FUND = "ENVELOPE_FUND"
KIND_ENVELOPE_GRAB = "ENVELOPE_GRAB"
KIND_ENVELOPE_REFUND = "ENVELOPE_REFUND"
KINDS = (KIND_TRANSFER, KIND_DEPOSIT, KIND_WITHDRAWAL, KIND_HOLD_CAPTURE, KIND_ENVELOPE_FUND,
         KIND_ENVELOPE_GRAB, KIND_ENVELOPE_REFUND)

# Transfer states (proto ``TransferState``).
STATE_COMMITTED = "COMMITTED"
STATE_REFUSED = "REFUSED"
# Prepared as an item of a linked chain; waits for the chain's decision.
STATE_PENDING = "PENDING"

# Hold states (proto ``HoldState``).
HOLD_HELD = "HELD"
HOLD_CAPTURED = "CAPTURED"
HOLD_RELEASED = "RELEASED"
HOLD_EXPIRED = "EXPIRED"

# Wallet ids that start with this character are reserved for the ledger's own accounts.
RESERVED_PREFIX = "~"


def settlement_wallet_id(currency: str, shard: int) -> str:
    """The settlement account of ``currency`` on ``shard``.

    Money enters (Deposit) and leaves (Withdraw) the ledger through the settlement account of
    its currency. The account is split into one sub-account per shard so that deposits and
    withdrawals are single-shard operations; the sum of the sub-accounts is the settlement
    account, and the double-entry invariant holds over the sum.
    """
    return f"{RESERVED_PREFIX}settlement:{currency}:{shard}"


def is_settlement(wallet_id: str) -> bool:
    return wallet_id.startswith(RESERVED_PREFIX + "settlement:")


# Envelope states (proto ``EnvelopeState``), derived from an envelope and the time.
ENVELOPE_FUNDING = "FUNDING"    # opened; the sender's money has not reached the escrow yet
ENVELOPE_ACTIVE = "ACTIVE"
ENVELOPE_SOLD_OUT = "SOLD_OUT"
ENVELOPE_EXPIRED = "EXPIRED"    # past its expiry; what is left not refunded yet (or nothing)
ENVELOPE_REFUNDED = "REFUNDED"  # past its expiry, what was left went back to the sender
ENVELOPE_UNFUNDED = "UNFUNDED"  # the sender's transfer was refused: never funded, never will be

_ESCROW_PREFIX = RESERVED_PREFIX + "envelope:"


def escrow_wallet_id(envelope_id: str) -> str:
    """The escrow account of an envelope: it holds the money not grabbed yet. It lives on
    the envelope's shard (the shard its id hashes to), with the envelope."""
    return _ESCROW_PREFIX + envelope_id


def envelope_of_escrow(wallet_id: str) -> str:
    """The envelope whose escrow ``wallet_id`` is, or "" for any other wallet."""
    return wallet_id[len(_ESCROW_PREFIX):] if wallet_id.startswith(_ESCROW_PREFIX) else ""


@dataclass(slots=True)
class Wallet:
    wallet_id: str
    currency: str
    balance_minor: int = 0
    held_minor: int = 0
    version: int = 0
    allow_negative: bool = False
    frozen: bool = False
    created_at_ms: int = 0

    @property
    def available_minor(self) -> int:
        return self.balance_minor - self.held_minor

    def copy(self) -> "Wallet":
        return Wallet(self.wallet_id, self.currency, self.balance_minor, self.held_minor,
                      self.version, self.allow_negative, self.frozen, self.created_at_ms)


@dataclass(slots=True)
class Transfer:
    """One money movement and its outcome, as recorded on the debit shard.

    ``credited`` turns true when the credit leg of a cross-shard transfer is confirmed applied
    on the credit shard; same-shard transfers are credited in the same journal batch.
    """

    transfer_id: str
    kind: str
    from_wallet_id: str
    to_wallet_id: str
    amount_minor: int
    currency: str
    memo: str
    caller: str
    idempotency_key: str
    created_at_ms: int
    state: str = STATE_COMMITTED
    status: int = 1
    status_field: str = ""
    status_detail: str = ""
    credited: bool = False

    def copy(self) -> "Transfer":
        return Transfer(self.transfer_id, self.kind, self.from_wallet_id, self.to_wallet_id,
                        self.amount_minor, self.currency, self.memo, self.caller,
                        self.idempotency_key, self.created_at_ms, self.state, self.status,
                        self.status_field, self.status_detail, self.credited)


@dataclass(slots=True, frozen=True)
class Entry:
    """One line of a wallet's history: a signed change of its balance.

    ``version`` is the wallet's version after the change (1, 2, ...), so entries of a wallet
    are numbered without gaps and ``balance_after_minor`` of the last entry is the balance.
    """

    wallet_id: str
    version: int
    transfer_id: str
    kind: str
    amount_minor: int
    balance_after_minor: int
    counterparty_wallet_id: str
    currency: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class Credit:
    """A credit owed by a debit shard to a wallet on another shard (an outbox item)."""

    outbox_seq: int
    transfer_id: str
    kind: str
    from_wallet_id: str
    to_wallet_id: str
    amount_minor: int
    currency: str
    at_ms: int
    # The credit shard's reservation this credit was committed under (see ReserveCredit).
    reserved_at_ms: int = 0


@dataclass(slots=True)
class Hold:
    """Money reserved on a wallet: counted in ``held_minor`` until captured or released.

    Holds made by clients expire at ``expires_at_ms``. Holds that prepare an item of a linked
    chain (``chain_id`` set) never expire by themselves: only the chain's decision, kept on
    ``primary_shard``, may end them (else a late commit could find its money gone).
    """

    hold_id: str
    wallet_id: str
    currency: str
    amount_minor: int
    caller: str
    idempotency_key: str
    created_at_ms: int
    expires_at_ms: int
    state: str = HOLD_HELD
    captured_minor: int = 0
    closed_at_ms: int = 0
    chain_id: str = ""
    primary_shard: int = -1
    to_shard: int = -1
    reserved_at_ms: int = 0  # a chain item's credit reservation on to_shard

    def copy(self) -> "Hold":
        return Hold(self.hold_id, self.wallet_id, self.currency, self.amount_minor, self.caller,
                    self.idempotency_key, self.created_at_ms, self.expires_at_ms, self.state,
                    self.captured_minor, self.closed_at_ms, self.chain_id, self.primary_shard,
                    self.to_shard, self.reserved_at_ms)


@dataclass(slots=True)
class Envelope:
    """A red envelope: its terms (fixed at creation) and what is left of it.

    The money is in the escrow wallet ``escrow_wallet_id(envelope_id)`` on the envelope's
    shard from the moment the funding transfer's credit lands (``funded_at_ms`` > 0) until
    it is grabbed (``Grab``) or refunded at expiry. ``left_minor`` equals the escrow balance.
    """

    envelope_id: str
    sender_wallet_id: str
    currency: str
    kind: str                   # ledger.core.split: FIXED, LUCKY or EXCLUSIVE
    total_minor: int
    shares: int
    min_share_minor: int
    receiver_wallet_id: str     # EXCLUSIVE: the only wallet that may grab it; else ""
    memo: str
    seed: int                   # the lucky draws' seed, chosen at creation, journaled
    caller: str
    idempotency_key: str
    funding_transfer_id: str
    created_at_ms: int
    expires_at_ms: int
    funded_at_ms: int = 0
    left_minor: int = 0
    left_shares: int = 0
    refunded_minor: int = 0
    refund_transfer_id: str = ""
    closed_at_ms: int = 0       # sold out, refunded or abandoned unfunded (0: none yet)

    def state(self, now_ms: int) -> str:
        if self.refund_transfer_id:
            return ENVELOPE_REFUNDED
        if not self.funded_at_ms and self.closed_at_ms:
            return ENVELOPE_UNFUNDED
        if self.funded_at_ms and self.left_shares == 0:
            return ENVELOPE_SOLD_OUT
        if now_ms >= self.expires_at_ms:
            return ENVELOPE_EXPIRED
        return ENVELOPE_ACTIVE if self.funded_at_ms else ENVELOPE_FUNDING

    def copy(self) -> "Envelope":
        return Envelope(self.envelope_id, self.sender_wallet_id, self.currency, self.kind,
                        self.total_minor, self.shares, self.min_share_minor,
                        self.receiver_wallet_id, self.memo, self.seed, self.caller,
                        self.idempotency_key, self.funding_transfer_id, self.created_at_ms,
                        self.expires_at_ms, self.funded_at_ms, self.left_minor,
                        self.left_shares, self.refunded_minor, self.refund_transfer_id,
                        self.closed_at_ms)


@dataclass(slots=True, frozen=True)
class Grab:
    """One share of an envelope, taken by one receiver: decided and journaled on the
    envelope's shard, credited to the receiver by the transfer ``transfer_id``."""

    envelope_id: str
    position: int               # 0 for the first grab, 1 for the next, ...
    receiver_wallet_id: str
    amount_minor: int
    transfer_id: str
    caller: str
    idempotency_key: str
    at_ms: int


def luckiest(grabs: list[Grab]) -> Grab | None:
    """The largest share of an envelope; ties go to the earliest grab."""
    best: Grab | None = None
    for g in grabs:
        if best is None or g.amount_minor > best.amount_minor or (
                g.amount_minor == best.amount_minor and g.position < best.position):
            best = g
    return best


@dataclass(slots=True)
class IdempotencyRecord:
    """What a (caller, idempotency key) pair was first used for on this shard."""

    caller: str
    idempotency_key: str
    target: str  # "wallet:<id>", "transfer:<id>", "hold:<id>" or "release:<hold id>"
    fingerprint: tuple[tuple[str, object], ...]
    created_at_ms: int


# --- Commands ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class CreateWallet:
    caller: str
    idempotency_key: str
    wallet_id: str
    currency: str
    allow_negative: bool
    now_ms: int


@dataclass(slots=True, frozen=True)
class GetWallet:
    wallet_id: str
    # Answer (Wallet, ledger.core.risk.RiskView) instead of the Wallet alone; the risk view's
    # velocity window is read as of ``now_ms``.
    with_risk: bool = False
    now_ms: int = 0


@dataclass(slots=True, frozen=True)
class SetFrozen:
    """Freeze (or unfreeze) a wallet: a frozen wallet refuses debits (WALLET_FROZEN). Setting
    the state it already has changes nothing and journals nothing."""

    wallet_id: str
    frozen: bool
    reason: str
    caller: str
    now_ms: int


@dataclass(slots=True, frozen=True)
class SetRiskLimits:
    """Set a wallet's own risk limits, or (``wallet_id`` empty) the shard's default for every
    wallet without its own (``ledger.core.risk``). ``window_ms`` and ``step_up_above_minor``
    may be ``risk.INHERIT`` for a wallet (follow the default). Setting what is in force
    already changes nothing and journals nothing."""

    wallet_id: str
    window_ms: int
    max_amount_minor: int
    max_count: int
    step_up_above_minor: int
    reason: str
    caller: str
    now_ms: int


@dataclass(slots=True, frozen=True)
class ConfirmDevice:
    """Confirm (or, ``confirmed`` False, forget) a device of a wallet for the step-up check."""

    wallet_id: str
    device_id: str
    confirmed: bool
    reason: str
    caller: str
    now_ms: int


@dataclass(slots=True, frozen=True)
class GetHead:
    """Read the shard's durable journal head: the seq of the last batch its owner holds
    durably (what a change stream may send up to)."""


@dataclass(slots=True, frozen=True)
class NoteAdmin:
    """Record, in this shard's audit chain, an admin action made outside its journal: a change
    of owner (``TakeOver`` after a lease lapsed or a node started; an operator's ``MoveShard``,
    ``Failover``, ``Failback`` or ``RestoreHomes``, or a node's ``AutoFailover``, which the
    shard map carries with its principal) or of the security the owner enforces
    (``PolicyReloaded``, ``CertificateRotated``). Sent by the shard's own node only (the
    public API has no such method); ``ledger.owner.ShardOwner.note_admin`` journals it with
    the owner's next batch."""

    action: str
    principal: str
    subject: str  # what it acted on: the node now serving, the policy's name, a certificate
    detail: str  # short facts, no personal data (regions, epoch, digests, the stated reason)
    change_id: str  # the shard map change this records ("" if none)
    now_ms: int


@dataclass(slots=True, frozen=True)
class Post:
    """Decide a transfer on its debit shard: the commit point of every transfer.

    If ``to_shard`` is this shard, the credit is applied in the same step; otherwise it is
    put in the outbox for ``to_shard`` and delivered by the crediting pipeline.
    """

    caller: str
    idempotency_key: str
    transfer_id: str
    kind: str
    from_wallet_id: str
    to_wallet_id: str
    amount_minor: int
    currency: str
    memo: str
    to_shard: int
    now_ms: int
    # Set when the credit shard refused the reservation: (status, field, detail). The debit
    # shard still checks the idempotency key first, so a retry of a transfer that committed
    # earlier gets its original result, not today's refusal.
    credit_refusal: tuple[int, str, str] | None = None
    # The credit shard's reservation (its ``at_ms``) this transfer commits under; 0 when the
    # credit is local or was refused.
    reserved_at_ms: int = 0
    # The device the request came from (step-up check, ``ledger.core.risk``); not part of the
    # request's identity (a retry from another device is the same payment).
    device_id: str = ""


@dataclass(slots=True, frozen=True)
class ReserveCredit:
    """Prepare the credit side of a cross-shard transfer: the destination exists, has the
    transfer's currency, and can take the amount without overflowing. Journaled: the
    reservation holds the destination's headroom until the credit lands or the debit shard
    says it never will (``ResolveReservations``). Answers the reservation's ``at_ms``."""

    transfer_id: str
    wallet_id: str
    currency: str
    amount_minor: int
    now_ms: int


@dataclass(slots=True, frozen=True)
class CancelReservation:
    """Drop a reservation whose transfer was refused for good (a recorded refusal)."""

    transfer_id: str
    reserved_at_ms: int = 0


@dataclass(slots=True, frozen=True)
class ResolveReservations:
    """On a debit shard: for each (transfer_id, reserved_at_ms) the credit shard holds a
    reservation for, answer whether a credit under it is still coming (keep it) or not (drop
    it). A transfer never decided here is fenced: a later Post under that reservation is
    refused, so the answer "drop" stays true."""

    items: tuple[tuple[str, int], ...]
    now_ms: int


@dataclass(slots=True, frozen=True)
class DropReservations:
    """On a credit shard: drop reservations the debit shard said no credit will use."""

    items: tuple[tuple[str, int], ...]


@dataclass(slots=True, frozen=True)
class ApplyCredits:
    """Apply credits sent by ``from_shard``'s outbox, in outbox order, each exactly once."""

    from_shard: int
    credits: tuple[Credit, ...]


@dataclass(slots=True, frozen=True)
class AckOutbox:
    """The credit shard confirmed every credit to ``to_shard`` up to ``up_to_seq``."""

    to_shard: int
    up_to_seq: int


@dataclass(slots=True, frozen=True)
class GetTransfer:
    transfer_id: str


@dataclass(slots=True, frozen=True)
class ExpireIdempotency:
    before_ms: int


@dataclass(slots=True, frozen=True)
class SpillIdempotency:
    """Spill the money-movement key records and claims created before ``before_ms`` (their
    rows must be durable in the store first: the owner flushes them before it asks)."""

    before_ms: int


@dataclass(slots=True, frozen=True)
class ClaimKey:
    """Claim an idempotency key for one money movement on the key's own shard.

    A key's decision is kept on the debit shard; a retry that names another debit wallet
    would reach another shard and never see it. So before executing, the coordinator claims
    (caller, key) with the request's fingerprint on the shard the key hashes to: the first
    claim wins, a claim with another payload is refused naming the field, and the same
    payload passes (the debit shard then answers the retry from its record)."""

    caller: str
    idempotency_key: str
    fingerprint: tuple
    transfer_id: str
    now_ms: int
    # What the key is used for ("wallet:<id>", "hold:<id>", "release:<hold id>"); empty for
    # a money movement, whose target is "transfer:<transfer_id>".
    target: str = ""


@dataclass(slots=True, frozen=True)
class CreateHold:
    caller: str
    idempotency_key: str
    hold_id: str
    wallet_id: str
    amount_minor: int
    currency: str
    timeout_ms: int
    now_ms: int
    device_id: str = ""  # as in Post


@dataclass(slots=True, frozen=True)
class CaptureHold:
    """Capture all (``amount_minor`` 0) or part of a hold into ``to_wallet_id``; the rest of
    the hold goes back to the wallet's available balance. Decided on the hold's shard."""

    caller: str
    idempotency_key: str
    transfer_id: str
    hold_id: str
    amount_minor: int
    to_wallet_id: str
    to_shard: int
    memo: str
    now_ms: int
    credit_refusal: tuple[int, str, str] | None = None
    reserved_at_ms: int = 0  # as in Post


@dataclass(slots=True, frozen=True)
class ReleaseHold:
    caller: str
    idempotency_key: str
    hold_id: str
    now_ms: int


@dataclass(slots=True, frozen=True)
class GetHold:
    hold_id: str


@dataclass(slots=True, frozen=True)
class ExpireHolds:
    now_ms: int


@dataclass(slots=True, frozen=True)
class PrepareLinked:
    """Prepare one item of a linked chain on its debit shard: check it as a Post would and
    hold its amount, without deciding. ``chain_id`` is decided on ``primary_shard``."""

    post: Post
    chain_id: str
    primary_shard: int


@dataclass(slots=True, frozen=True)
class DecideChain:
    """On the chain's primary shard: record commit or abort, unless a decision exists, and
    answer the decision in force (the commit point of a linked chain)."""

    chain_id: str
    commit: bool
    now_ms: int
    # The shards holding the chain's items. A commit decision is kept until each of them
    # reported its items finished (ChainFinished), so no participant can ever find it gone.
    participants: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class ChainFinished:
    """On the chain's primary: ``shard`` applied the chain's commit to its items."""

    chain_id: str
    shard: int


@dataclass(slots=True, frozen=True)
class FinishChain:
    """Apply a chain's decision to the items prepared on this shard."""

    chain_id: str
    commit: bool
    now_ms: int


@dataclass(slots=True, frozen=True)
class OpenEnvelope:
    """Open an envelope on its shard: its escrow wallet and its terms, not funded yet (the
    coordinator then moves the money in with an ENVELOPE_FUND transfer, whose credit landing
    on the escrow makes the envelope active). Idempotent by envelope id."""

    envelope: Envelope
    now_ms: int


@dataclass(slots=True, frozen=True)
class GrabEnvelope:
    """Take one share of an envelope for ``receiver_wallet_id``: decided on the envelope's
    shard, which draws the amount, debits the escrow and owes the credit (an outbox item)
    in the same journal batch. ``idempotency_key`` is scoped to the envelope
    (``ledger.core.ids.grab_key``)."""

    caller: str
    idempotency_key: str
    envelope_id: str
    receiver_wallet_id: str
    receiver_shard: int
    transfer_id: str
    now_ms: int
    # As in Post: the receiver shard's refusal of the credit reservation, or the reservation,
    # or ``UNDER_GRANT``: owe the credit under the receiver shard's headroom grant (the
    # coordinator checked the receiver's wallet and currency in its owner's durable state).
    credit_refusal: tuple[int, str, str] | None = None
    reserved_at_ms: int = 0


@dataclass(slots=True, frozen=True)
class GetEnvelope:
    envelope_id: str


@dataclass(slots=True, frozen=True)
class GrantHeadroom:
    """On a credit shard: let ``to_shard`` owe credits to this shard's wallets without a
    reservation each, up to ``total_minor`` in all (cumulative; idempotent). Granted only if
    every wallet here keeps that room below the int64 ceiling; answers the total granted."""

    to_shard: int
    total_minor: int


@dataclass(slots=True, frozen=True)
class NoteHeadroom:
    """On a debit shard: ``from_shard`` granted it ``total_minor`` (cumulative)."""

    from_shard: int
    total_minor: int


@dataclass(slots=True, frozen=True)
class AbandonEnvelope:
    """Close an envelope whose funding transfer was refused for good (a recorded refusal on
    the sender's shard: it can never commit, so the escrow never gets the money)."""

    envelope_id: str
    funding_transfer_id: str
    now_ms: int


@dataclass(slots=True, frozen=True)
class RefundEnvelope:
    """Give what is left of an expired envelope back to its sender (the owner's sweep)."""

    envelope_id: str
    now_ms: int
    reserved_at_ms: int = 0  # the sender shard's reservation when the sender is elsewhere


# --- Events (the journal) ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class WalletCreated:
    wallet_id: str
    currency: str
    allow_negative: bool
    at_ms: int
    caller: str
    idempotency_key: str


@dataclass(slots=True, frozen=True)
class TransferDecided:
    """A transfer decided on its debit shard (committed or refused), with its outbox slot."""

    transfer: Transfer
    to_shard: int
    outbox_seq: int  # 0 when the credit is local or the transfer was refused
    closes_hold: str = ""  # a hold this decision ends (captured, or a chain item's hold)
    reserved_at_ms: int = 0  # the credit shard's reservation the credit is owed under


@dataclass(slots=True, frozen=True)
class HoldCreated:
    hold: Hold


@dataclass(slots=True, frozen=True)
class HoldReleased:
    hold_id: str
    state: str  # HOLD_RELEASED or HOLD_EXPIRED
    at_ms: int
    caller: str = ""
    idempotency_key: str = ""


@dataclass(slots=True, frozen=True)
class ChainPrepared:
    transfer: Transfer
    to_shard: int
    chain_id: str
    primary_shard: int
    reserved_at_ms: int = 0


@dataclass(slots=True, frozen=True)
class CreditReserved:
    transfer_id: str
    wallet_id: str
    amount_minor: int
    at_ms: int


@dataclass(slots=True, frozen=True)
class WalletFrozen:
    wallet_id: str
    frozen: bool
    reason: str
    caller: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class RiskLimitsSet:
    wallet_id: str  # "": the shard's default
    window_ms: int
    max_amount_minor: int
    max_count: int
    step_up_above_minor: int
    reason: str
    caller: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class DeviceConfirmed:
    wallet_id: str
    device_id: str
    confirmed: bool  # False: forgotten
    reason: str
    caller: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class AdminNoted:
    action: str
    principal: str
    subject: str
    detail: str
    change_id: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class HeadroomGranted:
    to_shard: int
    total_minor: int


@dataclass(slots=True, frozen=True)
class HeadroomNoted:
    from_shard: int
    total_minor: int


@dataclass(slots=True, frozen=True)
class ReservationsDropped:
    items: tuple[tuple[str, int], ...]  # (transfer_id, reserved_at_ms)


@dataclass(slots=True, frozen=True)
class ReservationsFenced:
    """Reservations whose transfer was never decided here: Posts under them are refused."""

    items: tuple[tuple[str, int], ...]
    at_ms: int


@dataclass(slots=True, frozen=True)
class KeyClaimed:
    caller: str
    idempotency_key: str
    fingerprint: tuple
    transfer_id: str
    at_ms: int
    target: str = ""  # as in ClaimKey


@dataclass(slots=True, frozen=True)
class ChainDecided:
    chain_id: str
    committed: bool
    at_ms: int
    participants: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class ChainParticipantFinished:
    chain_id: str
    shard: int


@dataclass(slots=True, frozen=True)
class CreditsApplied:
    from_shard: int
    credits: tuple[Credit, ...]


@dataclass(slots=True, frozen=True)
class OutboxAcked:
    to_shard: int
    up_to_seq: int


@dataclass(slots=True, frozen=True)
class IdempotencyExpired:
    before_ms: int


@dataclass(slots=True, frozen=True)
class IdempotencySpilled:
    """Money-movement key records (and their finished transfers) and key claims created
    before ``before_ms`` left the owner's memory: their rows are in the store, their keys in
    the shard's filters (``ledger.core.spilled``)."""

    before_ms: int


@dataclass(slots=True, frozen=True)
class EnvelopeOpened:
    envelope: Envelope


@dataclass(slots=True, frozen=True)
class EnvelopeGrabbed:
    """A share taken; the TransferDecided that follows it in the batch moves its money."""

    grab: Grab


@dataclass(slots=True, frozen=True)
class EnvelopeRefunded:
    """What was left went back to the sender; the TransferDecided that follows moves it."""

    envelope_id: str
    amount_minor: int
    transfer_id: str
    at_ms: int


@dataclass(slots=True, frozen=True)
class EnvelopeAbandoned:
    envelope_id: str
    at_ms: int


EVENT_TYPES = (WalletCreated, TransferDecided, CreditsApplied, OutboxAcked, IdempotencyExpired,
               HoldCreated, HoldReleased, ChainPrepared, ChainDecided, KeyClaimed,
               CreditReserved, ReservationsDropped, ReservationsFenced,
               ChainParticipantFinished, IdempotencySpilled, EnvelopeOpened, EnvelopeGrabbed,
               EnvelopeRefunded, EnvelopeAbandoned, HeadroomGranted, HeadroomNoted, WalletFrozen,
               RiskLimitsSet, DeviceConfirmed, AdminNoted)
COMMAND_TYPES = (CreateWallet, GetWallet, Post, ReserveCredit, CancelReservation, ApplyCredits,
                 AckOutbox, GetTransfer, ExpireIdempotency, CreateHold, CaptureHold,
                 ReleaseHold, GetHold, ExpireHolds, PrepareLinked, DecideChain, FinishChain,
                 ClaimKey, ResolveReservations, DropReservations, ChainFinished,
                 SpillIdempotency, OpenEnvelope, GrabEnvelope, GetEnvelope, RefundEnvelope,
                 AbandonEnvelope, GrantHeadroom, NoteHeadroom, SetFrozen, SetRiskLimits,
                 ConfirmDevice, NoteAdmin, GetHead)
