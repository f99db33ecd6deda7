"""The state machine of one shard: pure ``decide`` and ``evolve`` over in-memory state.

A shard owner feeds commands to ``decide``, which checks them against the current state and
returns an outcome plus the events to journal; ``evolve`` applies one event to the state. The
journal is the list of events, so replaying it through ``evolve`` rebuilds the state exactly.
``decide`` never mutates; ``evolve`` never refuses (a refusal there is a broken invariant).

Cross-shard transfers (see ``coordinator/PROTOCOL.md``): the credit shard answers
``ReserveCredit`` (checks, in-memory reservation, not journaled); the debit shard decides with
``Post`` (the commit point: idempotency, funds, debit, and an outbox item for the credit);
the debit shard's crediting pipeline delivers outbox items in order with ``ApplyCredits``; the
credit shard applies each exactly once (it keeps the highest outbox sequence applied per
source shard) and the debit shard journals ``OutboxAcked``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ledger.core import constants as C
from ledger.core.invariants import InvariantViolation, ensure
from ledger.core.model import (
    HOLD_CAPTURED, HOLD_EXPIRED, HOLD_HELD, HOLD_RELEASED, KIND_DEPOSIT, KIND_HOLD_CAPTURE,
    KIND_WITHDRAWAL, STATE_COMMITTED, STATE_PENDING, STATE_REFUSED, AckOutbox, ApplyCredits,
    CancelReservation, CaptureHold, ChainDecided, ChainPrepared, ClaimKey, CreateHold,
    CreateWallet, Credit, KeyClaimed,
    CreditsApplied, DecideChain, Entry, ExpireHolds, ExpireIdempotency, FinishChain, GetHold,
    GetTransfer, GetWallet, Hold, HoldCreated, HoldReleased, IdempotencyExpired,
    IdempotencyRecord, OutboxAcked, Post, PrepareLinked, ReleaseHold, ReserveCredit, Transfer,
    TransferDecided, Wallet, WalletCreated, is_settlement, CreditReserved, DropReservations,
    ReservationsDropped, ReservationsFenced, ResolveReservations, ChainFinished,
    ChainParticipantFinished, IdempotencySpilled, SpillIdempotency,
    KIND_ENVELOPE_FUND, KIND_ENVELOPE_GRAB, KIND_ENVELOPE_REFUND, Envelope, EnvelopeGrabbed,
    EnvelopeOpened, EnvelopeRefunded, GetEnvelope, Grab, GrabEnvelope, OpenEnvelope,
    RefundEnvelope, envelope_of_escrow, escrow_wallet_id, AbandonEnvelope, EnvelopeAbandoned,
    GrantHeadroom, HeadroomGranted, HeadroomNoted, NoteHeadroom, SetFrozen, WalletFrozen,
    RESERVED_PREFIX, ConfirmDevice, DeviceConfirmed, RiskLimitsSet, SetRiskLimits,
    AdminNoted, GetHead, NoteAdmin,
)
from ledger.core import risk as R
from ledger.core import split
from ledger.core import validate
from ledger.core.ids import refund_key, transfer_id_for
from ledger.core.spilled import SpilledKeys
from ledger.core.status import Outcome, Status, ok, refuse

Event = (WalletCreated | TransferDecided | CreditsApplied | OutboxAcked | IdempotencyExpired
         | HoldCreated | HoldReleased | ChainPrepared | ChainDecided | KeyClaimed
         | CreditReserved | ReservationsDropped | ReservationsFenced
         | ChainParticipantFinished | IdempotencySpilled | EnvelopeOpened | EnvelopeGrabbed
         | EnvelopeRefunded | EnvelopeAbandoned | HeadroomGranted | HeadroomNoted | WalletFrozen
         | RiskLimitsSet | DeviceConfirmed | AdminNoted)


# The ``field`` of the (never recorded, never client-facing) answer to a grab owed under a
# headroom grant that its debit shard has too little of: the value is (credit shard, the
# total it granted so far); the coordinator asks for more and sends the grab again.
HEADROOM_NEEDED = "headroom"


def debit_shard_of(transfer_id: str) -> int:
    """The shard that decides a transfer: ids carry it in hex after their one-letter prefix
    (``coordinator.transfer_id_for``); -1 for an id of another form."""
    try:
        return int(transfer_id[1:5], 16)
    except ValueError:
        return -1


def transfer_fingerprint(kind: str, from_wallet_id: str, to_wallet_id: str, amount_minor: int,
                         currency: str, memo: str) -> tuple[tuple[str, object], ...]:
    """The fields compared when an idempotency key is used again, in reporting order."""
    return (("kind", kind), ("from_wallet_id", from_wallet_id), ("to_wallet_id", to_wallet_id),
            ("amount_minor", amount_minor), ("currency", currency), ("memo", memo))


def hold_fingerprint(wallet_id: str, amount_minor: int, currency: str,
                     timeout_ms: int) -> tuple[tuple[str, object], ...]:
    return (("wallet_id", wallet_id), ("amount_minor", amount_minor), ("currency", currency),
            ("timeout_ms", timeout_ms))


def capture_fingerprint(hold_id: str, to_wallet_id: str, amount_minor: int,
                        memo: str) -> tuple[tuple[str, object], ...]:
    return (("hold_id", hold_id), ("to_wallet_id", to_wallet_id), ("amount_minor", amount_minor),
            ("memo", memo))


def wallet_fingerprint(wallet_id: str, currency: str,
                       allow_negative: bool) -> tuple[tuple[str, object], ...]:
    return (("wallet_id", wallet_id), ("currency", currency), ("allow_negative", allow_negative))


def envelope_terms(e: Envelope) -> tuple[tuple[str, object], ...]:
    """The fields of an envelope compared when its creating key is used again."""
    return (("sender_wallet_id", e.sender_wallet_id), ("currency", e.currency),
            ("kind", e.kind), ("total_minor", e.total_minor), ("shares", e.shares),
            ("receiver_wallet_id", e.receiver_wallet_id), ("memo", e.memo),
            ("expiry_ms", e.expires_at_ms - e.created_at_ms))


def _key_reused(field_name: str) -> Outcome:
    return refuse(Status.IDEMPOTENCY_KEY_REUSED, field_name,
                  f"idempotency key was first used with a different {field_name}")


def release_fingerprint(hold_id: str) -> tuple[tuple[str, object], ...]:
    return (("hold_id", hold_id),)


def claim_target(cmd: ClaimKey | KeyClaimed) -> str:
    """The idempotency target a ``ClaimKey`` stands for."""
    return cmd.target or "transfer:" + cmd.transfer_id


def _debit_overflow(wallet: Wallet, amount: int) -> str | None:
    """For a wallet that may go negative, which stored amount a debit or hold of ``amount``
    would take out of int64, or None. Holds count as spent: the available amount (balance
    minus held) stays within int64, and so does every balance a capture can leave."""
    if wallet.balance_minor - wallet.held_minor - amount < C.BALANCE_MINOR_MIN:
        return "available balance"
    if wallet.held_minor + amount > C.AMOUNT_MINOR_MAX:
        return "held amount"
    return None


def _first_difference(old: tuple, new: tuple) -> str:
    for (name, a), (_, b) in zip(old, new):
        if a != b:
            return name
    return ""


# ``ShardState.loaded`` for a key the filters say was never spilled (checked once per step).
_NEVER_SPILLED: tuple[None, None, None] = (None, None, None)


def _derived(t: Transfer, shard: int) -> bool:
    """True if the transfer's id is the one its key derives on this shard."""
    return t.transfer_id == transfer_id_for(shard, t.caller, t.idempotency_key)


def record_of_transfer(t: Transfer) -> IdempotencyRecord:
    """The key record of a money movement (not a capture) decided here, from its transfer:
    what the shard keeps, and what a spilled key's transfer row gives back."""
    return IdempotencyRecord(
        t.caller, t.idempotency_key, "transfer:" + t.transfer_id,
        transfer_fingerprint(t.kind, t.from_wallet_id, t.to_wallet_id, t.amount_minor,
                             t.currency, t.memo), t.created_at_ms)


