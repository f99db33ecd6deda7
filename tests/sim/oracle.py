"""The simulation's judge: a fold of every shard's DURABLE journal, checked after every append.

It reads only what the store made durable (the encoded batches, decoded with the ledger's
codec) and keeps its own books, written here independently of ``ledger.core.shard``: a bug in
the core's bookkeeping must not hide from the check that was meant to catch it. After every
durable append it checks:

* double entry: per currency, the balances of all wallets (settlement accounts included) plus
  the credits in transit (outbox items journaled by their debit shard and not yet applied by
  their credit shard) sum to zero;
* a credit is applied only if its debit is durable, and it is the credit that was owed;
* no wallet without ``allow_negative`` has less than zero available (balance minus held);
* no transfer is committed twice, and no (caller, idempotency key) executes two different
  requests (money movement, hold, release or wallet creation);
* nothing a client was told was refused ever executes later;
* red envelopes (escrow wallets are wallets here, so the double entry above counts them):
  opened once, funded once by their own ENVELOPE_FUND transfer for their total, the escrow's
  balance equal to what is left after every batch; each grab takes the next position, from
  a funded, unexpired envelope with shares left, at most one per receiver and per position
  and per (caller, grab key), within the split's bounds (restated here, not imported), for
  the eligible receiver, and its ENVELOPE_GRAB transfer escrow -> receiver for the same
  amount is in the same batch; a refund happens once, after the expiry, for exactly what is
  left, with its ENVELOPE_REFUND transfer escrow -> sender in the same batch.

Clients report every definitive answer (``answered``): an OK must already be durable, a
refusal must not be; a balance read must be a durable state of the wallet (``read``).
Envelope answers (``envelope_answered``, ``grab_answered``, ``envelope_read``): a created
envelope is the one durably opened, with the terms asked for; an OK grab is the durable grab
of that key (receiver, position, amount), and a key never gets two amounts; a refused grab
is not executed and never executes later, and its reason holds in the ledger (sold out:
no share left; already grabbed: by another key, for the amount told; expired: past the
expiry; not found: not opened); a read shows a durable state of the envelope.
``final`` checks the end state after healing and draining: nothing owed, no chain undecided,
no client hold held long past its timeout, every execution acknowledged and every
acknowledgement executed once, balances equal to the replay of acknowledged requests, every
committed transfer credited exactly once, and every envelope adding up (grabs + left +
refunded = total, positions 0..n-1, escrow = left), refunded once if it expired with money
left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ledger.core import codec
from ledger.core.model import (
    HOLD_HELD, KIND_ENVELOPE_FUND, KIND_ENVELOPE_GRAB, KIND_ENVELOPE_REFUND, KIND_HOLD_CAPTURE,
    STATE_COMMITTED, ChainDecided, ChainPrepared, CreditsApplied, Envelope, EnvelopeGrabbed,
    EnvelopeAbandoned, EnvelopeOpened, EnvelopeRefunded, Grab, HoldCreated, HoldReleased, IdempotencyExpired,
    KeyClaimed, OutboxAcked, Transfer, TransferDecided, WalletCreated, envelope_of_escrow,
    escrow_wallet_id, is_settlement,
)
from ledger.core.status import Outcome, Status
from ledger.store.port import JournalBatch


# What a request executes, as the oracle compares it: (kind, payload).
#   ("move", (transfer kind, from, to, amount, currency, memo))   Post / chain item
#   ("capture", (hold_id, to, amount resolved, memo))              CaptureHold
#   ("hold", (wallet, amount, currency, timeout_ms))               CreateHold
#   ("release", (hold_id,))                                        ReleaseHold
#   ("wallet", (wallet_id, currency, allow_negative))              CreateWallet
#   ("envelope", (sender, escrow, total, currency, memo, kind, shares, receiver, expiry_ms))
#                                                                  CreateEnvelope (its funding)
Execution = tuple[str, tuple]


@dataclass
class _Wallet:
    currency: str
    allow_negative: bool
    shard: int
    balance: int = 0
    held: int = 0
    # balance_by_version[v] is the balance after the wallet's v-th change (0: created).
    balance_by_version: list[int] = field(default_factory=lambda: [0])


@dataclass
class _Hold:
    wallet_id: str
    amount: int
    chain_id: str
    state: str = HOLD_HELD
    expires_at_ms: int = 0  # client holds only


@dataclass
class _Envelope:
    """An envelope as the durable journal made it (the oracle's own books)."""

    opened: Envelope            # the terms, as journaled by EnvelopeOpened
    shard: int
    funded: bool = False
    left: int = 0
    left_shares: int = 0
    refunded: int = 0
    refund_transfer_id: str = ""
    abandoned: bool = False     # closed unfunded (its funding was refused for good)
    grabs: dict[int, Grab] = field(default_factory=dict)          # position -> grab
    by_receiver: dict[str, Grab] = field(default_factory=dict)
    lefts: set[int] = field(default_factory=lambda: {0})          # every durable "left"


# Grab refusals whose reason the oracle checks against the durable envelope.
_GRAB_REFUSALS = (Status.ENVELOPE_ALREADY_GRABBED, Status.ENVELOPE_SOLD_OUT,
                  Status.ENVELOPE_EXPIRED, Status.ENVELOPE_NOT_FOUND,
                  Status.ENVELOPE_NOT_ELIGIBLE, Status.IDEMPOTENCY_KEY_REUSED,
                  Status.ENVELOPE_UNFUNDED)


# How long after its timeout a client hold may still be held at the end (the owner's sweep
# releases expired holds about once a second; a shard may be moving meanwhile).
HOLD_EXPIRY_SLACK_MS = 10_000


def move_payload(t: Transfer) -> tuple:
    return (t.kind, t.from_wallet_id, t.to_wallet_id, t.amount_minor, t.currency, t.memo)


class Oracle:
    def __init__(self, on_violation: Callable[[str], None], strict: bool = True) -> None:
        """``strict``: a credit applied before its debit is durable is a violation at once.
        Without it (to measure the damage such credits do) it is counted and the books are
        checked around it; the lost or doubled money shows when the sequence is reused."""
        self._on_violation = on_violation
        self.strict = strict
        self.violations: list[str] = []
        self.wallets: dict[str, _Wallet] = {}
        # Per currency: balances plus credits in transit. Zero after every append.
        self.books: dict[str, int] = {}
        self.seq: dict[int, int] = {}
        # (src, dst) -> {outbox seq: Credit}, every item ever journaled (never forgotten).
        self.outbox: dict[tuple[int, int], dict] = {}
        # (src, dst) -> highest seq applied durably on dst.
        self.applied: dict[tuple[int, int], int] = {}
        # (src, dst, seq) -> Credit applied on dst while its debit was not durable on src.
        self.early: dict[tuple[int, int, int], object] = {}
        self.acked_up_to: dict[tuple[int, int], int] = {}
        self.committed: dict[str, Transfer] = {}
        self.decided: dict[str, str] = {}  # transfer id -> state of its last decision
        self.holds: dict[str, _Hold] = {}
        self.chains: dict[str, bool] = {}
        self.executions: dict[tuple[str, str], list[Execution]] = {}
        self.refused: dict[tuple[str, str], set[Execution]] = {}
        self.acknowledged: dict[tuple[str, str], Execution] = {}
        self.appends = 0
        self.early_credits = 0
        # Red envelopes: the durable ones, their grabs by (caller, grab key), what clients
        # were told (grab key -> (receiver, amount); (caller, grab key, receiver) refused),
        # and how many times each committed transfer was credited.
        self.envelopes: dict[str, _Envelope] = {}
        self.grab_by_key: dict[tuple[str, str], Grab] = {}
        self.grab_answers: dict[tuple[str, str], tuple[str, int]] = {}
        self.grab_refused: set[tuple[str, str, str]] = set()
        # (caller, grab key) -> every receiver a client sent it for (answered or not).
        self.grab_sent: dict[tuple[str, str], set[str]] = {}
        self.credited: dict[str, int] = {}
        self.envelope_counts: dict[str, int] = {}
        # Grabs and refunds of the batch being folded whose transfer has not come yet.
        self._batch_grabs: dict[str, Grab] = {}
        self._batch_refunds: dict[str, EnvelopeRefunded] = {}

    def fail(self, message: str) -> None:
        self.violations.append(message)
        self._on_violation(message)

    # --- the durable journals -----------------------------------------------------------

    def on_append(self, shard: int, batch: JournalBatch) -> None:
        """Fold one durable batch and check the invariants it could break."""
        self.appends += 1
        if batch.seq != self.seq.get(shard, 0) + 1:
            self.fail(f"shard {shard}: batch {batch.seq} follows {self.seq.get(shard, 0)}")
        self.seq[shard] = batch.seq
        touched: set[str] = set()
        self._batch_grabs.clear()
        self._batch_refunds.clear()
        for event in codec.loads(batch.events):
            handler = _FOLD.get(type(event))
            if handler is not None:
                handler(self, shard, event, touched)
        for grab in self._batch_grabs.values():
            self.fail(f"shard {shard} batch {batch.seq}: grab {grab} without its "
                      f"{KIND_ENVELOPE_GRAB} transfer in the batch")
        for refund in self._batch_refunds.values():
            self.fail(f"shard {shard} batch {batch.seq}: refund {refund} without its "
                      f"{KIND_ENVELOPE_REFUND} transfer in the batch")
        for wallet_id in touched:
            envelope = self.envelopes.get(envelope_of_escrow(wallet_id))
            if envelope is not None:
                balance = self.wallets[wallet_id].balance
                envelope.lefts.add(envelope.left)
                if balance != envelope.left:
                    self.fail(f"escrow of envelope {envelope.opened.envelope_id} holds "
                              f"{balance}, but {envelope.left} is left of it (shard {shard} "
                              f"batch {batch.seq})")
        early: dict[str, int] = {}  # empty unless not strict: credits ahead of their debit
        for _, _, amount, currency in self.early.values():
            early[currency] = early.get(currency, 0) + amount
        for currency, total in self.books.items():
            if total != early.get(currency, 0):
                self.fail(f"books of {currency} off by {total - early.get(currency, 0)} after "
                          f"shard {shard} batch {batch.seq} (balances + credits in transit "
                          f"must sum to zero)")
        for wallet_id in touched:
            w = self.wallets[wallet_id]
            if not w.allow_negative and w.balance - w.held < 0:
                self.fail(f"wallet {wallet_id} below zero: balance {w.balance}, held {w.held}")

    def _wallet(self, wallet_id: str, currency: str, shard: int) -> _Wallet:
        w = self.wallets.get(wallet_id)
        if w is None:
            if not is_settlement(wallet_id):
                self.fail(f"shard {shard}: posting to unknown wallet {wallet_id}")
            w = self.wallets[wallet_id] = _Wallet(currency, True, shard)
        if w.currency != currency:
            self.fail(f"{currency} posted to {w.currency} wallet {wallet_id}")
        return w

    def _post(self, wallet_id: str, currency: str, delta: int, shard: int,
              touched: set[str]) -> None:
        w = self._wallet(wallet_id, currency, shard)
        if w.shard != shard:
            self.fail(f"wallet {wallet_id} of shard {w.shard} changed by shard {shard}")
        w.balance += delta
        w.balance_by_version.append(w.balance)
        self.books[currency] = self.books.get(currency, 0) + delta
        touched.add(wallet_id)

    def _execute(self, caller: str, key: str, execution: Execution, shard: int) -> None:
        done = self.executions.setdefault((caller, key), [])
        if execution in done:
            return
        done.append(execution)
        if len(done) > 1:
            self.fail(f"idempotency key {key!r} executed twice: {done[0]} and then "
                      f"{execution} (on shard {shard})")
        if execution in self.refused.get((caller, key), ()):
            self.fail(f"key {key!r}: {execution} executed after it was answered refused")

    def _wallet_created(self, shard: int, e: WalletCreated, touched: set[str]) -> None:
        if e.wallet_id in self.wallets:
            self.fail(f"wallet {e.wallet_id} created twice (again on shard {shard})")
            return
        self.wallets[e.wallet_id] = _Wallet(e.currency, e.allow_negative, shard)
        self._execute(e.caller, e.idempotency_key,
                      ("wallet", (e.wallet_id, e.currency, e.allow_negative)), shard)

    def _transfer_decided(self, shard: int, e: TransferDecided, touched: set[str]) -> None:
        t = e.transfer
        hold = self.holds.get(e.closes_hold) if e.closes_hold else None
        if hold is not None and (hold.chain_id or t.state == STATE_COMMITTED):
            if hold.state != HOLD_HELD:
                self.fail(f"hold {e.closes_hold} closed twice")
            hold.state = "CLOSED"
            self.wallets[hold.wallet_id].held -= hold.amount
            touched.add(hold.wallet_id)
        previous = self.decided.get(t.transfer_id)
        self.decided[t.transfer_id] = t.state
        if t.state != STATE_COMMITTED:
            if previous == STATE_COMMITTED:
                self.fail(f"transfer {t.transfer_id} refused after it committed")
            return
        if t.transfer_id in self.committed:
            self.fail(f"transfer {t.transfer_id} committed twice (again on shard {shard})")
            return
        self.committed[t.transfer_id] = t.copy()
        funded = self.envelopes.get(envelope_of_escrow(t.to_wallet_id))
        if t.kind == KIND_HOLD_CAPTURE:
            execution = ("capture", (e.closes_hold, t.to_wallet_id, t.amount_minor, t.memo))
        elif t.kind == KIND_ENVELOPE_FUND and funded is not None:
            execution = envelope_execution(funded.opened)
        else:
            execution = ("move", move_payload(t))
        self._execute(t.caller, t.idempotency_key, execution, shard)
        if t.kind in (KIND_ENVELOPE_FUND, KIND_ENVELOPE_GRAB, KIND_ENVELOPE_REFUND):
            self._envelope_transfer(shard, t, execution)
        self._post(t.from_wallet_id, t.currency, -t.amount_minor, shard, touched)
        if e.to_shard == shard:
            self._post(t.to_wallet_id, t.currency, t.amount_minor, shard, touched)
            self._credited(t.transfer_id, t.kind, t.to_wallet_id, t.amount_minor)
            return
        link = (shard, e.to_shard)
        items = self.outbox.setdefault(link, {})
        if e.outbox_seq != len(items) + 1:
            self.fail(f"shard {shard}: outbox seq {e.outbox_seq} to shard {e.to_shard} "
                      f"follows {len(items)}")
        items[e.outbox_seq] = (t.transfer_id, t.to_wallet_id, t.amount_minor, t.currency)
        early = self.early.pop((shard, e.to_shard, e.outbox_seq), None)
        if early is None:
            self.books[t.currency] = self.books.get(t.currency, 0) + t.amount_minor
        elif early != items[e.outbox_seq]:
            self.fail(f"shard {e.to_shard} applied credit {early} as outbox item "
                      f"{shard}->{e.to_shard} #{e.outbox_seq}, which is now durably "
                      f"{items[e.outbox_seq]}: one credit created, one lost")

    def _credits_applied(self, shard: int, e: CreditsApplied, touched: set[str]) -> None:
        link = (e.from_shard, shard)
        applied = self.applied.get(link, 0)
        items = self.outbox.get(link, {})
        for c in e.credits:
            if c.outbox_seq != applied + 1:
                self.fail(f"shard {shard} applied credit #{c.outbox_seq} from shard "
                          f"{e.from_shard} after #{applied}")
            applied = c.outbox_seq
            credit = (c.transfer_id, c.to_wallet_id, c.amount_minor, c.currency)
            owed = items.get(c.outbox_seq)
            if owed is None:
                self.early_credits += 1
                self.early[(e.from_shard, shard, c.outbox_seq)] = credit
                if self.strict:
                        self.fail(f"shard {shard} applied credit #{c.outbox_seq} from shard "
                              f"{e.from_shard} ({c.transfer_id}, {c.amount_minor} "
                              f"{c.currency}) before its debit was durable on shard "
                              f"{e.from_shard}")
            elif owed != credit:
                self.fail(f"shard {shard} applied {credit} as credit #{c.outbox_seq} from "
                          f"shard {e.from_shard}, which owes {owed}")
            else:
                self.books[c.currency] = self.books.get(c.currency, 0) - c.amount_minor
            self._post(c.to_wallet_id, c.currency, c.amount_minor, shard, touched)
            self._credited(c.transfer_id, c.kind, c.to_wallet_id, c.amount_minor)
        self.applied[link] = applied

    def _outbox_acked(self, shard: int, e: OutboxAcked, touched: set[str]) -> None:
        link = (shard, e.to_shard)
        if e.up_to_seq > self.applied.get(link, 0):
            self.fail(f"shard {shard} journaled the ack of credit #{e.up_to_seq} to shard "
                      f"{e.to_shard}, which applied only #{self.applied.get(link, 0)}")
        self.acked_up_to[link] = max(self.acked_up_to.get(link, 0), e.up_to_seq)

    def _hold_created(self, shard: int, e: HoldCreated, touched: set[str]) -> None:
        h = e.hold
        if h.hold_id in self.holds:
            self.fail(f"hold {h.hold_id} created twice")
            return
        self.holds[h.hold_id] = _Hold(h.wallet_id, h.amount_minor, "", HOLD_HELD,
                                      h.expires_at_ms)
        self.wallets[h.wallet_id].held += h.amount_minor
        touched.add(h.wallet_id)
        self._execute(h.caller, h.idempotency_key, ("hold", (
            h.wallet_id, h.amount_minor, h.currency, h.expires_at_ms - h.created_at_ms)), shard)

    def _hold_released(self, shard: int, e: HoldReleased, touched: set[str]) -> None:
        hold = self.holds[e.hold_id]
        if hold.state != HOLD_HELD:
            self.fail(f"hold {e.hold_id} released after it was closed")
        hold.state = e.state
        self.wallets[hold.wallet_id].held -= hold.amount
        touched.add(hold.wallet_id)
        if e.idempotency_key:
            self._execute(e.caller, e.idempotency_key, ("release", (e.hold_id,)), shard)

    def _chain_prepared(self, shard: int, e: ChainPrepared, touched: set[str]) -> None:
        t = e.transfer
        if t.transfer_id in self.holds:
            self.fail(f"chain item {t.transfer_id} prepared twice")
            return
        self._wallet(t.from_wallet_id, t.currency, shard).held += t.amount_minor
        self.holds[t.transfer_id] = _Hold(t.from_wallet_id, t.amount_minor, e.chain_id)
        touched.add(t.from_wallet_id)

    def _chain_decided(self, shard: int, e: ChainDecided, touched: set[str]) -> None:
        if self.chains.get(e.chain_id, e.committed) != e.committed:
            self.fail(f"chain {e.chain_id} decided both ways")
        self.chains[e.chain_id] = e.committed

    # --- red envelopes, as journaled ----------------------------------------------------

    def _count(self, kind: str) -> None:
        self.envelope_counts[kind] = self.envelope_counts.get(kind, 0) + 1

    def _envelope_opened(self, shard: int, e: EnvelopeOpened, touched: set[str]) -> None:
        env = e.envelope
        escrow = escrow_wallet_id(env.envelope_id)
        if env.envelope_id in self.envelopes or escrow in self.wallets:
            self.fail(f"envelope {env.envelope_id} opened twice (again on shard {shard})")
            return
        self.wallets[escrow] = _Wallet(env.currency, False, shard)
        self.envelopes[env.envelope_id] = _Envelope(env.copy(), shard)
        self._count("envelope opened")

    def _credited(self, transfer_id: str, kind: str, to_wallet_id: str, amount: int) -> None:
        """A transfer's credit landed (in its debit's batch, or applied from an outbox)."""
        self.credited[transfer_id] = self.credited.get(transfer_id, 0) + 1
        if kind != KIND_ENVELOPE_FUND:
            return
        envelope = self.envelopes.get(envelope_of_escrow(to_wallet_id))
        if envelope is None:
            self.fail(f"funding {transfer_id} landed on {to_wallet_id}, no envelope's escrow")
            return
        terms = envelope.opened
        if envelope.funded or envelope.abandoned:
            self.fail(f"envelope {terms.envelope_id} funded twice or after it was abandoned "
                      f"({transfer_id})")
        elif transfer_id != terms.funding_transfer_id or amount != terms.total_minor:
            self.fail(f"envelope {terms.envelope_id} funded by {transfer_id} with {amount}; "
                      f"its terms say {terms.funding_transfer_id} with {terms.total_minor}")
        else:
            envelope.funded = True
            envelope.left, envelope.left_shares = terms.total_minor, terms.shares
            self._count("envelope funded")

    def _envelope_transfer(self, shard: int, t: Transfer, execution: Execution) -> None:
        """The money of an envelope event: each is the transfer its event says."""
        if t.kind == KIND_ENVELOPE_FUND:
            envelope = self.envelopes.get(envelope_of_escrow(t.to_wallet_id))
            if envelope is None:
                self.fail(f"funding {t.transfer_id} committed for {t.to_wallet_id}, not the "
                          f"escrow of a durably opened envelope")
            elif (t.transfer_id, t.from_wallet_id, t.amount_minor, t.currency) != (
                    envelope.opened.funding_transfer_id, envelope.opened.sender_wallet_id,
                    envelope.opened.total_minor, envelope.opened.currency):
                self.fail(f"funding {t.transfer_id} of envelope {envelope.opened.envelope_id}"
                          f" is not the one its terms name")
        elif t.kind == KIND_ENVELOPE_GRAB:
            grab = self._batch_grabs.pop(t.transfer_id, None)
            envelope = self.envelopes.get(grab.envelope_id) if grab is not None else None
            if grab is None or envelope is None:
                self.fail(f"shard {shard}: grab transfer {t.transfer_id} without an "
                          f"EnvelopeGrabbed before it in its batch")
            elif (t.from_wallet_id, t.to_wallet_id, t.amount_minor, t.currency, t.caller,
                  t.idempotency_key) != (escrow_wallet_id(grab.envelope_id),
                                         grab.receiver_wallet_id, grab.amount_minor,
                                         envelope.opened.currency, grab.caller,
                                         grab.idempotency_key):
                self.fail(f"grab transfer {t.transfer_id} moves {move_payload(t)}, its grab "
                          f"says {grab}")
        else:
            refund = self._batch_refunds.pop(t.transfer_id, None)
            envelope = self.envelopes.get(refund.envelope_id) if refund is not None else None
            if refund is None or envelope is None:
                self.fail(f"shard {shard}: refund transfer {t.transfer_id} without an "
                          f"EnvelopeRefunded before it in its batch")
            elif (t.from_wallet_id, t.to_wallet_id, t.amount_minor, t.currency) != (
                    escrow_wallet_id(refund.envelope_id), envelope.opened.sender_wallet_id,
                    refund.amount_minor, envelope.opened.currency):
                self.fail(f"refund transfer {t.transfer_id} moves {move_payload(t)}, its "
                          f"refund says {refund}")
            # Nobody is answered for the sweep's refund: the ledger acknowledges it itself.
            self.acknowledged[(t.caller, t.idempotency_key)] = execution

    def _envelope_grabbed(self, shard: int, e: EnvelopeGrabbed, touched: set[str]) -> None:
        g = e.grab
        envelope = self.envelopes.get(g.envelope_id)
        if envelope is None:
            self.fail(f"shard {shard}: grab of envelope {g.envelope_id}, never opened")
            return
        terms = envelope.opened
        name = f"grab of {g.envelope_id} by {g.receiver_wallet_id} at position {g.position}"
        key = (g.caller, g.idempotency_key)
        problems = []
        if envelope.shard != shard:
            problems.append(f"decided on shard {shard}, the envelope is on {envelope.shard}")
        if not envelope.funded:
            problems.append("the envelope is not funded")
        if envelope.refund_transfer_id:
            problems.append("the envelope was refunded")
        if g.at_ms >= terms.expires_at_ms:
            problems.append(f"{g.at_ms - terms.expires_at_ms} ms after the expiry")
        if envelope.left_shares <= 0:
            problems.append("no share left: granted twice")
        if g.position in envelope.grabs:
            problems.append(f"position {g.position} granted twice "
                            f"(first {envelope.grabs[g.position]})")
        elif g.position != terms.shares - envelope.left_shares:
            problems.append(f"out of turn: position {terms.shares - envelope.left_shares} "
                            f"is next")
        if g.receiver_wallet_id in envelope.by_receiver:
            problems.append(f"the receiver grabbed before "
                            f"({envelope.by_receiver[g.receiver_wallet_id]})")
        if terms.receiver_wallet_id and g.receiver_wallet_id != terms.receiver_wallet_id:
            problems.append(f"the envelope is for {terms.receiver_wallet_id} only")
        if key in self.grab_by_key:
            problems.append(f"the key {g.idempotency_key!r} grabbed before "
                            f"({self.grab_by_key[key]})")
        if (g.caller, g.idempotency_key, g.receiver_wallet_id) in self.grab_refused:
            problems.append("executed after this key was answered refused")
        answered = self.grab_answers.get(key)
        if answered is not None and answered != (g.receiver_wallet_id, g.amount_minor):
            problems.append(f"the key was answered {answered}")
        problems += _split_problems(terms, g.position, g.amount_minor, envelope.left,
                                    envelope.left_shares)
        if problems:
            self.fail(f"{name}, {g.amount_minor}: " + "; ".join(problems))
        envelope.grabs[g.position] = g
        envelope.by_receiver.setdefault(g.receiver_wallet_id, g)
        self.grab_by_key.setdefault(key, g)
        envelope.left -= g.amount_minor
        envelope.left_shares -= 1
        self._batch_grabs[g.transfer_id] = g
        self._count("grab")

    def _envelope_refunded(self, shard: int, e: EnvelopeRefunded, touched: set[str]) -> None:
        envelope = self.envelopes.get(e.envelope_id)
        if envelope is None:
            self.fail(f"shard {shard}: refund of envelope {e.envelope_id}, never opened")
            return
        problems = []
        if envelope.refund_transfer_id:
            problems.append(f"refunded twice (first by {envelope.refund_transfer_id})")
        if not envelope.funded:
            problems.append("the envelope was never funded")
        if e.amount_minor != envelope.left or e.amount_minor <= 0:
            problems.append(f"{envelope.left} was left")
        if e.at_ms < envelope.opened.expires_at_ms:
            problems.append(f"{envelope.opened.expires_at_ms - e.at_ms} ms before the expiry")
        if problems:
            self.fail(f"refund of {e.envelope_id} ({e.amount_minor}): " + "; ".join(problems))
        envelope.refund_transfer_id = envelope.refund_transfer_id or e.transfer_id
        envelope.refunded += e.amount_minor
        envelope.left -= e.amount_minor
        self._batch_refunds[e.transfer_id] = e
        self._count("envelope refunded")

    def _envelope_abandoned(self, shard: int, e: EnvelopeAbandoned, touched: set[str]) -> None:
        envelope = self.envelopes.get(e.envelope_id)
        if envelope is None or envelope.funded:
            self.fail(f"shard {shard}: envelope {e.envelope_id} abandoned, but it was "
                      f"{'never opened' if envelope is None else 'funded'}")
            return
        envelope.abandoned = True
        self._count("envelope abandoned")

    def _ignore(self, shard: int, e: object, touched: set[str]) -> None:
        pass

    # --- what clients were told ---------------------------------------------------------

    def answered(self, caller: str, key: str, execution: Execution, outcome: Outcome,
                 transfer_id: str = "") -> None:
        """A client got a definitive answer to ``execution`` under ``key``: check it now and
        hold the ledger to it forever after."""
        done = self.executions.get((caller, key), [])
        if outcome.ok:
            if execution not in done:
                self.fail(f"key {key!r}: answered OK for {execution}, which is not durable")
            if transfer_id:
                value = outcome.value
                if not isinstance(value, Transfer) or value.transfer_id != transfer_id:
                    self.fail(f"key {key!r}: OK answer names {value!r}, not {transfer_id}")
                elif transfer_id not in self.committed:
                    self.fail(f"key {key!r}: OK answer for {transfer_id}, not committed")
            before = self.acknowledged.get((caller, key))
            if before is not None and before != execution:
                self.fail(f"key {key!r}: acknowledged {before} and then {execution}")
            self.acknowledged[(caller, key)] = execution
        else:
            if execution in done:
                self.fail(f"key {key!r}: answered {outcome.status.name} for {execution}, "
                          f"which executed")
            self.refused.setdefault((caller, key), set()).add(execution)

    def envelope_answered(self, caller: str, key: str, envelope_id: str, terms: tuple,
                          outcome: Outcome, funding_id: str) -> None:
        """A CreateEnvelope under ``key`` got a definitive answer. ``terms``: (sender,
        currency, kind, total, shares, receiver, memo, expiry_ms) as asked."""
        sender, currency, kind, total, shares, receiver, memo, expiry_ms = terms
        execution: Execution = ("envelope", (sender, escrow_wallet_id(envelope_id), total,
                                             currency, memo, kind, shares, receiver,
                                             expiry_ms))
        if not outcome.ok:
            value = outcome.value if isinstance(outcome.value, Transfer) else None
            self.answered(caller, key, execution, Outcome(outcome.status, outcome.field,
                                                          outcome.detail, value))
            return
        answer, funding = outcome.value
        durable = self.envelopes.get(envelope_id)
        if durable is None:
            self.fail(f"key {key!r}: answered OK for envelope {envelope_id}, not opened")
        else:
            d = durable.opened
            asked = (envelope_id, sender, currency, kind, total, shares, receiver, memo,
                     expiry_ms, funding_id)
            held = (d.envelope_id, d.sender_wallet_id, d.currency, d.kind, d.total_minor,
                    d.shares, d.receiver_wallet_id, d.memo, d.expires_at_ms - d.created_at_ms,
                    d.funding_transfer_id)
            told = (answer.envelope_id, answer.sender_wallet_id, answer.currency, answer.kind,
                    answer.total_minor, answer.shares, answer.receiver_wallet_id, answer.memo,
                    answer.expires_at_ms - answer.created_at_ms, answer.funding_transfer_id)
            if not asked == held == told or answer.seed != d.seed:
                self.fail(f"key {key!r}: envelope asked {asked}, journaled {held} "
                          f"(seed {d.seed}), answered {told} (seed {answer.seed})")
        self.answered(caller, key, execution, Outcome(Status.OK, value=funding,
                                                      replayed=outcome.replayed), funding_id)

    def grab_sending(self, caller: str, key: str, receiver: str) -> None:
        """A client is about to send a grab under ``key`` (envelope-scoped) for
        ``receiver``: a concurrent use of the key for another receiver may be refused as a
        reuse."""
        self.grab_sent.setdefault((caller, key), set()).add(receiver)

    def grab_answered(self, caller: str, key: str, envelope_id: str, receiver: str,
                      outcome: Outcome, now_ms: int) -> None:
        """A grab of ``envelope_id`` for ``receiver`` under ``key`` (the envelope-scoped
        key, as journaled) got a definitive answer at ``now_ms``."""
        envelope = self.envelopes.get(envelope_id)
        durable = self.grab_by_key.get((caller, key))
        status = outcome.status
        self._count(f"grab answered {status.name}" + (" replayed" if outcome.replayed else ""))
        if outcome.ok:
            grab, transfer = outcome.value
            told = (grab.envelope_id, grab.position, grab.receiver_wallet_id, grab.amount_minor,
                    grab.transfer_id)
            if durable is None or envelope is None:
                self.fail(f"grab {key!r}: answered OK {told}, which is not durable")
                return
            held = (durable.envelope_id, durable.position, durable.receiver_wallet_id,
                    durable.amount_minor, durable.transfer_id)
            if told != held or grab.receiver_wallet_id != receiver or (
                    isinstance(transfer, Transfer)
                    and transfer.amount_minor != durable.amount_minor):
                self.fail(f"grab {key!r} for {receiver}: answered {told}, the ledger holds "
                          f"{held}")
            before = self.grab_answers.get((caller, key))
            if before is not None and before != (receiver, grab.amount_minor):
                self.fail(f"grab {key!r}: answered {before} and then "
                          f"{(receiver, grab.amount_minor)}")
            self.grab_answers[(caller, key)] = (receiver, grab.amount_minor)
            execution: Execution = ("move", (KIND_ENVELOPE_GRAB, escrow_wallet_id(envelope_id),
                                             receiver, grab.amount_minor,
                                             envelope.opened.currency, envelope.opened.memo))
            self.answered(caller, key, execution, Outcome(Status.OK, value=transfer),
                          durable.transfer_id)
            return
        if durable is not None and durable.receiver_wallet_id == receiver:
            self.fail(f"grab {key!r} for {receiver}: answered {status.name}, but it executed "
                      f"({durable.amount_minor} at position {durable.position})")
        self.grab_refused.add((caller, key, receiver))
        if status not in _GRAB_REFUSALS:
            return
        wrong = ""
        if status is Status.ENVELOPE_NOT_FOUND:
            if envelope is not None:
                wrong = "the envelope is durably opened"
        elif envelope is None:
            wrong = "the envelope was never opened"
        elif status is Status.ENVELOPE_ALREADY_GRABBED:
            prior = outcome.value[0] if outcome.value else None
            mine = envelope.by_receiver.get(receiver)
            if mine is None:
                wrong = "the receiver has no durable grab of it"
            elif (mine.caller, mine.idempotency_key) == (caller, key):
                wrong = "its grab is this key's: a retry must replay it"
            elif prior is None or prior.amount_minor != mine.amount_minor:
                wrong = f"told {prior}, the ledger holds {mine}"
        elif status is Status.ENVELOPE_SOLD_OUT:
            if not envelope.funded or envelope.left_shares:
                wrong = f"{envelope.left_shares} shares are left (funded: {envelope.funded})"
        elif status is Status.ENVELOPE_EXPIRED:
            if now_ms < envelope.opened.expires_at_ms and not envelope.refund_transfer_id:
                wrong = f"it expires in {envelope.opened.expires_at_ms - now_ms} ms"
        elif status is Status.ENVELOPE_UNFUNDED:
            if envelope.funded:
                wrong = "the envelope is durably funded"
        elif status is Status.ENVELOPE_NOT_ELIGIBLE:
            if envelope.opened.receiver_wallet_id in ("", receiver):
                wrong = "the receiver is eligible"
        elif status is Status.IDEMPOTENCY_KEY_REUSED:
            if not self.grab_sent.get((caller, key), set()) - {receiver}:
                wrong = "the key was never sent for another receiver"
        if wrong:
            self.fail(f"grab {key!r} of {envelope_id} for {receiver}: answered "
                      f"{status.name}, but {wrong}")

    def envelope_read(self, envelope: Envelope, grabs: list[Grab], luckiest: Grab | None,
                      complete: bool) -> None:
        """A GetEnvelope answer: a durable state of the envelope (``complete``: every grab
        is on the page)."""
        durable = self.envelopes.get(envelope.envelope_id)
        if durable is None:
            self.fail(f"read of envelope {envelope.envelope_id}, which is not durable")
            return
        d = durable.opened
        for g in grabs:
            if durable.grabs.get(g.position) != g:
                self.fail(f"read of envelope {d.envelope_id} shows {g}, the ledger holds "
                          f"{durable.grabs.get(g.position)}")
        if (envelope.total_minor, envelope.shares, envelope.kind, envelope.seed,
                envelope.expires_at_ms) != (d.total_minor, d.shares, d.kind, d.seed,
                                            d.expires_at_ms):
            self.fail(f"read of envelope {d.envelope_id} shows other terms: {envelope}")
        if envelope.left_minor not in durable.lefts and envelope.left_minor != durable.left:
            self.fail(f"read of envelope {d.envelope_id} shows {envelope.left_minor} left, "
                      f"never a durable amount left of it")
        if complete and envelope.funded_at_ms and (
                sum(g.amount_minor for g in grabs) + envelope.left_minor
                + envelope.refunded_minor != envelope.total_minor
                or len(grabs) + envelope.left_shares != envelope.shares):
            self.fail(f"read of envelope {d.envelope_id} does not add up: {envelope}, "
                      f"{len(grabs)} grabs")
        if complete:
            best = max(grabs, key=lambda g: (g.amount_minor, -g.position), default=None)
            if best != luckiest:
                self.fail(f"read of envelope {d.envelope_id}: luckiest {luckiest}, not {best}")

    def read(self, wallet_id: str, version: int, balance: int) -> None:
        """A read answered balance ``balance`` at ``version``: it must be a durable state."""
        w = self.wallets.get(wallet_id)
        if w is None:
            self.fail(f"read of wallet {wallet_id}, which is not durable")
        elif version >= len(w.balance_by_version) or w.balance_by_version[version] != balance:
            self.fail(f"read of {wallet_id} answered balance {balance} at version {version}, "
                      f"which is not a durable state of it")

    # --- the end ------------------------------------------------------------------------

    def in_doubt(self, expired_by_ms: int | None = None) -> list[str]:
        """What is still owed or undecided (empty once drained); given ``expired_by_ms``,
        also the envelopes expired by then with money left and no refund yet."""
        doubts = []
        if expired_by_ms is not None:
            for envelope_id, envelope in self.envelopes.items():
                if (envelope.funded and envelope.left and not envelope.refund_transfer_id
                        and envelope.opened.expires_at_ms <= expired_by_ms):
                    doubts.append(f"envelope {envelope_id} expired with {envelope.left} left, "
                                  f"not refunded")
        for (src, dst), items in self.outbox.items():
            if len(items) > self.applied.get((src, dst), 0):
                doubts.append(f"credits {src}->{dst} #{self.applied.get((src, dst), 0) + 1}.."
                              f"#{len(items)} not applied")
        for hold_id, hold in self.holds.items():
            if hold.chain_id and hold.state == HOLD_HELD:
                doubts.append(f"chain item {hold_id} still prepared")
        return doubts

    def final(self, initial: dict[str, int], now_ms: int) -> dict[str, int]:
        """Check the drained end state at ``now_ms``; returns the balances it found."""
        for doubt in self.in_doubt(now_ms):
            self.fail(f"in doubt after draining: {doubt}")
        for transfer_id, t in self.committed.items():
            if self.credited.get(transfer_id, 0) != 1:
                self.fail(f"transfer {transfer_id} ({t.kind}, {t.amount_minor}) credited "
                          f"{self.credited.get(transfer_id, 0)} times")
        for envelope_id, envelope in self.envelopes.items():
            amounts = [g.amount_minor for g in envelope.grabs.values()]
            terms = envelope.opened
            balance = self.wallets[escrow_wallet_id(envelope_id)].balance
            if not envelope.funded:
                if amounts or envelope.refunded or balance:
                    self.fail(f"envelope {envelope_id}, never funded, has grabs, a refund or "
                              f"money")
                continue
            if (sum(amounts) + envelope.left + envelope.refunded != terms.total_minor
                    or len(amounts) + envelope.left_shares != terms.shares
                    or sorted(envelope.grabs) != list(range(len(amounts)))
                    or len(envelope.by_receiver) != len(amounts) or balance != envelope.left):
                self.fail(f"envelope {envelope_id} does not add up: total {terms.total_minor}"
                          f" of {terms.shares}, grabs {sorted(envelope.grabs.items())}, left "
                          f"{envelope.left} of {envelope.left_shares} shares, refunded "
                          f"{envelope.refunded}, escrow {balance}")
        for hold_id, hold in self.holds.items():
            if (not hold.chain_id and hold.state == HOLD_HELD
                    and hold.expires_at_ms + HOLD_EXPIRY_SLACK_MS < now_ms):
                self.fail(f"hold {hold_id} still held {now_ms - hold.expires_at_ms} ms after "
                          f"its timeout")
        if self.early:
            self.fail(f"credits applied whose debit never became durable: {self.early}")
        for (caller, key), done in self.executions.items():
            acked = self.acknowledged.get((caller, key))
            if acked is None or acked not in done:
                self.fail(f"key {key!r}: {done} executed but never acknowledged")
        for (caller, key), execution in self.acknowledged.items():
            if execution not in self.executions.get((caller, key), ()):
                self.fail(f"key {key!r}: acknowledged {execution} never executed")
        # The replay check: initial balances plus every acknowledged money movement.
        expected = dict(initial)
        for kind, payload in self.acknowledged.values():
            if kind == "move":
                _, source, target, amount = payload[:4]
            elif kind == "envelope":
                source, target, amount = payload[:3]
            elif kind == "capture":
                source = self.holds[payload[0]].wallet_id
                target, amount = payload[1], payload[2]
            else:
                continue
            expected[source] = expected.get(source, 0) - amount
            expected[target] = expected.get(target, 0) + amount
        found = {w: v.balance for w, v in self.wallets.items()}
        for wallet_id in sorted(set(expected) | set(found)):
            if expected.get(wallet_id, 0) != found.get(wallet_id, 0):
                self.fail(f"replay check: {wallet_id} holds {found.get(wallet_id, 0)}, "
                          f"acknowledged transfers say {expected.get(wallet_id, 0)}")
        return found


_FOLD = {
    WalletCreated: Oracle._wallet_created,
    TransferDecided: Oracle._transfer_decided,
    CreditsApplied: Oracle._credits_applied,
    OutboxAcked: Oracle._outbox_acked,
    HoldCreated: Oracle._hold_created,
    HoldReleased: Oracle._hold_released,
    ChainPrepared: Oracle._chain_prepared,
    ChainDecided: Oracle._chain_decided,
    EnvelopeOpened: Oracle._envelope_opened,
    EnvelopeGrabbed: Oracle._envelope_grabbed,
    EnvelopeRefunded: Oracle._envelope_refunded,
    EnvelopeAbandoned: Oracle._envelope_abandoned,
    KeyClaimed: Oracle._ignore,
    IdempotencyExpired: Oracle._ignore,
}

def envelope_execution(e: Envelope) -> Execution:
    """What creating ``e`` executes: its funding, under the terms it was opened with."""
    return ("envelope", (e.sender_wallet_id, escrow_wallet_id(e.envelope_id), e.total_minor,
                         e.currency, e.memo, e.kind, e.shares, e.receiver_wallet_id,
                         e.expires_at_ms - e.created_at_ms))


def _split_problems(terms: Envelope, position: int, amount: int, left: int,
                    left_shares: int) -> list[str]:
    """Why ``amount`` cannot be the share at ``position`` with ``left`` and ``left_shares``
    left before it: the split's rules, restated (``ledger.core.split`` is what is checked)."""
    low = terms.min_share_minor
    problems = []
    if left_shares <= 0:
        return problems
    if amount < low or left - amount < low * (left_shares - 1):
        problems.append(f"breaks the minimum share {low} ({left} left for {left_shares})")
    if left_shares == 1 and amount != left:
        problems.append(f"the last share must take what is left, {left}")
    if terms.kind == "FIXED":
        fixed = terms.total_minor // terms.shares + (
            1 if position < terms.total_minor % terms.shares else 0)
        if amount != fixed:
            problems.append(f"a FIXED share at position {position} is {fixed}")
    elif terms.kind == "LUCKY" and left_shares > 1 and amount > 2 * left // left_shares - low:
        problems.append(f"above the double mean {2 * left // left_shares - low}")
    return problems


__all__ = ["Oracle", "Execution", "move_payload"]
