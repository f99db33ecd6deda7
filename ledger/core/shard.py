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

from ledger.core import constants as C
from ledger.core.invariants import ensure
from ledger.core.model import (
    KIND_DEPOSIT, KIND_WITHDRAWAL, STATE_COMMITTED, STATE_REFUSED, AckOutbox, ApplyCredits,
    CancelReservation, CreateWallet, Credit, CreditsApplied, Entry, ExpireIdempotency, GetTransfer,
    GetWallet, IdempotencyExpired, IdempotencyRecord, OutboxAcked, Post, ReserveCredit, Transfer,
    TransferDecided, Wallet, WalletCreated, is_settlement,
)
from ledger.core.status import Outcome, Status, ok, refuse

Event = WalletCreated | TransferDecided | CreditsApplied | OutboxAcked | IdempotencyExpired


def transfer_fingerprint(kind: str, from_wallet_id: str, to_wallet_id: str, amount_minor: int,
                         currency: str, memo: str) -> tuple[tuple[str, object], ...]:
    """The fields compared when an idempotency key is used again, in reporting order."""
    return (("kind", kind), ("from_wallet_id", from_wallet_id), ("to_wallet_id", to_wallet_id),
            ("amount_minor", amount_minor), ("currency", currency), ("memo", memo))


def wallet_fingerprint(wallet_id: str, currency: str,
                       allow_negative: bool) -> tuple[tuple[str, object], ...]:
    return (("wallet_id", wallet_id), ("currency", currency), ("allow_negative", allow_negative))


def _first_difference(old: tuple, new: tuple) -> str:
    for (name, a), (_, b) in zip(old, new):
        if a != b:
            return name
    return ""