class ShardState:
    """Everything one shard knows. Mutated only by ``evolve`` (and reservations)."""

    __slots__ = ("shard", "seq", "wallets", "transfers", "idempotency", "outbox",
                 "outbox_last_seq", "inbox_applied", "reservations", "incoming", "holds",
                 "chains", "claims", "fenced", "chain_waiting", "chains_purged_before",
                 "spilled", "loaded", "envelopes", "grabs", "grants_out", "grants_used",
                 "granted_open", "headroom_in", "headroom_used", "risk", "risk_default",
                 "audit_seq", "audit_head", "admin_change")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        # Sequence number of the last journal batch folded into this state.
        self.seq = 0
        # The audit chain's head: the last batch with audit records and its row's hash
        # (``ledger.core.audit.chain`` advances them; snapshots keep them).
        self.audit_seq = 0
        self.audit_head = ""
        # The latest shard map change (``NoteAdmin.change_id``) recorded in the audit chain:
        # an owner that takes the shard over records a change only once (``ledger.node``).
        self.admin_change = ""
        self.wallets: dict[str, Wallet] = {}
        # Transfers decided on this shard and still within the idempotency retention window.
        self.transfers: dict[str, Transfer] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        # Credits owed to other shards and not yet confirmed: to_shard -> {outbox_seq: Credit}.
        self.outbox: dict[int, dict[int, Credit]] = {}
        self.outbox_last_seq: dict[int, int] = {}
        # Highest outbox sequence applied here, per source shard (exactly-once credits).
        self.inbox_applied: dict[int, int] = {}
        # Credit reservations of cross-shard transfers (journaled): transfer_id -> (wallet_id,
        # amount, reserved_at_ms). Each holds headroom on its wallet until its credit lands,
        # or the debit shard says no credit will come; ``incoming`` sums them per wallet.
        self.reservations: dict[str, tuple[str, int, int]] = {}
        self.incoming: dict[str, int] = {}
        # Holds, open and (within the idempotency window) closed ones.
        self.holds: dict[str, Hold] = {}
        # Decisions of linked chains whose primary shard this is: chain_id -> (commit, at_ms).
        self.chains: dict[str, tuple[bool, int]] = {}
        # Idempotency keys claimed here for money movements decided on other shards.
        self.claims: dict[tuple[str, str], IdempotencyRecord] = {}
        # Reservations fenced here as a debit shard: transfer_id -> (reserved_at_ms, at_ms).
        self.fenced: dict[str, tuple[int, int]] = {}
        # Committed chains whose participants have not all finished: chain_id -> shards.
        # Their decisions are kept past the retention window until these report finished.
        self.chain_waiting: dict[str, set[int]] = {}
        # Chain decisions before this time (ms) may have been purged: a commit asked for a
        # chain stamped before it is refused (decided abort), since an abort may be forgotten.
        self.chains_purged_before = 0
        # Keys whose records left memory for the store (``ledger.core.spilled``).
        self.spilled = SpilledKeys()
        # Not journaled, not snapshotted: the records the owner loaded from the store for
        # the keys of the commands it is about to decide that the filters may hold:
        # (caller, key) -> (record, claim, transfer), each None if the store has none.
        # Set before a step, emptied after it.
        self.loaded: dict[tuple[str, str], tuple[IdempotencyRecord | None,
                                                 IdempotencyRecord | None,
                                                 Transfer | None]] = {}
        # Red envelopes whose shard this is, and their grabs: envelope_id -> receiver ->
        # Grab. Kept until the idempotency window after they closed (sold out or refunded).
        self.envelopes: dict[str, Envelope] = {}
        self.grabs: dict[str, dict[str, Grab]] = {}
        # Headroom grants (PROTOCOL.md, "Headroom grants"). As a credit shard: what it
        # granted each debit shard in all, and how much of it granted credits have used
        # on landing; ``granted_open`` sums what is granted and not yet landed, and every
        # wallet here keeps that much room below the ceiling. As a debit shard: what each
        # credit shard granted it, and how much of that its decided credits took.
        self.grants_out: dict[int, int] = {}
        self.grants_used: dict[int, int] = {}
        self.granted_open = 0
        self.headroom_in: dict[int, int] = {}
        self.headroom_used: dict[int, int] = {}
        # Risk controls (``ledger.core.risk``): the limits of every wallet without its own,
        # and the wallets with settings of their own or a velocity window being counted.
        self.risk_default: R.Limits = R.NO_LIMITS
        self.risk: dict[str, R.WalletRisk] = {}

    def keys_to_load(self, commands: Iterable[object]) -> list[tuple[str, str]]:
        """The (caller, key) pairs these commands use whose records may be in the store
        only: the owner loads them (into ``loaded``) before it decides the commands."""
        if not self.spilled:
            return []
        keys = set()
        for command in commands:
            inner = getattr(command, "post", command)  # a chain item carries its Post
            key = getattr(inner, "idempotency_key", None)
            if key:
                keys.add((inner.caller, key))  # type: ignore[attr-defined]
        load = []
        for k in keys:
            if k in self.idempotency and k in self.claims:
                continue
            if self.spilled.maybe(*k):
                load.append(k)
            else:
                self.loaded[k] = _NEVER_SPILLED
        return load

    def _key(self, caller: str, key: str) -> tuple[IdempotencyRecord | None,
                                                  IdempotencyRecord | None]:
        """The key's record (a request decided here) and claim (a request decided on
        another shard), from memory or, if spilled, as the owner loaded them."""
        k = (caller, key)
        record = self.idempotency.get(k)
        claim = self.claims.get(k)
        if (record is None or claim is None) and self.spilled:
            loaded = self.loaded.get(k)
            if loaded is None:
                if self.spilled.maybe(caller, key):
                    raise InvariantViolation(f"key {k!r} may be spilled and was not loaded "
                                             f"before the step")
            elif loaded is not _NEVER_SPILLED:
                record = record or loaded[0]
                claim = claim or loaded[1]
        return record, claim

    # --- decide -------------------------------------------------------------------------

    def decide(self, cmd: object) -> tuple[Outcome, list[Event]]:
        """Check ``cmd`` against the state; return its outcome and the events to journal."""
        handler = _DECIDERS[type(cmd)]
        return handler(self, cmd)

    def _claimed_for_other(self, caller: str, key: str, fingerprint: tuple,
                           target: str) -> Outcome | None:
        """The refusal if (caller, key) was claimed here for another request.

        A key is claimed on its own shard (``ClaimKey``) when the request it guards is
        decided on another shard. A request decided HERE with that key must honour the
        claim too, or a key first used for a movement decided elsewhere could be used again
        for one decided on the key's own shard, and both would execute."""
        record = self._key(caller, key)[1]
        if record is None:
            return None
        differs = _first_difference(record.fingerprint, fingerprint) or (
            "" if record.target == target else "idempotency_key")
        return _key_reused(differs) if differs else None

    def _decide_create_wallet(self, cmd: CreateWallet) -> tuple[Outcome, list[Event]]:
        fp = wallet_fingerprint(cmd.wallet_id, cmd.currency, cmd.allow_negative)
        claimed = self._claimed_for_other(cmd.caller, cmd.idempotency_key, fp,
                                          "wallet:" + cmd.wallet_id)
        if claimed is not None:
            return claimed, []
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            differs = _first_difference(record.fingerprint, fp) or (
                "" if record.target == "wallet:" + cmd.wallet_id else "wallet_id")
            if differs:
                return _key_reused(differs), []
            return ok(self.wallets[cmd.wallet_id].copy(), replayed=True), []
        if cmd.wallet_id in self.wallets:
            return refuse(Status.WALLET_EXISTS, "wallet_id", "a wallet with this id exists"), []
        event = WalletCreated(cmd.wallet_id, cmd.currency, cmd.allow_negative, cmd.now_ms,
                              cmd.caller, cmd.idempotency_key)
        wallet = Wallet(cmd.wallet_id, cmd.currency, allow_negative=cmd.allow_negative,
                        created_at_ms=cmd.now_ms)
        return ok(wallet), [event]

    def _decide_get_wallet(self, cmd: GetWallet) -> tuple[Outcome, list[Event]]:
        wallet = self.wallets.get(cmd.wallet_id)
        if wallet is None:
            return refuse(Status.WALLET_NOT_FOUND, "wallet_id", "no wallet with this id"), []
        if cmd.with_risk:
            return ok((wallet.copy(), self.risk_view(cmd.wallet_id, cmd.now_ms))), []
        return ok(wallet.copy()), []

    # --- risk controls (ledger.core.risk) -----------------------------------------------

    def risk_view(self, wallet_id: str, now_ms: int) -> R.RiskView:
        """A wallet's limits in force, whose they are, its window's use, its devices."""
        held, limits = self._limits_of(wallet_id)
        if held is None:
            return R.RiskView(limits, False, False, 0, 0, ())
        used = held.used(limits.window_ms, now_ms) if limits.window_ms else (0, 0)
        return R.RiskView(limits, held.window_ms != R.INHERIT,
                          held.step_up_above_minor != R.INHERIT, used[0], used[1],
                          tuple(held.devices))

    def _limits_of(self, wallet_id: str) -> tuple[R.WalletRisk | None, R.Limits]:
        """The wallet's own risk record (None if it has none) and the limits in force."""
        held = self.risk.get(wallet_id)
        return held, (held.limits(self.risk_default) if held is not None
                      else self.risk_default)

    def _risk_free(self, wallet_id: str) -> bool:
        """No risk control can apply to this wallet (the common case, checked first)."""
        return ((not self.risk and self.risk_default is R.NO_LIMITS)
                or wallet_id.startswith(RESERVED_PREFIX))

    def _step_up_refusal(self, wallet_id: str, amount_minor: int,
                         device_id: str) -> Outcome | None:
        if self._risk_free(wallet_id):
            return None
        held, limits = self._limits_of(wallet_id)
        threshold = limits.step_up_above_minor
        if not threshold or amount_minor <= threshold:
            return None
        if held is not None and device_id and device_id in held.devices:
            return None
        return refuse(Status.STEP_UP_REQUIRED, "device_id",
                      "amount_minor is above the wallet's step-up threshold and "
                      + ("device_id is not a device the wallet confirmed" if device_id
                         else "the request names no device_id"))

    def _velocity_refusal(self, wallet_id: str, amount_minor: int, now_ms: int,
                          wallet_field: str) -> Outcome | None:
        if self._risk_free(wallet_id):
            return None
        held, limits = self._limits_of(wallet_id)
        if not limits.window_ms:
            return None
        amount, count = held.used(limits.window_ms, now_ms) if held is not None else (0, 0)
        window = f"rolling {limits.window_ms // 1000} s window"
        if limits.max_count and count + 1 > limits.max_count:
            return refuse(Status.VELOCITY_LIMIT_EXCEEDED, wallet_field,
                          f"{wallet_field} made {count} debits in its {window}, its limit "
                          f"is {limits.max_count}")
        if limits.max_amount_minor and amount + amount_minor > limits.max_amount_minor:
            return refuse(Status.VELOCITY_LIMIT_EXCEEDED, "amount_minor",
                          f"would take {wallet_field}'s debits in its {window} to "
                          f"{amount + amount_minor}, its limit is {limits.max_amount_minor}")
        return None

    def _note_debit(self, wallet_id: str, amount_minor: int, at_ms: int) -> None:
        """Count a decided debit in the wallet's velocity window, if a limit is in force."""
        if self._risk_free(wallet_id):
            return
        held, limits = self._limits_of(wallet_id)
        window = limits.window_ms
        if not window:
            return
        if held is None:
            held = self.risk[wallet_id] = R.WalletRisk(wallet_id)
        held.note_debit(window, amount_minor, at_ms)

    def _decide_set_risk_limits(self, cmd: SetRiskLimits) -> tuple[Outcome, list[Event]]:
        if cmd.wallet_id:
            if cmd.wallet_id not in self.wallets:
                return refuse(Status.WALLET_NOT_FOUND, "wallet_id", "no wallet with this id"), []
            held = self.risk.get(cmd.wallet_id) or R.WalletRisk(cmd.wallet_id)
            now = (held.window_ms, held.max_amount_minor, held.max_count,
                   held.step_up_above_minor)
        else:
            d = self.risk_default
            now = (d.window_ms, d.max_amount_minor, d.max_count, d.step_up_above_minor)
        wanted = (cmd.window_ms, cmd.max_amount_minor, cmd.max_count, cmd.step_up_above_minor)
        if now == wanted:
            return ok(), []
        return ok(), [RiskLimitsSet(cmd.wallet_id, *wanted, cmd.reason, cmd.caller,
                                    cmd.now_ms)]

    def _decide_confirm_device(self, cmd: ConfirmDevice) -> tuple[Outcome, list[Event]]:
        if cmd.wallet_id not in self.wallets:
            return refuse(Status.WALLET_NOT_FOUND, "wallet_id", "no wallet with this id"), []
        held = self.risk.get(cmd.wallet_id)
        known = held is not None and cmd.device_id in held.devices
        if known == cmd.confirmed:
            return ok(), []
        return ok(), [DeviceConfirmed(cmd.wallet_id, cmd.device_id, cmd.confirmed, cmd.reason,
                                      cmd.caller, cmd.now_ms)]

    def _decide_get_head(self, cmd: GetHead) -> tuple[Outcome, list[Event]]:
        # The live state's seq advances only once an append is durable (ledger.owner).
        return ok(self.seq), []

    def _decide_note_admin(self, cmd: NoteAdmin) -> tuple[Outcome, list[Event]]:
        if not cmd.action:
            return refuse(Status.INVALID_ARGUMENT, "action", "an admin note needs an action"), []
        return ok(), [AdminNoted(cmd.action, cmd.principal, cmd.subject, cmd.detail,
                                 cmd.change_id, cmd.now_ms)]

    def _decide_set_frozen(self, cmd: SetFrozen) -> tuple[Outcome, list[Event]]:
        wallet = self.wallets.get(cmd.wallet_id)
        if wallet is None:
            return refuse(Status.WALLET_NOT_FOUND, "wallet_id", "no wallet with this id"), []
        if wallet.frozen == cmd.frozen:
            return ok(wallet.copy()), []
        after = wallet.copy()
        after.frozen = cmd.frozen
        return ok(after), [WalletFrozen(cmd.wallet_id, cmd.frozen, cmd.reason, cmd.caller,
                                        cmd.now_ms)]

    def _decide_get_transfer(self, cmd: GetTransfer) -> tuple[Outcome, list[Event]]:
        transfer = self.transfers.get(cmd.transfer_id)
        if transfer is None:
            return refuse(Status.TRANSFER_NOT_FOUND, "transfer_id", "no transfer with this id"), []
        return ok(transfer.copy()), []

    def _decide_post(self, cmd: Post) -> tuple[Outcome, list[Event]]:
        fp = transfer_fingerprint(cmd.kind, cmd.from_wallet_id, cmd.to_wallet_id,
                                  cmd.amount_minor, cmd.currency, cmd.memo)
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            differs = _first_difference(record.fingerprint, fp)
            if differs:
                return _key_reused(differs), []
            return self._replay_transfer(record), []
        claimed = self._claimed_for_other(cmd.caller, cmd.idempotency_key, fp,
                                          "transfer:" + cmd.transfer_id)
        if claimed is not None:
            return claimed, []
        kept = self._kept_transfer(cmd.transfer_id, fp)
        if kept is not None:
            return kept, []
        lapsed = self._lapsed(cmd.transfer_id, cmd.reserved_at_ms)
        if lapsed is not None:
            return lapsed, []

        if cmd.credit_refusal is not None:
            status, field_name, detail = cmd.credit_refusal
            refusal: Outcome | None = refuse(Status(status), field_name, detail)
        else:
            refusal = self._check_post(cmd)
        if refusal is not None and not refusal.status.recorded():
            return refusal, []
        transfer = Transfer(cmd.transfer_id, cmd.kind, cmd.from_wallet_id, cmd.to_wallet_id,
                            cmd.amount_minor, cmd.currency, cmd.memo, cmd.caller,
                            cmd.idempotency_key, cmd.now_ms)
        outbox_seq = 0
        if refusal is not None:
            transfer.state = STATE_REFUSED
            transfer.status = int(refusal.status)
            transfer.status_field = refusal.field
            transfer.status_detail = refusal.detail
            outcome = Outcome(refusal.status, refusal.field, refusal.detail, transfer.copy())
        else:
            if cmd.to_shard == self.shard:
                transfer.credited = True
            else:
                outbox_seq = self.outbox_last_seq.get(cmd.to_shard, 0) + 1
            outcome = ok(transfer.copy())
        return outcome, [TransferDecided(transfer, cmd.to_shard, outbox_seq, "",
                                         cmd.reserved_at_ms if outbox_seq else 0)]

    def _kept_transfer(self, transfer_id: str, fp: tuple) -> Outcome | None:
        """A transfer this key names that outlived its key record (its credit still owed,
        or its chain undecided, past the retention window): answer from it, never decide
        the same transfer id twice."""
        kept = self.transfers.get(transfer_id)
        if kept is None:
            return None
        differs = _first_difference(transfer_fingerprint(
            kept.kind, kept.from_wallet_id, kept.to_wallet_id, kept.amount_minor, kept.currency,
            kept.memo), fp)
        if differs:
            return _key_reused(differs)
        return self._replay_transfer(IdempotencyRecord(kept.caller, kept.idempotency_key,
                                                       "transfer:" + transfer_id, fp, 0))

    def _replay_transfer(self, record: IdempotencyRecord) -> Outcome:
        original = self.transfers.get(record.target[len("transfer:"):])
        if original is None:
            loaded = self.loaded.get((record.caller, record.idempotency_key))
            original = loaded[2] if loaded is not None else None
        if original is None:  # the check ensure() makes, spelled out so the type narrows
            raise InvariantViolation(f"idempotency record {record.target} without its transfer")
        if original.state == STATE_PENDING:
            return refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key",
                          "the linked chain of this key is being decided; retry")
        return Outcome(Status(original.status), original.status_field, original.status_detail,
                       original.copy(), replayed=True)

    def _check_post(self, cmd: Post) -> Outcome | None:
        """Why ``cmd`` must be refused, or None. Checks in precedence order."""
        source = self._account(cmd.from_wallet_id, cmd.currency, cmd.kind == KIND_DEPOSIT)
        if source is None:
            return refuse(Status.WALLET_NOT_FOUND, "from_wallet_id", "no wallet with this id")
        local_credit = cmd.to_shard == self.shard
        target = None
        if local_credit:
            target = self._account(cmd.to_wallet_id, cmd.currency, cmd.kind == KIND_WITHDRAWAL)
            if target is None:
                return refuse(Status.WALLET_NOT_FOUND, "to_wallet_id", "no wallet with this id")
        if source.currency != cmd.currency:
            return refuse(Status.CURRENCY_MISMATCH, "currency",
                          f"from_wallet_id holds {source.currency}")
        if target is not None and target.currency != cmd.currency:
            return refuse(Status.CURRENCY_MISMATCH, "currency",
                          f"to_wallet_id holds {target.currency}")
        if source.frozen:
            return refuse(Status.WALLET_FROZEN, "from_wallet_id", "wallet is frozen")
        stepped = self._step_up_refusal(cmd.from_wallet_id, cmd.amount_minor, cmd.device_id)
        if stepped is not None:
            return stepped
        if source.allow_negative:
            overflow = _debit_overflow(source, cmd.amount_minor)
            if overflow is not None:
                return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                              f"would take from_wallet_id's {overflow} out of the int64 range")
        elif source.available_minor < cmd.amount_minor:
            return refuse(Status.INSUFFICIENT_FUNDS, "amount_minor",
                          "from_wallet_id has less available than amount_minor")
        if target is not None:
            if cmd.amount_minor > self._headroom(target):
                return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                              "would take to_wallet_id past the int64 range")
        return self._velocity_refusal(cmd.from_wallet_id, cmd.amount_minor, cmd.now_ms,
                                      "from_wallet_id")

    def _account(self, wallet_id: str, currency: str, settlement_ok: bool) -> Wallet | None:
        """The wallet, or a fresh settlement sub-account (they exist implicitly)."""
        wallet = self.wallets.get(wallet_id)
        if wallet is None and settlement_ok and is_settlement(wallet_id):
            wallet = Wallet(wallet_id, currency, allow_negative=True)
        return wallet

    def _decide_reserve_credit(self, cmd: ReserveCredit) -> tuple[Outcome, list[Event]]:
        wallet = self.wallets.get(cmd.wallet_id)
        if wallet is None:
            return refuse(Status.WALLET_NOT_FOUND, "to_wallet_id", "no wallet with this id"), []
        if wallet.currency != cmd.currency:
            return refuse(Status.CURRENCY_MISMATCH, "currency",
                          f"to_wallet_id holds {wallet.currency}"), []
        held = self.reservations.get(cmd.transfer_id)
        if held is not None:
            # Reserved before (a retry, or a concurrent attempt of the same key): the same
            # reservation, if it is the same credit.
            if held[0] != cmd.wallet_id:
                return _key_reused("to_wallet_id"), []
            if held[1] != cmd.amount_minor:
                return _key_reused("amount_minor"), []
            return ok(held[2]), []
        if cmd.amount_minor > self._headroom(wallet):
            return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                          "would take to_wallet_id past the int64 range"), []
        return ok(cmd.now_ms), [CreditReserved(cmd.transfer_id, cmd.wallet_id, cmd.amount_minor,
                                               cmd.now_ms)]

    def _decide_cancel_reservation(self, cmd: CancelReservation) -> tuple[Outcome, list[Event]]:
        held = self.reservations.get(cmd.transfer_id)
        if held is None or held[2] != cmd.reserved_at_ms:
            return ok(), []
        return ok(), [ReservationsDropped(((cmd.transfer_id, cmd.reserved_at_ms),))]

    def _decide_drop_reservations(self, cmd: DropReservations) -> tuple[Outcome, list[Event]]:
        items = tuple((tid, at) for tid, at in cmd.items
                      if (held := self.reservations.get(tid)) is not None and held[2] == at)
        return ok(len(items)), [ReservationsDropped(items)] if items else []

    def stale_reservations(self, before_ms: int) -> dict[int, list[tuple[str, int]]]:
        """Reservations made before ``before_ms``, by the debit shard that decides them (the
        shard is in the transfer id): the credit shard asks it whether a credit is coming."""
        out: dict[int, list[tuple[str, int]]] = {}
        for tid, (_, _, at) in self.reservations.items():
            if at < before_ms and debit_shard_of(tid) >= 0:
                out.setdefault(debit_shard_of(tid), []).append((tid, at))
        return out

    def _decide_resolve_reservations(self, cmd: ResolveReservations
                                     ) -> tuple[Outcome, list[Event]]:
        """Keep (True) or drop (False) each reservation asked about; see the command."""
        owed = {c.transfer_id: c for items in self.outbox.values() for c in items.values()}
        answers: list[bool] = []
        fence: list[tuple[str, int]] = []
        for tid, at in cmd.items:
            transfer = self.transfers.get(tid)
            if transfer is None:
                fenced = self.fenced.get(tid)
                if fenced is None or fenced[0] != at:
                    fence.append((tid, at))
                answers.append(False)
            elif transfer.state == STATE_PENDING:
                answers.append(True)  # a chain item: its decision may still commit it
            elif transfer.state == STATE_COMMITTED:
                credit = owed.get(tid)
                answers.append(credit is not None and credit.reserved_at_ms in (at, 0))
            else:
                answers.append(False)  # refused for good
        events: list[Event] = [ReservationsFenced(tuple(fence), cmd.now_ms)] if fence else []
        return ok(tuple(answers)), events

    def _headroom(self, wallet: Wallet) -> int:
        """How much more may be credited to ``wallet`` now: the room below the int64 ceiling
        less the credits reserved for it and the headroom granted to debit shards (which
        any wallet here may receive)."""
        return (C.AMOUNT_MINOR_MAX - wallet.balance_minor - self.incoming.get(wallet.wallet_id, 0)
                - self.granted_open)

    def _decide_grant_headroom(self, cmd: GrantHeadroom) -> tuple[Outcome, list[Event]]:
        granted = self.grants_out.get(cmd.to_shard, 0)
        if cmd.total_minor <= granted:
            return ok(granted), []  # granted before (a retry, or a racing coordinator)
        if cmd.to_shard == self.shard or not 0 < cmd.total_minor <= C.AMOUNT_MINOR_MAX:
            return refuse(Status.INVALID_ARGUMENT, "total_minor", "not a grant"), []
        more = cmd.total_minor - granted
        # Every wallet must keep the new room: the fullest one decides (a scan, but a debit
        # shard asks once per HEADROOM_GRANT_MINOR of credits).
        incoming = self.incoming
        fullest = max((w.balance_minor + incoming.get(w.wallet_id, 0)
                       for w in self.wallets.values()), default=0)
        if fullest + self.granted_open + more > C.AMOUNT_MINOR_MAX:
            return refuse(Status.BALANCE_OVERFLOW, "total_minor",
                          "a wallet of the credit shard is too close to the int64 range"), []
        return ok(cmd.total_minor), [HeadroomGranted(cmd.to_shard, cmd.total_minor)]

    def _decide_note_headroom(self, cmd: NoteHeadroom) -> tuple[Outcome, list[Event]]:
        if cmd.total_minor <= self.headroom_in.get(cmd.from_shard, 0):
            return ok(), []
        return ok(), [HeadroomNoted(cmd.from_shard, cmd.total_minor)]

    def headroom_left(self, credit_shard: int) -> int:
        """How much more this shard may owe ``credit_shard`` under its grant."""
        return self.headroom_in.get(credit_shard, 0) - self.headroom_used.get(credit_shard, 0)

    def _lapsed(self, transfer_id: str, reserved_at_ms: int) -> Outcome | None:
        """A Post under a reservation the debit shard fenced (its credit shard asked, and
        it had not been decided): refused, not recorded; the client's retry reserves anew."""
        if reserved_at_ms < 0:
            # Only a grab may owe its credit under a headroom grant (it checks the grant;
            # ``_decide_grab_envelope`` passes 0 here).
            return refuse(Status.INVALID_ARGUMENT, "reserved_at_ms",
                          "only grabs owe credits under a headroom grant")
        fenced = self.fenced.get(transfer_id)
        if reserved_at_ms and fenced is not None and fenced[0] == reserved_at_ms:
            return refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key",
                          "the credit reservation of this transfer lapsed; retry")
        return None

    def _drop_reservation(self, transfer_id: str) -> None:
        reservation = self.reservations.pop(transfer_id, None)
        if reservation is not None:
            wallet_id, amount, _ = reservation
            left = self.incoming[wallet_id] - amount
            if left:
                self.incoming[wallet_id] = left
            else:
                del self.incoming[wallet_id]

    def _decide_apply_credits(self, cmd: ApplyCredits) -> tuple[Outcome, list[Event]]:
        applied = self.inbox_applied.get(cmd.from_shard, 0)
        fresh: list[Credit] = []
        for credit in cmd.credits:
            if credit.outbox_seq <= applied:
                continue  # delivered before: exactly once
            if credit.outbox_seq != applied + 1:
                break  # a gap: the sender resends from applied + 1
            wallet = self.wallets.get(credit.to_wallet_id)
            ensure(wallet is not None and wallet.currency == credit.currency,
                   "credit %s to %s does not match a reserved wallet", credit.transfer_id,
                   credit.to_wallet_id)
            fresh.append(credit)
            applied = credit.outbox_seq
        # The value is the highest sequence applied after this command: the sender's ack.
        if not fresh:
            return ok(applied), []
        return ok(applied), [CreditsApplied(cmd.from_shard, tuple(fresh))]

    def _decide_ack_outbox(self, cmd: AckOutbox) -> tuple[Outcome, list[Event]]:
        pending = self.outbox.get(cmd.to_shard)
        if not pending or min(pending) > cmd.up_to_seq:
            return ok(), []
        return ok(), [OutboxAcked(cmd.to_shard, cmd.up_to_seq)]

    def _decide_expire_idempotency(self, cmd: ExpireIdempotency) -> tuple[Outcome, list[Event]]:
        if not self.spilled.expirable(cmd.before_ms) and \
                not any(r.created_at_ms < cmd.before_ms for r in self.idempotency.values()) and \
                not any(r.created_at_ms < cmd.before_ms for r in self.claims.values()) and \
                not any(at < cmd.before_ms for _, at in self.fenced.values()) and \
                not any(at < cmd.before_ms and c not in self.chain_waiting
                        for c, (_, at) in self.chains.items()) and \
                not any(0 < e.closed_at_ms < cmd.before_ms for e in self.envelopes.values()):
            return ok(0), []
        return ok(), [IdempotencyExpired(cmd.before_ms)]

    def _decide_spill_idempotency(self, cmd: SpillIdempotency) -> tuple[Outcome, list[Event]]:
        owed = self._owed()
        if any(self._spillable(r, owed) for r in self.idempotency.values()
               if r.created_at_ms < cmd.before_ms) or any(
                r.created_at_ms < cmd.before_ms for r in self.claims.values()):
            return ok(), [IdempotencySpilled(cmd.before_ms)]
        return ok(0), []

    def _owed(self) -> set[str]:
        """Transfer ids whose credit this shard still owes (in its outbox)."""
        return {c.transfer_id for items in self.outbox.values() for c in items.values()}

    def _spillable(self, record: IdempotencyRecord, owed: set[str]) -> bool:
        """A money movement's record whose transfer is finished here: decided (not a
        pending chain item) and its credit no longer owed. Wallet, hold and release records
        stay in memory until they expire (they are few: one per wallet or hold)."""
        if not record.target.startswith("transfer:"):
            return False
        tid = record.target[len("transfer:"):]
        transfer = self.transfers.get(tid)
        if transfer is not None and transfer.state == STATE_PENDING:
            return False
        return tid not in owed

    def _decide_claim_key(self, cmd: ClaimKey) -> tuple[Outcome, list[Event]]:
        key = (cmd.caller, cmd.idempotency_key)
        # The key may have been claimed here, or used by a request decided on this shard.
        target = claim_target(cmd)
        for record in self._key(*key)[::-1]:
            if record is None:
                continue
            differs = _first_difference(record.fingerprint, cmd.fingerprint) or (
                "" if record.target == target else "idempotency_key")
            if differs:
                return _key_reused(differs), []
            return ok(record.target, replayed=True), []
        return ok(), [KeyClaimed(cmd.caller, cmd.idempotency_key, cmd.fingerprint,
                                 cmd.transfer_id, cmd.now_ms, cmd.target)]

    # --- red envelopes ------------------------------------------------------------------

    def _decide_open_envelope(self, cmd: OpenEnvelope) -> tuple[Outcome, list[Event]]:
        new = cmd.envelope
        held = self.envelopes.get(new.envelope_id)
        if held is not None:
            differs = _first_difference(envelope_terms(held), envelope_terms(new))
            if differs:
                return _key_reused(differs), []
            return ok(held.copy(), replayed=True), []
        ensure(escrow_wallet_id(new.envelope_id) not in self.wallets,
               "escrow of %s exists without its envelope", new.envelope_id)
        return ok(new.copy()), [EnvelopeOpened(new.copy())]

    def _decide_get_envelope(self, cmd: GetEnvelope) -> tuple[Outcome, list[Event]]:
        envelope = self.envelopes.get(cmd.envelope_id)
        if envelope is None:
            return refuse(Status.ENVELOPE_NOT_FOUND, "envelope_id",
                          "no envelope with this id"), []
        grabs = sorted(self.grabs.get(cmd.envelope_id, {}).values(), key=_position)
        return ok((envelope.copy(), grabs)), []

    def _decide_grab_envelope(self, cmd: GrabEnvelope) -> tuple[Outcome, list[Event]]:
        """One grab, in precedence order: the envelope exists; a retry of this key gets its
        grab again; one grab per receiver; an exclusive envelope is for its receiver only;
        the receiver can take the credit; the envelope is live, funded and not sold out."""
        envelope = self.envelopes.get(cmd.envelope_id)
        if envelope is None:
            return refuse(Status.ENVELOPE_NOT_FOUND, "envelope_id",
                          "no envelope with this id"), []
        grabs = self.grabs.get(cmd.envelope_id, {})
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            replay = self._replay_transfer(record)
            receiver = replay.value.to_wallet_id if replay.value is not None else ""
            if receiver != cmd.receiver_wallet_id:
                return _key_reused("receiver_wallet_id"), []
            return Outcome(replay.status, replay.field, replay.detail,
                           (grabs[receiver], replay.value), replayed=True), []
        prior = grabs.get(cmd.receiver_wallet_id)
        if prior is not None:
            return Outcome(Status.ENVELOPE_ALREADY_GRABBED, "receiver_wallet_id",
                           f"this wallet grabbed {prior.amount_minor} from the envelope before",
                           (prior, None)), []
        if envelope.receiver_wallet_id and envelope.receiver_wallet_id != cmd.receiver_wallet_id:
            return refuse(Status.ENVELOPE_NOT_ELIGIBLE, "receiver_wallet_id",
                          "the envelope is for another wallet"), []
        if cmd.credit_refusal is not None:
            status, _, detail = cmd.credit_refusal
            return refuse(Status(status), "receiver_wallet_id", detail), []
        if envelope.refund_transfer_id or cmd.now_ms >= envelope.expires_at_ms:
            return refuse(Status.ENVELOPE_EXPIRED, "envelope_id", "the envelope has expired"), []
        if not envelope.funded_at_ms:
            if envelope.closed_at_ms or (
                    cmd.now_ms - envelope.created_at_ms > C.ENVELOPE_FUNDING_WAIT_MS):
                return refuse(Status.ENVELOPE_UNFUNDED, "envelope_id",
                              "the sender's money never reached the envelope"), []
            return refuse(Status.REQUEST_IN_FLIGHT, "envelope_id",
                          "the envelope's money has not reached it yet; retry"), []
        if envelope.left_shares == 0:
            return refuse(Status.ENVELOPE_SOLD_OUT, "envelope_id",
                          "every share of the envelope is taken"), []
        lapsed = self._lapsed(cmd.transfer_id, max(cmd.reserved_at_ms, 0))
        if lapsed is not None:
            return lapsed, []
        local = cmd.receiver_shard == self.shard
        if local:
            refusal = self._credit_refusal(cmd.receiver_wallet_id, envelope.currency,
                                           envelope.left_minor, "receiver_wallet_id")
            if refusal is not None:
                return refusal, []
        position = envelope.shares - envelope.left_shares
        amount = split.share_amount(envelope.kind, envelope.seed, position,
                                    envelope.total_minor, envelope.shares, envelope.left_minor,
                                    envelope.left_shares, envelope.min_share_minor)
        ensure(local or amount <= C.ENVELOPE_TOTAL_MINOR_CEILING,
               "share of %s larger than a grab's reservation", cmd.envelope_id)
        if not local and cmd.reserved_at_ms == C.UNDER_GRANT \
                and amount > self.headroom_left(cmd.receiver_shard):
            # Not decided: the coordinator gets more headroom granted and sends it again
            # (this answer never reaches a client).
            return Outcome(Status.REQUEST_IN_FLIGHT, HEADROOM_NEEDED,
                           "the receiver's shard has not granted enough headroom yet",
                           (cmd.receiver_shard, self.headroom_in.get(cmd.receiver_shard, 0))), []
        grab = Grab(cmd.envelope_id, position, cmd.receiver_wallet_id, amount, cmd.transfer_id,
                    cmd.caller, cmd.idempotency_key, cmd.now_ms)
        transfer = Transfer(cmd.transfer_id, KIND_ENVELOPE_GRAB,
                            escrow_wallet_id(cmd.envelope_id), cmd.receiver_wallet_id, amount,
                            envelope.currency, envelope.memo, cmd.caller, cmd.idempotency_key,
                            cmd.now_ms, credited=local)
        outbox_seq = 0 if local else self.outbox_last_seq.get(cmd.receiver_shard, 0) + 1
        return ok((grab, transfer.copy())), [
            EnvelopeGrabbed(grab),
            TransferDecided(transfer, cmd.receiver_shard, outbox_seq, "",
                            cmd.reserved_at_ms if outbox_seq else 0)]

    def _credit_refusal(self, wallet_id: str, currency: str, amount: int,
                        field_name: str) -> Outcome | None:
        """Why a credit of ``amount`` to a wallet of this shard cannot be owed, or None (the
        checks ``ReserveCredit`` makes for a wallet of another shard)."""
        wallet = self.wallets.get(wallet_id)
        if wallet is None:
            return refuse(Status.WALLET_NOT_FOUND, field_name, "no wallet with this id")
        if wallet.currency != currency:
            return refuse(Status.CURRENCY_MISMATCH, field_name,
                          f"{field_name} holds {wallet.currency}, the envelope {currency}")
        if amount > self._headroom(wallet):
            return refuse(Status.BALANCE_OVERFLOW, field_name,
                          f"would take {field_name} past the int64 range")
        return None

    def refund_transfer_id(self, envelope: Envelope) -> str:
        return transfer_id_for(self.shard, envelope.caller, refund_key(envelope.envelope_id))

    def expired_envelopes(self, now_ms: int) -> list[Envelope]:
        """Funded envelopes past their expiry with money left: the sweep refunds them."""
        return [e.copy() for e in self.envelopes.values()
                if e.funded_at_ms and not e.refund_transfer_id and e.left_minor
                and now_ms >= e.expires_at_ms]

    def _decide_abandon_envelope(self, cmd: AbandonEnvelope) -> tuple[Outcome, list[Event]]:
        envelope = self.envelopes.get(cmd.envelope_id)
        if envelope is None or envelope.funded_at_ms or envelope.closed_at_ms \
                or envelope.funding_transfer_id != cmd.funding_transfer_id:
            return ok(None), []
        return ok(None), [EnvelopeAbandoned(cmd.envelope_id, cmd.now_ms)]

    def _decide_refund_envelope(self, cmd: RefundEnvelope) -> tuple[Outcome, list[Event]]:
        envelope = self.envelopes.get(cmd.envelope_id)
        if envelope is None or envelope.refund_transfer_id or not envelope.funded_at_ms \
                or not envelope.left_minor or cmd.now_ms < envelope.expires_at_ms:
            return ok(None), []  # nothing to refund (or refunded before)
        tid = self.refund_transfer_id(envelope)
        lapsed = self._lapsed(tid, cmd.reserved_at_ms)
        if lapsed is not None:
            return lapsed, []
        sender_shard = debit_shard_of(envelope.funding_transfer_id)
        ensure(sender_shard >= 0, "envelope %s has no sender shard", envelope.envelope_id)
        local = sender_shard == self.shard
        if local:
            refusal = self._credit_refusal(envelope.sender_wallet_id, envelope.currency,
                                           envelope.left_minor, "sender_wallet_id")
            if refusal is not None:
                return refusal, []  # not decided: the next sweep tries again
        elif not cmd.reserved_at_ms:
            return refuse(Status.INVALID_ARGUMENT, "reserved_at_ms",
                          "a refund to another shard needs its reservation"), []
        transfer = Transfer(tid, KIND_ENVELOPE_REFUND, escrow_wallet_id(envelope.envelope_id),
                            envelope.sender_wallet_id, envelope.left_minor, envelope.currency,
                            envelope.memo, envelope.caller, refund_key(envelope.envelope_id),
                            cmd.now_ms, credited=local)
        outbox_seq = 0 if local else self.outbox_last_seq.get(sender_shard, 0) + 1
        return ok(transfer.copy()), [
            EnvelopeRefunded(envelope.envelope_id, envelope.left_minor, tid, cmd.now_ms),
            TransferDecided(transfer, sender_shard, outbox_seq, "",
                            cmd.reserved_at_ms if outbox_seq else 0)]

    # --- holds --------------------------------------------------------------------------

    def _decide_create_hold(self, cmd: CreateHold) -> tuple[Outcome, list[Event]]:
        fp = hold_fingerprint(cmd.wallet_id, cmd.amount_minor, cmd.currency, cmd.timeout_ms)
        claimed = self._claimed_for_other(cmd.caller, cmd.idempotency_key, fp,
                                          "hold:" + cmd.hold_id)
        if claimed is not None:
            return claimed, []
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            differs = _first_difference(record.fingerprint, fp) or (
                "" if record.target == "hold:" + cmd.hold_id else "idempotency_key")
            if differs:
                return _key_reused(differs), []
            return ok(self.holds[cmd.hold_id].copy(), replayed=True), []
        # The coordinator refuses these first (the same checks); the core does not rely on it.
        bad = validate.amount(cmd.amount_minor) or validate.hold_timeout(cmd.timeout_ms)
        if bad:
            return bad, []
        existing = self.holds.get(cmd.hold_id)
        if existing is not None:
            # The hold this key names is still here, its key record is not (the retry came
            # after the idempotency retention window; holds may last longer): answer from the
            # hold itself, never create it twice.
            differs = _first_difference(hold_fingerprint(
                existing.wallet_id, existing.amount_minor, existing.currency,
                existing.expires_at_ms - existing.created_at_ms), fp)
            if differs:
                return _key_reused(differs), []
            return ok(existing.copy(), replayed=True), []
        wallet = self.wallets.get(cmd.wallet_id)
        if wallet is None:
            return refuse(Status.WALLET_NOT_FOUND, "wallet_id", "no wallet with this id"), []
        if wallet.currency != cmd.currency:
            return refuse(Status.CURRENCY_MISMATCH, "currency",
                          f"wallet_id holds {wallet.currency}"), []
        if wallet.frozen:
            return refuse(Status.WALLET_FROZEN, "wallet_id", "wallet is frozen"), []
        stepped = self._step_up_refusal(cmd.wallet_id, cmd.amount_minor, cmd.device_id)
        if stepped is not None:
            return stepped, []
        if wallet.allow_negative:
            overflow = _debit_overflow(wallet, cmd.amount_minor)
            if overflow is not None:
                return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                              f"would take wallet_id's {overflow} out of the int64 range"), []
        elif wallet.available_minor < cmd.amount_minor:
            return refuse(Status.INSUFFICIENT_FUNDS, "amount_minor",
                          "wallet_id has less available than amount_minor"), []
        fast = self._velocity_refusal(cmd.wallet_id, cmd.amount_minor, cmd.now_ms, "wallet_id")
        if fast is not None:
            # Not recorded as a hold (a hold has no refused state): answered, not journaled.
            return fast, []
        hold = Hold(cmd.hold_id, cmd.wallet_id, cmd.currency, cmd.amount_minor, cmd.caller,
                    cmd.idempotency_key, cmd.now_ms, cmd.now_ms + cmd.timeout_ms)
        return ok(hold.copy()), [HoldCreated(hold)]

    def _active_hold(self, hold_id: str, now_ms: int) -> Hold | Outcome:
        hold = self.holds.get(hold_id)
        if hold is None or hold.chain_id:
            return refuse(Status.HOLD_NOT_FOUND, "hold_id", "no hold with this id")
        if hold.state != HOLD_HELD:
            return refuse(Status.HOLD_NOT_ACTIVE, "hold_id", f"hold is {hold.state.lower()}")
        if now_ms >= hold.expires_at_ms:
            return refuse(Status.HOLD_NOT_ACTIVE, "hold_id", "hold has expired")
        return hold

    def _expiry_made_durable(self, hold_id: str, now_ms: int) -> list[Event]:
        """A capture or release refused because its hold has expired (by the request's
        clock) while the sweep has not yet expired it: journal the expiry with the refusal.
        Otherwise an older copy of a request, stamped before the expiry and delivered late,
        could still capture or release the hold the caller was told had expired."""
        hold = self.holds.get(hold_id)
        if (hold is None or hold.chain_id or hold.state != HOLD_HELD
                or now_ms < hold.expires_at_ms):
            return []
        return [HoldReleased(hold_id, HOLD_EXPIRED, now_ms)]

    def _decide_capture_hold(self, cmd: CaptureHold) -> tuple[Outcome, list[Event]]:
        known = self.holds.get(cmd.hold_id)
        # The fingerprint holds the amount captured: "all" (0) is the hold's amount.
        resolved = cmd.amount_minor or (known.amount_minor if known is not None else 0)
        fp = capture_fingerprint(cmd.hold_id, cmd.to_wallet_id, resolved, cmd.memo)
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            differs = _first_difference(record.fingerprint, fp)
            if differs:
                return _key_reused(differs), []
            return self._replay_transfer(record), []
        claimed = self._claimed_for_other(cmd.caller, cmd.idempotency_key, fp,
                                          "transfer:" + cmd.transfer_id)
        if claimed is not None:
            return claimed, []
        if cmd.transfer_id in self.transfers:
            # Decided before, key record purged (past retention): the hold is closed now.
            return refuse(Status.HOLD_NOT_ACTIVE, "hold_id",
                          "this capture was decided before the idempotency retention window"), []
        lapsed = self._lapsed(cmd.transfer_id, cmd.reserved_at_ms)
        if lapsed is not None:
            return lapsed, []
        hold = self._active_hold(cmd.hold_id, cmd.now_ms)
        if isinstance(hold, Outcome):
            return hold, self._expiry_made_durable(cmd.hold_id, cmd.now_ms)
        if cmd.to_wallet_id == hold.wallet_id:
            # Bad input, not a decision: nothing is journaled. (The hold's wallet and the
            # target are then on this shard: only the core, holding the hold, can tell.)
            return refuse(Status.SAME_WALLET, "to_wallet_id", "is the hold's own wallet"), []
        amount = resolved
        refusal: Outcome | None = None
        if amount > hold.amount_minor:
            refusal = refuse(Status.HOLD_AMOUNT_EXCEEDED, "amount_minor",
                             f"the hold reserves {hold.amount_minor}")
        elif cmd.credit_refusal is not None:
            refusal = refuse(Status(cmd.credit_refusal[0]), *cmd.credit_refusal[1:])
        elif cmd.to_shard == self.shard:
            target = self.wallets.get(cmd.to_wallet_id)
            if target is None:
                return refuse(Status.WALLET_NOT_FOUND, "to_wallet_id",
                              "no wallet with this id"), []
            if target.currency != hold.currency:
                refusal = refuse(Status.CURRENCY_MISMATCH, "to_wallet_id",
                                 f"to_wallet_id holds {target.currency}")
            elif amount > self._headroom(target):
                refusal = refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                                 "would take to_wallet_id past the int64 range")
        if refusal is not None and not refusal.status.recorded():
            return refusal, []
        transfer = Transfer(cmd.transfer_id, KIND_HOLD_CAPTURE, hold.wallet_id, cmd.to_wallet_id,
                            amount, hold.currency, cmd.memo, cmd.caller, cmd.idempotency_key,
                            cmd.now_ms)
        if refusal is not None:
            transfer.state, transfer.status = STATE_REFUSED, int(refusal.status)
            transfer.status_field, transfer.status_detail = refusal.field, refusal.detail
            event = TransferDecided(transfer, cmd.to_shard, 0, hold.hold_id)
            return Outcome(refusal.status, refusal.field, refusal.detail, transfer.copy()), [event]
        local = cmd.to_shard == self.shard
        transfer.credited = local
        seq = 0 if local else self.outbox_last_seq.get(cmd.to_shard, 0) + 1
        return ok(transfer.copy()), [TransferDecided(transfer, cmd.to_shard, seq, hold.hold_id,
                                                     cmd.reserved_at_ms if seq else 0)]

    def _decide_release_hold(self, cmd: ReleaseHold) -> tuple[Outcome, list[Event]]:
        fp = release_fingerprint(cmd.hold_id)
        claimed = self._claimed_for_other(cmd.caller, cmd.idempotency_key, fp,
                                          "release:" + cmd.hold_id)
        if claimed is not None:
            return claimed, []
        record = self._key(cmd.caller, cmd.idempotency_key)[0]
        if record is not None:
            differs = _first_difference(record.fingerprint, fp) or (
                "" if record.target == "release:" + cmd.hold_id else "idempotency_key")
            if differs:
                return _key_reused(differs), []
            return ok(self.holds[cmd.hold_id].copy(), replayed=True), []
        hold = self._active_hold(cmd.hold_id, cmd.now_ms)
        if isinstance(hold, Outcome):
            return hold, self._expiry_made_durable(cmd.hold_id, cmd.now_ms)
        event = HoldReleased(hold.hold_id, HOLD_RELEASED, cmd.now_ms, cmd.caller,
                             cmd.idempotency_key)
        released = hold.copy()
        released.state, released.closed_at_ms = HOLD_RELEASED, cmd.now_ms
        return ok(released), [event]

    def _decide_get_hold(self, cmd: GetHold) -> tuple[Outcome, list[Event]]:
        hold = self.holds.get(cmd.hold_id)
        if hold is None or hold.chain_id:
            return refuse(Status.HOLD_NOT_FOUND, "hold_id", "no hold with this id"), []
        return ok(hold.copy()), []

    def _decide_expire_holds(self, cmd: ExpireHolds) -> tuple[Outcome, list[Event]]:
        events: list[Event] = [HoldReleased(h.hold_id, HOLD_EXPIRED, cmd.now_ms)
                               for h in self.holds.values()
                               if h.state == HOLD_HELD and not h.chain_id
                               and h.expires_at_ms <= cmd.now_ms]
        return ok(len(events)), events

    def expired_holds(self, now_ms: int) -> bool:
        return any(h.state == HOLD_HELD and not h.chain_id and h.expires_at_ms <= now_ms
                   for h in self.holds.values())

    # --- linked chains ------------------------------------------------------------------

    def _decide_prepare_linked(self, cmd: PrepareLinked) -> tuple[Outcome, list[Event]]:
        p = cmd.post
        outcome, events = self._decide_post(p)
        if outcome.status is Status.REQUEST_IN_FLIGHT:
            # Prepared before and still undecided: say under which chain, so a coordinator
            # retrying the same chain may decide it (the primary keeps the first decision).
            hold = self.holds.get(p.transfer_id)
            return Outcome(Status.REQUEST_IN_FLIGHT, outcome.field, outcome.detail,
                           hold.chain_id if hold is not None else None), []
        if outcome.replayed or not events:
            return outcome, []  # replay, key reused, or an unrecorded refusal
        if not outcome.ok:
            # A recorded refusal (insufficient funds, ...): the item fails alone, and with it
            # the chain; nothing is held.
            return outcome, events
        decided = events[0]
        if not isinstance(decided, TransferDecided):
            raise InvariantViolation("a recorded post journals its TransferDecided first")
        transfer = decided.transfer
        transfer.state, transfer.credited = STATE_PENDING, False
        pending = transfer.copy()
        return ok(pending), [ChainPrepared(transfer, p.to_shard, cmd.chain_id, cmd.primary_shard,
                                           p.reserved_at_ms)]

    def _decide_decide_chain(self, cmd: DecideChain) -> tuple[Outcome, list[Event]]:
        decided = self.chains.get(cmd.chain_id)
        if decided is not None:
            return ok(decided[0]), []
        # Presumed abort: a missing decision means abort, so abort decisions may be purged
        # after the retention window. A commit asked for a chain stamped before the purge
        # could contradict a forgotten abort: it becomes an abort.
        commit = cmd.commit and cmd.now_ms >= self.chains_purged_before
        return ok(commit), [ChainDecided(cmd.chain_id, commit, cmd.now_ms,
                                         tuple(cmd.participants) if commit else ())]

    def _decide_chain_finished(self, cmd: ChainFinished) -> tuple[Outcome, list[Event]]:
        if cmd.shard not in self.chain_waiting.get(cmd.chain_id, ()):
            return ok(), []
        return ok(), [ChainParticipantFinished(cmd.chain_id, cmd.shard)]

    def _decide_finish_chain(self, cmd: FinishChain) -> tuple[Outcome, list[Event]]:
        events: list[Event] = []
        finished: list[Transfer] = []
        for hold in self.holds.values():
            if hold.chain_id != cmd.chain_id or hold.state != HOLD_HELD:
                continue
            transfer = self.transfers[hold.hold_id].copy()
            if cmd.commit:
                transfer.state = STATE_COMMITTED
                transfer.credited = hold.to_shard == self.shard
                seq = 0 if transfer.credited else self.outbox_last_seq.get(hold.to_shard, 0) + 1
                if seq:
                    # Several items of one chain may owe the same destination.
                    seq += sum(1 for e in events if type(e) is TransferDecided
                               and e.to_shard == hold.to_shard and e.outbox_seq)
            else:
                transfer.state, transfer.status = STATE_REFUSED, int(Status.LINKED_ITEM_FAILED)
                transfer.status_field = ""
                transfer.status_detail = "another item of the linked chain failed"
                seq = 0
            events.append(TransferDecided(transfer, hold.to_shard, seq, hold.hold_id,
                                          hold.reserved_at_ms if seq else 0))
            finished.append(transfer.copy())
        return ok(finished), events

    def pending_chains(self, before_ms: int) -> dict[str, int]:
        """Chains with items prepared here before ``before_ms``: chain_id -> primary shard."""
        return {h.chain_id: h.primary_shard for h in self.holds.values()
                if h.chain_id and h.state == HOLD_HELD and h.created_at_ms < before_ms}

    # --- evolve -------------------------------------------------------------------------

    def evolve(self, event: Event, rows: list | None = None) -> None:
        """Apply one journaled event. ``rows`` collects the materialized rows it changes:
        ``("wallet", Wallet)``, ``("entry", Entry)`` and ``("transfer", Transfer)``."""
        _EVOLVERS[type(event)](self, event, rows)

    def _evolve_wallet_created(self, e: WalletCreated, rows: list | None) -> None:
        ensure(e.wallet_id not in self.wallets, "wallet %s created twice", e.wallet_id)
        wallet = Wallet(e.wallet_id, e.currency, allow_negative=e.allow_negative,
                        created_at_ms=e.at_ms)
        self.wallets[e.wallet_id] = wallet
        self.idempotency[(e.caller, e.idempotency_key)] = IdempotencyRecord(
            e.caller, e.idempotency_key, "wallet:" + e.wallet_id,
            wallet_fingerprint(e.wallet_id, e.currency, e.allow_negative), e.at_ms)
        if rows is not None:
            rows.append(("wallet", wallet))

    def _evolve_risk_limits_set(self, e: RiskLimitsSet, rows: list | None) -> None:
        if not e.wallet_id:
            self.risk_default = R.Limits(e.window_ms, e.max_amount_minor, e.max_count,
                                         e.step_up_above_minor)
            if self.risk_default == R.NO_LIMITS:
                self.risk_default = R.NO_LIMITS  # the one object the fast path tests for
            return
        ensure(e.wallet_id in self.wallets, "risk limits of unknown wallet %s", e.wallet_id)
        held = self.risk.get(e.wallet_id)
        if held is None:
            held = self.risk[e.wallet_id] = R.WalletRisk(e.wallet_id)
        held.window_ms, held.max_amount_minor, held.max_count = (e.window_ms, e.max_amount_minor,
                                                                 e.max_count)
        held.step_up_above_minor = e.step_up_above_minor

    def _evolve_device_confirmed(self, e: DeviceConfirmed, rows: list | None) -> None:
        ensure(e.wallet_id in self.wallets, "device of unknown wallet %s", e.wallet_id)
        held = self.risk.get(e.wallet_id)
        if held is None:
            held = self.risk[e.wallet_id] = R.WalletRisk(e.wallet_id)
        ensure((e.device_id in held.devices) != e.confirmed,
               "device of %s confirmed or forgotten twice", e.wallet_id)
        if e.confirmed:
            held.devices.append(e.device_id)
            del held.devices[:-R.DEVICES_MAX]
        else:
            held.devices.remove(e.device_id)

    def _evolve_admin_noted(self, e: AdminNoted, rows: list | None) -> None:
        if e.change_id:
            self.admin_change = e.change_id

    def _evolve_wallet_frozen(self, e: WalletFrozen, rows: list | None) -> None:
        wallet = self.wallets[e.wallet_id]
        ensure(wallet.frozen != e.frozen, "wallet %s frozen state set to what it was",
               e.wallet_id)
        wallet.frozen = e.frozen
        if rows is not None:
            rows.append(("wallet", wallet))

    def _evolve_transfer_decided(self, e: TransferDecided, rows: list | None) -> None:
        t = e.transfer
        self.transfers[t.transfer_id] = t.copy()
        if not e.closes_hold and t.state == STATE_COMMITTED:
            # A hold's capture and a chain item were counted when held.
            self._note_debit(t.from_wallet_id, t.amount_minor, t.created_at_ms)
        hold = self.holds.get(e.closes_hold) if e.closes_hold else None
        if hold is not None and hold.chain_id:
            pass  # a chain item: its key was recorded when it was prepared
        elif t.kind == KIND_HOLD_CAPTURE:
            # The transfer row does not name the hold: the record is a row of its own.
            self._record(IdempotencyRecord(
                t.caller, t.idempotency_key, "transfer:" + t.transfer_id,
                capture_fingerprint(e.closes_hold, t.to_wallet_id, t.amount_minor, t.memo),
                t.created_at_ms), rows)
        else:
            # The transfer row holds every field of this record (``record_of_transfer``),
            # found again by the id the key derives; an id that does not derive from its key
            # (tests build such Posts) gets a key row of its own.
            self._record(record_of_transfer(t), None if _derived(t, self.shard) else rows)
        # A refused capture leaves its hold alone; a chain's decision ends its item's hold.
        if hold is not None and not hold.chain_id and t.state != STATE_COMMITTED:
            hold = None
        if rows is not None:
            rows.append(("transfer", t.copy()))
        if hold is not None:
            ensure(hold.state == HOLD_HELD, "hold %s closed twice", hold.hold_id)
            wallet = self.wallets[hold.wallet_id]
            wallet.held_minor -= hold.amount_minor
            ensure(wallet.held_minor >= 0, "held amount of %s below zero", wallet.wallet_id)
            hold.state = HOLD_CAPTURED if t.state == STATE_COMMITTED else HOLD_RELEASED
            hold.captured_minor = t.amount_minor if t.state == STATE_COMMITTED else 0
            hold.closed_at_ms = t.created_at_ms
            if rows is not None:
                rows.append(("wallet", wallet))
        if t.state != STATE_COMMITTED:
            return
        self._change(t.from_wallet_id, t.currency, -t.amount_minor, t.transfer_id, t.kind,
                     t.created_at_ms, t.to_wallet_id, rows)
        if e.to_shard == self.shard:
            self._change(t.to_wallet_id, t.currency, t.amount_minor, t.transfer_id, t.kind,
                         t.created_at_ms, t.from_wallet_id, rows)
            if t.kind == KIND_ENVELOPE_FUND:
                self._fund_envelope(t, t.created_at_ms, rows)
        else:
            ensure(e.outbox_seq == self.outbox_last_seq.get(e.to_shard, 0) + 1,
                   "outbox sequence gap to shard %d", e.to_shard)
            self.outbox_last_seq[e.to_shard] = e.outbox_seq
            if e.reserved_at_ms == C.UNDER_GRANT:
                used = self.headroom_used.get(e.to_shard, 0) + t.amount_minor
                ensure(used <= self.headroom_in.get(e.to_shard, 0),
                       "credit %s owed past the headroom granted by shard %d", t.transfer_id,
                       e.to_shard)
                self.headroom_used[e.to_shard] = used
            self.outbox.setdefault(e.to_shard, {})[e.outbox_seq] = Credit(
                e.outbox_seq, t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                t.amount_minor, t.currency, t.created_at_ms, e.reserved_at_ms)

    def _change(self, wallet_id: str, currency: str, delta: int, transfer_id: str, kind: str,
                at_ms: int, counterparty: str, rows: list | None) -> None:
        wallet = self.wallets.get(wallet_id)
        if wallet is None:
            ensure(is_settlement(wallet_id), "posting to unknown wallet %s", wallet_id)
            wallet = self.wallets[wallet_id] = Wallet(wallet_id, currency, allow_negative=True)
        ensure(wallet.currency == currency, "currency mismatch on %s", wallet_id)
        balance = wallet.balance_minor + delta
        ensure(C.BALANCE_MINOR_MIN <= balance <= C.AMOUNT_MINOR_MAX,
               "balance of %s out of int64", wallet_id)
        ensure(wallet.allow_negative or delta > 0 or balance - wallet.held_minor >= 0,
               "wallet %s would go below zero", wallet_id)
        wallet.balance_minor = balance
        _ensure_in_range(wallet)
        wallet.version += 1
        if rows is not None:
            rows.append(("entry", Entry(wallet_id, wallet.version, transfer_id, kind, delta,
                                        balance, counterparty, currency, at_ms)))
            rows.append(("wallet", wallet))

    def _evolve_hold_created(self, e: HoldCreated, rows: list | None) -> None:
        hold = e.hold.copy()
        ensure(hold.hold_id not in self.holds, "hold %s created twice", hold.hold_id)
        wallet = self.wallets[hold.wallet_id]
        wallet.held_minor += hold.amount_minor
        _ensure_in_range(wallet)
        ensure(wallet.allow_negative or wallet.available_minor >= 0,
               "hold takes %s below zero", wallet.wallet_id)
        self.holds[hold.hold_id] = hold
        self._note_debit(hold.wallet_id, hold.amount_minor, hold.created_at_ms)
        self.idempotency[(hold.caller, hold.idempotency_key)] = IdempotencyRecord(
            hold.caller, hold.idempotency_key, "hold:" + hold.hold_id,
            hold_fingerprint(hold.wallet_id, hold.amount_minor, hold.currency,
                             hold.expires_at_ms - hold.created_at_ms), hold.created_at_ms)
        if rows is not None:
            rows.append(("wallet", wallet))

    def _evolve_hold_released(self, e: HoldReleased, rows: list | None) -> None:
        hold = self.holds[e.hold_id]
        ensure(hold.state == HOLD_HELD, "hold %s released twice", e.hold_id)
        wallet = self.wallets[hold.wallet_id]
        wallet.held_minor -= hold.amount_minor
        ensure(wallet.held_minor >= 0, "held amount of %s below zero", wallet.wallet_id)
        hold.state, hold.closed_at_ms = e.state, e.at_ms
        if e.idempotency_key:
            self.idempotency[(e.caller, e.idempotency_key)] = IdempotencyRecord(
                e.caller, e.idempotency_key, "release:" + e.hold_id, (("hold_id", e.hold_id),),
                e.at_ms)
        if rows is not None:
            rows.append(("wallet", wallet))

    def _evolve_chain_prepared(self, e: ChainPrepared, rows: list | None) -> None:
        t = e.transfer
        wallet = self.wallets.get(t.from_wallet_id)
        if wallet is None:
            ensure(is_settlement(t.from_wallet_id), "chain item from unknown wallet")
            wallet = self.wallets[t.from_wallet_id] = Wallet(t.from_wallet_id, t.currency,
                                                             allow_negative=True)
        wallet.held_minor += t.amount_minor
        _ensure_in_range(wallet)
        ensure(wallet.allow_negative or wallet.available_minor >= 0,
               "chain hold takes %s below zero", wallet.wallet_id)
        self._note_debit(t.from_wallet_id, t.amount_minor, t.created_at_ms)
        self.holds[t.transfer_id] = Hold(t.transfer_id, t.from_wallet_id, t.currency,
                                         t.amount_minor, t.caller, t.idempotency_key,
                                         t.created_at_ms, 0, chain_id=e.chain_id,
                                         primary_shard=e.primary_shard, to_shard=e.to_shard,
                                         reserved_at_ms=e.reserved_at_ms)
        self.transfers[t.transfer_id] = t.copy()
        self._record(record_of_transfer(t), None if _derived(t, self.shard) else rows)
        if rows is not None:
            rows.append(("wallet", wallet))

    def _evolve_envelope_opened(self, e: EnvelopeOpened, rows: list | None) -> None:
        envelope = e.envelope.copy()
        ensure(envelope.envelope_id not in self.envelopes, "envelope %s opened twice",
               envelope.envelope_id)
        escrow = escrow_wallet_id(envelope.envelope_id)
        ensure(escrow not in self.wallets, "escrow %s exists", escrow)
        wallet = self.wallets[escrow] = Wallet(escrow, envelope.currency,
                                               created_at_ms=envelope.created_at_ms)
        self.envelopes[envelope.envelope_id] = envelope
        if rows is not None:
            rows.append(("wallet", wallet))
            rows.append(("envelope", envelope))

    def _fund_envelope(self, t: Transfer, at_ms: int, rows: list | None) -> None:
        """The funding credit landed on the escrow: the envelope is live."""
        envelope = self.envelopes.get(envelope_of_escrow(t.to_wallet_id))
        ensure(envelope is not None, "funding %s for an unknown envelope", t.transfer_id)
        assert envelope is not None  # for the type checker; ensure() stopped otherwise
        ensure(not envelope.funded_at_ms and not envelope.closed_at_ms
               and envelope.funding_transfer_id == t.transfer_id
               and envelope.total_minor == t.amount_minor,
               "envelope %s funded twice or by another transfer", envelope.envelope_id)
        envelope.funded_at_ms = at_ms or 1
        envelope.left_minor = envelope.total_minor
        envelope.left_shares = envelope.shares
        if rows is not None:
            rows.append(("envelope", envelope))

    def _evolve_envelope_grabbed(self, e: EnvelopeGrabbed, rows: list | None) -> None:
        g = e.grab
        envelope = self.envelopes[g.envelope_id]
        grabs = self.grabs.setdefault(g.envelope_id, {})
        ensure(g.receiver_wallet_id not in grabs, "%s grabbed %s twice", g.receiver_wallet_id,
               g.envelope_id)
        ensure(envelope.funded_at_ms > 0 and envelope.left_shares > 0
               and g.position == envelope.shares - envelope.left_shares,
               "grab of %s out of turn", g.envelope_id)
        left_shares = envelope.left_shares - 1
        left = envelope.left_minor - g.amount_minor
        ensure(g.amount_minor >= envelope.min_share_minor
               and left >= envelope.min_share_minor * left_shares
               and (left_shares > 0 or left == 0),
               "grab of %s breaks the split", g.envelope_id)
        grabs[g.receiver_wallet_id] = g
        envelope.left_shares, envelope.left_minor = left_shares, left
        if not left_shares:
            envelope.closed_at_ms = g.at_ms or 1
        if rows is not None:
            rows.append(("grab", g))
            rows.append(("envelope", envelope))

    def _evolve_envelope_abandoned(self, e: EnvelopeAbandoned, rows: list | None) -> None:
        envelope = self.envelopes[e.envelope_id]
        ensure(not envelope.funded_at_ms and not envelope.closed_at_ms,
               "envelope %s abandoned after it was funded or closed", e.envelope_id)
        envelope.closed_at_ms = e.at_ms or 1
        if rows is not None:
            rows.append(("envelope", envelope))

    def _evolve_envelope_refunded(self, e: EnvelopeRefunded, rows: list | None) -> None:
        envelope = self.envelopes[e.envelope_id]
        ensure(not envelope.refund_transfer_id and e.amount_minor == envelope.left_minor > 0,
               "envelope %s refunded twice or by another amount", e.envelope_id)
        envelope.refunded_minor, envelope.left_minor = e.amount_minor, 0
        envelope.refund_transfer_id = e.transfer_id
        envelope.closed_at_ms = e.at_ms or 1
        if rows is not None:
            rows.append(("envelope", envelope))

    def _evolve_key_claimed(self, e: KeyClaimed, rows: list | None) -> None:
        claim = self.claims[(e.caller, e.idempotency_key)] = IdempotencyRecord(
            e.caller, e.idempotency_key, claim_target(e), e.fingerprint, e.at_ms)
        if rows is not None:
            rows.append(("claim", claim))

    def _record(self, record: IdempotencyRecord, rows: list | None) -> None:
        """Keep a money movement's key record. It must be in the store too, so that it can
        leave memory (``IdempotencySpilled``) and still answer a retry: as the transfer row
        (``record_of_transfer`` rebuilds it), or, given ``rows``, as a key row of its own."""
        self.idempotency[(record.caller, record.idempotency_key)] = record
        if rows is not None:
            rows.append(("idem", record))

    def _evolve_chain_decided(self, e: ChainDecided, rows: list | None) -> None:
        ensure(e.chain_id not in self.chains, "chain %s decided twice", e.chain_id)
        self.chains[e.chain_id] = (e.committed, e.at_ms)
        if e.committed and e.participants:
            self.chain_waiting[e.chain_id] = set(e.participants)

    def _evolve_chain_participant_finished(self, e: ChainParticipantFinished,
                                           rows: list | None) -> None:
        waiting = self.chain_waiting.get(e.chain_id)
        if waiting is not None:
            waiting.discard(e.shard)
            if not waiting:
                del self.chain_waiting[e.chain_id]

    def _evolve_credits_applied(self, e: CreditsApplied, rows: list | None) -> None:
        applied = self.inbox_applied.get(e.from_shard, 0)
        for c in e.credits:
            ensure(c.outbox_seq == applied + 1, "credit out of order from shard %d", e.from_shard)
            applied = c.outbox_seq
            if c.reserved_at_ms == C.UNDER_GRANT:
                used = self.grants_used.get(e.from_shard, 0) + c.amount_minor
                ensure(used <= self.grants_out.get(e.from_shard, 0),
                       "credit %s landed past the headroom granted to shard %d",
                       c.transfer_id, e.from_shard)
                self.grants_used[e.from_shard] = used
                self.granted_open -= c.amount_minor
            else:
                self._drop_reservation(c.transfer_id)
            self._change(c.to_wallet_id, c.currency, c.amount_minor, c.transfer_id, c.kind,
                         c.at_ms, c.from_wallet_id, rows)
            if c.kind == KIND_ENVELOPE_FUND:
                # The debit shard holds the decision; the envelope checks what it names.
                self._fund_envelope(Transfer(c.transfer_id, c.kind, c.from_wallet_id,
                                             c.to_wallet_id, c.amount_minor, c.currency, "", "",
                                             "", c.at_ms, credited=True), c.at_ms, rows)
        self.inbox_applied[e.from_shard] = applied

    def _evolve_headroom_granted(self, e: HeadroomGranted, rows: list | None) -> None:
        granted = self.grants_out.get(e.to_shard, 0)
        ensure(e.total_minor > granted, "headroom granted to shard %d shrinks", e.to_shard)
        self.grants_out[e.to_shard] = e.total_minor
        self.granted_open += e.total_minor - granted

    def _evolve_headroom_noted(self, e: HeadroomNoted, rows: list | None) -> None:
        ensure(e.total_minor > self.headroom_in.get(e.from_shard, 0),
               "headroom from shard %d shrinks", e.from_shard)
        self.headroom_in[e.from_shard] = e.total_minor

    def _evolve_credit_reserved(self, e: CreditReserved, rows: list | None) -> None:
        ensure(e.transfer_id not in self.reservations, "reservation %s made twice",
               e.transfer_id)
        self.reservations[e.transfer_id] = (e.wallet_id, e.amount_minor, e.at_ms)
        self.incoming[e.wallet_id] = self.incoming.get(e.wallet_id, 0) + e.amount_minor

    def _evolve_reservations_dropped(self, e: ReservationsDropped, rows: list | None) -> None:
        for tid, at in e.items:
            held = self.reservations.get(tid)
            if held is not None and held[2] == at:
                self._drop_reservation(tid)

    def _evolve_reservations_fenced(self, e: ReservationsFenced, rows: list | None) -> None:
        for tid, at in e.items:
            self.fenced[tid] = (at, e.at_ms)

    def _evolve_outbox_acked(self, e: OutboxAcked, rows: list | None) -> None:
        pending = self.outbox.get(e.to_shard, {})
        for seq in [s for s in pending if s <= e.up_to_seq]:
            credit = pending.pop(seq)
            transfer = self.transfers.get(credit.transfer_id)
            if transfer is not None:
                transfer.credited = True
                if rows is not None:
                    rows.append(("transfer", transfer.copy()))
        if not pending:
            self.outbox.pop(e.to_shard, None)

    def _evolve_idempotency_spilled(self, e: IdempotencySpilled, rows: list | None) -> None:
        # What the owner looked up before this step may be stale now: a later command of the
        # same step that uses a key spilled here finds no entry and stops the step (the
        # owner decides a spill in a step of its own, so this only guards misuse).
        self.loaded.clear()
        owed = self._owed()
        for key, record in list(self.idempotency.items()):
            if record.created_at_ms < e.before_ms and self._spillable(record, owed):
                del self.idempotency[key]
                self.transfers.pop(record.target[len("transfer:"):], None)
                self.spilled.add(record.caller, record.idempotency_key, record.created_at_ms)
        for key in [k for k, r in self.claims.items() if r.created_at_ms < e.before_ms]:
            record = self.claims.pop(key)
            self.spilled.add(record.caller, record.idempotency_key, record.created_at_ms)
        # A dict keeps its table at its largest size after deletions: copy the three, so
        # what memory holds follows the window, not the busiest moment since the start.
        self.idempotency = dict(self.idempotency)
        self.transfers = dict(self.transfers)
        self.claims = dict(self.claims)

    def _evolve_idempotency_expired(self, e: IdempotencyExpired, rows: list | None) -> None:
        self.spilled.expire(e.before_ms)
        owed = self._owed()
        for key, record in list(self.idempotency.items()):
            if record.created_at_ms < e.before_ms:
                del self.idempotency[key]
                if record.target.startswith("transfer:"):
                    tid = record.target[len("transfer:"):]
                    transfer = self.transfers.get(tid)
                    if tid not in owed and (transfer is None or transfer.state != STATE_PENDING):
                        self.transfers.pop(tid, None)
        for hold_id in [h.hold_id for h in self.holds.values()
                        if h.state != HOLD_HELD and h.closed_at_ms < e.before_ms]:
            del self.holds[hold_id]
        for chain_id in [c for c, (_, at) in self.chains.items()
                         if at < e.before_ms and c not in self.chain_waiting]:
            del self.chains[chain_id]
        self.chains_purged_before = max(self.chains_purged_before, e.before_ms)
        for key in [k for k, r in self.claims.items() if r.created_at_ms < e.before_ms]:
            del self.claims[key]
        for tid in [t for t, (_, at) in self.fenced.items() if at < e.before_ms]:
            del self.fenced[tid]
        for envelope_id in [i for i, env in self.envelopes.items()
                            if env.closed_at_ms and env.closed_at_ms < e.before_ms]:
            del self.envelopes[envelope_id]
            self.grabs.pop(envelope_id, None)

    # --- checks -------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the shard's invariants (cheap enough to run after every snapshot)."""
        ensure(self.granted_open == sum(g - self.grants_used.get(d, 0)
                                        for d, g in self.grants_out.items())
               and all(0 <= self.grants_used.get(d, 0) <= g for d, g in self.grants_out.items())
               and set(self.grants_used) <= set(self.grants_out),
               "headroom granted disagrees with what landed under it")
        ensure(all(0 <= self.headroom_used.get(c, 0) <= g for c, g in self.headroom_in.items())
               and set(self.headroom_used) <= set(self.headroom_in),
               "credits owed past the headroom granted")
        held: dict[str, int] = {}
        for h in self.holds.values():
            if h.state == HOLD_HELD:
                held[h.wallet_id] = held.get(h.wallet_id, 0) + h.amount_minor
        incoming: dict[str, int] = {}
        for wallet_id, amount, _ in self.reservations.values():
            incoming[wallet_id] = incoming.get(wallet_id, 0) + amount
        ensure(incoming == self.incoming, "incoming credits disagree with the reservations")
        for w in self.wallets.values():
            ensure(w.held_minor == held.get(w.wallet_id, 0), "held amount of %s disagrees "
                   "with its holds", w.wallet_id)
            _ensure_in_range(w)
            # Every credit on its way here holds a reservation or falls under a grant:
            # landing cannot overflow.
            ensure(w.balance_minor + incoming.get(w.wallet_id, 0) + self.granted_open
                   <= C.AMOUNT_MINOR_MAX,
                   "credits reserved or granted for %s exceed its headroom", w.wallet_id)
            ensure(w.allow_negative or w.balance_minor - w.held_minor >= 0,
                   "wallet %s below zero", w.wallet_id)
        for env in self.envelopes.values():
            grabs = self.grabs.get(env.envelope_id, {})
            escrow = self.wallets[escrow_wallet_id(env.envelope_id)]
            ensure(escrow.balance_minor == env.left_minor, "escrow of %s disagrees with what "
                   "is left of it", env.envelope_id)
            if env.funded_at_ms:
                ensure(sum(g.amount_minor for g in grabs.values()) + env.left_minor
                       + env.refunded_minor == env.total_minor
                       and len(grabs) + env.left_shares == env.shares,
                       "envelope %s does not add up", env.envelope_id)
            else:
                ensure(not grabs and not env.left_minor, "unfunded envelope %s has grabs",
                       env.envelope_id)


