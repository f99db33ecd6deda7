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
* nothing a client was told was refused ever executes later.

Clients report every definitive answer (``answered``): an OK must already be durable, a
refusal must not be; a balance read must be a durable state of the wallet (``read``).
``final`` checks the end state after healing and draining: nothing owed, no chain undecided,
no client hold held long past its timeout, every execution acknowledged and every
acknowledgement executed once, balances equal to the replay of acknowledged requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ledger.core import codec
from ledger.core.model import (
    HOLD_HELD, KIND_HOLD_CAPTURE, STATE_COMMITTED, ChainDecided, ChainPrepared,
    CreditsApplied, HoldCreated, HoldReleased, IdempotencyExpired, KeyClaimed, OutboxAcked,
    Transfer, TransferDecided, WalletCreated, is_settlement,
)
from ledger.core.status import Outcome
from ledger.store.port import JournalBatch


# What a request executes, as the oracle compares it: (kind, payload).
#   ("move", (transfer kind, from, to, amount, currency, memo))   Post / chain item
#   ("capture", (hold_id, to, amount resolved, memo))              CaptureHold
#   ("hold", (wallet, amount, currency, timeout_ms))               CreateHold
#   ("release", (hold_id,))                                        ReleaseHold
#   ("wallet", (wallet_id, currency, allow_negative))              CreateWallet
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
        for event in codec.loads(batch.events):
            handler = _FOLD.get(type(event))
            if handler is not None:
                handler(self, shard, event, touched)
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
        if t.kind == KIND_HOLD_CAPTURE:
            execution = ("capture", (e.closes_hold, t.to_wallet_id, t.amount_minor, t.memo))
        else:
            execution = ("move", move_payload(t))
        self._execute(t.caller, t.idempotency_key, execution, shard)
        self._post(t.from_wallet_id, t.currency, -t.amount_minor, shard, touched)
        if e.to_shard == shard:
            self._post(t.to_wallet_id, t.currency, t.amount_minor, shard, touched)
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

    def read(self, wallet_id: str, version: int, balance: int) -> None:
        """A read answered balance ``balance`` at ``version``: it must be a durable state."""
        w = self.wallets.get(wallet_id)
        if w is None:
            self.fail(f"read of wallet {wallet_id}, which is not durable")
        elif version >= len(w.balance_by_version) or w.balance_by_version[version] != balance:
            self.fail(f"read of {wallet_id} answered balance {balance} at version {version}, "
                      f"which is not a durable state of it")

    # --- the end ------------------------------------------------------------------------

    def in_doubt(self) -> list[str]:
        """What is still owed or undecided (empty once drained)."""
        doubts = []
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
        for doubt in self.in_doubt():
            self.fail(f"in doubt after draining: {doubt}")
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
    KeyClaimed: Oracle._ignore,
    IdempotencyExpired: Oracle._ignore,
}

__all__ = ["Oracle", "Execution", "move_payload"]