class ShardState:
    """Everything one shard knows. Mutated only by ``evolve`` (and reservations)."""

    __slots__ = ("shard", "seq", "wallets", "transfers", "idempotency", "outbox",
                 "outbox_last_seq", "inbox_applied", "reservations", "incoming")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        # Sequence number of the last journal batch folded into this state.
        self.seq = 0
        self.wallets: dict[str, Wallet] = {}
        # Transfers decided on this shard and still within the idempotency retention window.
        self.transfers: dict[str, Transfer] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        # Credits owed to other shards and not yet confirmed: to_shard -> {outbox_seq: Credit}.
        self.outbox: dict[int, dict[int, Credit]] = {}
        self.outbox_last_seq: dict[int, int] = {}
        # Highest outbox sequence applied here, per source shard (exactly-once credits).
        self.inbox_applied: dict[int, int] = {}
        # Credit reservations of cross-shard transfers in flight. Not journaled: a lost
        # reservation only means its transfer has to be prepared again.
        self.reservations: dict[str, tuple[str, int, int]] = {}
        self.incoming: dict[str, int] = {}

    # --- decide -------------------------------------------------------------------------

    def decide(self, cmd: object) -> tuple[Outcome, list[Event]]:
        """Check ``cmd`` against the state; return its outcome and the events to journal."""
        handler = _DECIDERS[type(cmd)]
        return handler(self, cmd)

    def _decide_create_wallet(self, cmd: CreateWallet) -> tuple[Outcome, list[Event]]:
        fp = wallet_fingerprint(cmd.wallet_id, cmd.currency, cmd.allow_negative)
        record = self.idempotency.get((cmd.caller, cmd.idempotency_key))
        if record is not None:
            differs = _first_difference(record.fingerprint, fp) or (
                "" if record.target == "wallet:" + cmd.wallet_id else "wallet_id")
            if differs:
                return refuse(Status.IDEMPOTENCY_KEY_REUSED, differs,
                              f"idempotency key was first used with a different {differs}"), []
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
        return ok(wallet.copy()), []

    def _decide_get_transfer(self, cmd: GetTransfer) -> tuple[Outcome, list[Event]]:
        transfer = self.transfers.get(cmd.transfer_id)
        if transfer is None:
            return refuse(Status.TRANSFER_NOT_FOUND, "transfer_id", "no transfer with this id"), []
        return ok(transfer.copy()), []

    def _decide_post(self, cmd: Post) -> tuple[Outcome, list[Event]]:
        fp = transfer_fingerprint(cmd.kind, cmd.from_wallet_id, cmd.to_wallet_id,
                                  cmd.amount_minor, cmd.currency, cmd.memo)
        record = self.idempotency.get((cmd.caller, cmd.idempotency_key))
        if record is not None:
            differs = _first_difference(record.fingerprint, fp)
            if differs:
                return refuse(Status.IDEMPOTENCY_KEY_REUSED, differs,
                              f"idempotency key was first used with a different {differs}"), []
            original = self.transfers.get(record.target[len("transfer:"):])
            ensure(original is not None, "idempotency record %s without its transfer",
                   record.target)
            return Outcome(Status(original.status), original.status_field,
                           original.status_detail, original.copy(), replayed=True), []

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
        return outcome, [TransferDecided(transfer, cmd.to_shard, outbox_seq)]

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
        if source.allow_negative:
            if source.balance_minor - cmd.amount_minor < C.BALANCE_MINOR_MIN:
                return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                              "would take from_wallet_id below the int64 range")
        elif source.available_minor < cmd.amount_minor:
            return refuse(Status.INSUFFICIENT_FUNDS, "amount_minor",
                          "from_wallet_id has less available than amount_minor")
        if target is not None:
            headroom = C.AMOUNT_MINOR_MAX - target.balance_minor - self.incoming.get(
                target.wallet_id, 0)
            if cmd.amount_minor > headroom:
                return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                              "would take to_wallet_id past the int64 range")
        return None

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
        if cmd.transfer_id in self.reservations:
            return ok(), []
        incoming = self.incoming.get(cmd.wallet_id, 0)
        if cmd.amount_minor > C.AMOUNT_MINOR_MAX - wallet.balance_minor - incoming:
            return refuse(Status.BALANCE_OVERFLOW, "amount_minor",
                          "would take to_wallet_id past the int64 range"), []
        # Reservations live outside the journal; decide() is otherwise pure, and this is the
        # one in-memory side effect, applied at once because it is never replayed.
        self.reservations[cmd.transfer_id] = (cmd.wallet_id, cmd.amount_minor,
                                              cmd.now_ms + C.RESERVATION_TTL_MS)
        self.incoming[cmd.wallet_id] = incoming + cmd.amount_minor
        return ok(), []

    def _decide_cancel_reservation(self, cmd: CancelReservation) -> tuple[Outcome, list[Event]]:
        self._drop_reservation(cmd.transfer_id)
        return ok(), []

    def _drop_reservation(self, transfer_id: str) -> None:
        reservation = self.reservations.pop(transfer_id, None)
        if reservation is not None:
            wallet_id, amount, _ = reservation
            left = self.incoming[wallet_id] - amount
            if left:
                self.incoming[wallet_id] = left
            else:
                del self.incoming[wallet_id]

    def expire_reservations(self, now_ms: int) -> int:
        """Drop reservations past their deadline; returns how many were dropped."""
        expired = [tid for tid, (_, _, deadline) in self.reservations.items() if deadline <= now_ms]
        for transfer_id in expired:
            self._drop_reservation(transfer_id)
        return len(expired)

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
        if not any(r.created_at_ms < cmd.before_ms for r in self.idempotency.values()):
            return ok(0), []
        return ok(), [IdempotencyExpired(cmd.before_ms)]

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
            rows.append(("wallet", wallet.copy()))

    def _evolve_transfer_decided(self, e: TransferDecided, rows: list | None) -> None:
        t = e.transfer
        self.transfers[t.transfer_id] = t.copy()
        self.idempotency[(t.caller, t.idempotency_key)] = IdempotencyRecord(
            t.caller, t.idempotency_key, "transfer:" + t.transfer_id,
            transfer_fingerprint(t.kind, t.from_wallet_id, t.to_wallet_id, t.amount_minor,
                                 t.currency, t.memo), t.created_at_ms)
        if rows is not None:
            rows.append(("transfer", t.copy()))
        if t.state != STATE_COMMITTED:
            return
        self._change(t.from_wallet_id, t.currency, -t.amount_minor, t, t.to_wallet_id, rows)
        if e.to_shard == self.shard:
            self._change(t.to_wallet_id, t.currency, t.amount_minor, t, t.from_wallet_id, rows)
        else:
            ensure(e.outbox_seq == self.outbox_last_seq.get(e.to_shard, 0) + 1,
                   "outbox sequence gap to shard %d", e.to_shard)
            self.outbox_last_seq[e.to_shard] = e.outbox_seq
            self.outbox.setdefault(e.to_shard, {})[e.outbox_seq] = Credit(
                e.outbox_seq, t.transfer_id, t.kind, t.from_wallet_id, t.to_wallet_id,
                t.amount_minor, t.currency, t.created_at_ms)

    def _change(self, wallet_id: str, currency: str, delta: int, t: Transfer,
                counterparty: str, rows: list | None) -> None:
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
        wallet.version += 1
        if rows is not None:
            rows.append(("entry", Entry(wallet_id, wallet.version, t.transfer_id, t.kind, delta,
                                        balance, counterparty, currency, t.created_at_ms)))
            rows.append(("wallet", wallet.copy()))

    def _evolve_credits_applied(self, e: CreditsApplied, rows: list | None) -> None:
        applied = self.inbox_applied.get(e.from_shard, 0)
        for c in e.credits:
            ensure(c.outbox_seq == applied + 1, "credit out of order from shard %d", e.from_shard)
            applied = c.outbox_seq
            self._drop_reservation(c.transfer_id)
            # A transfer record for history lookups; the debit shard holds the decision.
            t = Transfer(c.transfer_id, c.kind, c.from_wallet_id, c.to_wallet_id,
                         c.amount_minor, c.currency, "", "", "", c.at_ms, credited=True)
            self._change(c.to_wallet_id, c.currency, c.amount_minor, t, c.from_wallet_id, rows)
        self.inbox_applied[e.from_shard] = applied

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

    def _evolve_idempotency_expired(self, e: IdempotencyExpired, rows: list | None) -> None:
        owed = {c.transfer_id for items in self.outbox.values() for c in items.values()}
        for key, record in list(self.idempotency.items()):
            if record.created_at_ms < e.before_ms:
                del self.idempotency[key]
                if record.target.startswith("transfer:"):
                    tid = record.target[len("transfer:"):]
                    if tid not in owed:
                        self.transfers.pop(tid, None)

    # --- checks -------------------------------------------------------------------------

    def owed_minor(self) -> dict[str, int]:
        """Money debited here whose credit is not yet confirmed, per currency."""
        owed: dict[str, int] = {}
        for items in self.outbox.values():
            for c in items.values():
                owed[c.currency] = owed.get(c.currency, 0) + c.amount_minor
        return owed

    def check(self) -> None:
        """Assert the shard's invariants (cheap enough to run after every snapshot)."""
        for w in self.wallets.values():
            ensure(C.BALANCE_MINOR_MIN <= w.balance_minor <= C.AMOUNT_MINOR_MAX,
                   "balance of %s out of range", w.wallet_id)
            ensure(w.allow_negative or w.balance_minor - w.held_minor >= 0,
                   "wallet %s below zero", w.wallet_id)


_DECIDERS = {
    CreateWallet: ShardState._decide_create_wallet,
    GetWallet: ShardState._decide_get_wallet,
    GetTransfer: ShardState._decide_get_transfer,
    Post: ShardState._decide_post,
    ReserveCredit: ShardState._decide_reserve_credit,
    CancelReservation: ShardState._decide_cancel_reservation,
    ApplyCredits: ShardState._decide_apply_credits,
    AckOutbox: ShardState._decide_ack_outbox,
    ExpireIdempotency: ShardState._decide_expire_idempotency,
}

_EVOLVERS = {
    WalletCreated: ShardState._evolve_wallet_created,
    TransferDecided: ShardState._evolve_transfer_decided,
    CreditsApplied: ShardState._evolve_credits_applied,
    OutboxAcked: ShardState._evolve_outbox_acked,
    IdempotencyExpired: ShardState._evolve_idempotency_expired,
}