def _position(g: Grab) -> int:
    return g.position


def _ensure_in_range(w: Wallet) -> None:
    """Every stored amount of a wallet fits the journal's and the views' int64 columns."""
    ensure(C.BALANCE_MINOR_MIN <= w.balance_minor <= C.AMOUNT_MINOR_MAX,
           "balance of %s out of int64", w.wallet_id)
    ensure(0 <= w.held_minor <= C.AMOUNT_MINOR_MAX, "held amount of %s out of range",
           w.wallet_id)
    ensure(w.balance_minor - w.held_minor >= C.BALANCE_MINOR_MIN,
           "available balance of %s out of int64", w.wallet_id)


_DECIDERS: dict[type, Callable[[ShardState, Any], tuple[Outcome, list[Event]]]] = {
    CreateWallet: ShardState._decide_create_wallet,
    GetWallet: ShardState._decide_get_wallet,
    SetFrozen: ShardState._decide_set_frozen,
    SetRiskLimits: ShardState._decide_set_risk_limits,
    ConfirmDevice: ShardState._decide_confirm_device,
    NoteAdmin: ShardState._decide_note_admin,
    GetHead: ShardState._decide_get_head,
    GetTransfer: ShardState._decide_get_transfer,
    Post: ShardState._decide_post,
    ReserveCredit: ShardState._decide_reserve_credit,
    CancelReservation: ShardState._decide_cancel_reservation,
    ApplyCredits: ShardState._decide_apply_credits,
    AckOutbox: ShardState._decide_ack_outbox,
    ExpireIdempotency: ShardState._decide_expire_idempotency,
    CreateHold: ShardState._decide_create_hold,
    CaptureHold: ShardState._decide_capture_hold,
    ReleaseHold: ShardState._decide_release_hold,
    GetHold: ShardState._decide_get_hold,
    ExpireHolds: ShardState._decide_expire_holds,
    PrepareLinked: ShardState._decide_prepare_linked,
    DecideChain: ShardState._decide_decide_chain,
    FinishChain: ShardState._decide_finish_chain,
    ClaimKey: ShardState._decide_claim_key,
    SpillIdempotency: ShardState._decide_spill_idempotency,
    ResolveReservations: ShardState._decide_resolve_reservations,
    DropReservations: ShardState._decide_drop_reservations,
    ChainFinished: ShardState._decide_chain_finished,
    OpenEnvelope: ShardState._decide_open_envelope,
    GetEnvelope: ShardState._decide_get_envelope,
    GrabEnvelope: ShardState._decide_grab_envelope,
    RefundEnvelope: ShardState._decide_refund_envelope,
    AbandonEnvelope: ShardState._decide_abandon_envelope,
    GrantHeadroom: ShardState._decide_grant_headroom,
    NoteHeadroom: ShardState._decide_note_headroom,
}

_EVOLVERS: dict[type, Callable[[ShardState, Any, list | None], None]] = {
    WalletCreated: ShardState._evolve_wallet_created,
    TransferDecided: ShardState._evolve_transfer_decided,
    CreditsApplied: ShardState._evolve_credits_applied,
    OutboxAcked: ShardState._evolve_outbox_acked,
    IdempotencyExpired: ShardState._evolve_idempotency_expired,
    HoldCreated: ShardState._evolve_hold_created,
    HoldReleased: ShardState._evolve_hold_released,
    ChainPrepared: ShardState._evolve_chain_prepared,
    ChainDecided: ShardState._evolve_chain_decided,
    KeyClaimed: ShardState._evolve_key_claimed,
    IdempotencySpilled: ShardState._evolve_idempotency_spilled,
    CreditReserved: ShardState._evolve_credit_reserved,
    ReservationsDropped: ShardState._evolve_reservations_dropped,
    ReservationsFenced: ShardState._evolve_reservations_fenced,
    ChainParticipantFinished: ShardState._evolve_chain_participant_finished,
    EnvelopeOpened: ShardState._evolve_envelope_opened,
    EnvelopeGrabbed: ShardState._evolve_envelope_grabbed,
    EnvelopeRefunded: ShardState._evolve_envelope_refunded,
    EnvelopeAbandoned: ShardState._evolve_envelope_abandoned,
    HeadroomGranted: ShardState._evolve_headroom_granted,
    HeadroomNoted: ShardState._evolve_headroom_noted,
    WalletFrozen: ShardState._evolve_wallet_frozen,
    RiskLimitsSet: ShardState._evolve_risk_limits_set,
    DeviceConfirmed: ShardState._evolve_device_confirmed,
    AdminNoted: ShardState._evolve_admin_noted,
}
