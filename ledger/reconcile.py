"""Reconciliation: prove from the store alone that the books are right, or name what is wrong.

Reads every shard's latest snapshot and its journal after it (not the owners' memory; the
journal before a snapshot is truncated), replays it through the pure core (an event that
breaks an invariant on replay is itself a finding), and checks:

1. per currency, all balances (settlement accounts included) plus money in transit between
   shards sum to zero;
2. every committed transfer was decided once, and its credit leg applied at most once (exactly
   once unless still in transit);
3. no wallet below zero unless allowed;
4. no hold past its timeout (beyond a grace for the releasing sweep);
5. no transfer in doubt past the recovery timeout (undelivered credits, undecided chain items);
6. materialized wallet rows agree with the journal;
7. every red envelope adds up: grabbed + refunded + left = total, its escrow holds what is
   left, every grab's credit was committed once for its amount and is credited or still owed,
   and an expired envelope's rest was refunded (beyond a grace for the refunding sweep).

Journals are read one shard after another while the ledger may be running; to judge the books
at one consistent cut, a credit whose debit lies beyond the cut read from the debit shard is set
aside (it belongs to a later cut).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from ledger.constants import (RECONCILE_HOLD_GRACE_MS, RECONCILE_JOURNAL_PAGE_BATCHES,
                              RECONCILE_ROWS_SETTLE_POLL_S, RECONCILE_ROWS_SETTLE_S,
                              RECONCILE_SHARD_READ_ATTEMPTS_MAX)
from ledger.compaction import CompactionError
from ledger.compaction import decode as decode_snapshot
from ledger.core import codec
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledger.core.invariants import InvariantViolation
from ledger.core.model import (
    HOLD_HELD, STATE_COMMITTED, CreditsApplied, TransferDecided, escrow_wallet_id, luckiest,
)
from ledger.core.shard import Event, ShardState
from ledger.core.step import fold
from ledger.store.port import JournalStore

# Limits of the reconciliation (their units and effects: ledger/constants.py).
JOURNAL_PAGE_BATCHES = RECONCILE_JOURNAL_PAGE_BATCHES
ROWS_SETTLE_S = RECONCILE_ROWS_SETTLE_S
ROWS_SETTLE_POLL_S = RECONCILE_ROWS_SETTLE_POLL_S
HOLD_GRACE_MS = RECONCILE_HOLD_GRACE_MS
SHARD_READ_ATTEMPTS_MAX = RECONCILE_SHARD_READ_ATTEMPTS_MAX


@dataclass
class Finding:
    check: str
    shard: int
    subject: str
    detail: str


@dataclass
class Report:
    shards: int = 0
    batches: int = 0              # journal batches read (after each shard's snapshot)
    snapshot_batches: int = 0     # batches covered by the snapshots read instead
    wallets: int = 0
    transfers_committed: int = 0
    transfers_refused: int = 0
    totals: dict[str, int] = field(default_factory=dict)       # balances per currency
    in_transit: dict[str, int] = field(default_factory=dict)   # debited, not yet credited
    findings: list[Finding] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)       # check -> findings count
    envelopes: int = 0            # red envelopes the owners still keep
    grabs: int = 0
    envelope_minor: dict[str, int] = field(default_factory=dict)  # "grabbed", "refunded", "left"

    @property
    def clean(self) -> bool:
        return not self.findings

    def add(self, check: str, shard: int, subject: str, detail: str) -> None:
        self.findings.append(Finding(check, shard, subject, detail))
        self.checks[check] = self.checks.get(check, 0) + 1

    def to_json(self) -> dict:
        return {
            "clean": self.clean, "shards": self.shards, "batches": self.batches,
            "snapshot_batches": self.snapshot_batches,
            "wallets": self.wallets, "transfers_committed": self.transfers_committed,
            "transfers_refused": self.transfers_refused, "totals": self.totals,
            "in_transit": self.in_transit, "envelopes": self.envelopes, "grabs": self.grabs,
            "envelope_minor": self.envelope_minor,
            "checks": {c: self.checks.get(c, 0) for c in CHECKS},
            "findings": [f.__dict__ for f in self.findings],
        }


CHECKS = ("journal_replays", "books_balance", "legs_once", "non_negative", "holds_timely", "nothing_in_doubt",
          "rows_match_journal", "envelopes", "headroom_grants")


async def reconcile(store: JournalStore, shard_count: int, now_ms: int | None = None,
                    recovery_timeout_ms: int = RECOVERY_TIMEOUT_MS,
                    progress: Callable[[int, int], None] | None = None) -> Report:
    """Run every check over shards ``0..shard_count-1`` of ``store``."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    report = Report(shards=shard_count)
    states: dict[int, ShardState] = {}
    decided: dict[str, int] = {}          # transfer_id -> times committed
    credited: dict[str, int] = {}         # transfer_id -> times credited
    credits: dict[int, list] = {}         # dst shard -> [(src, Credit)]
    before_snapshot: set[str] = set()     # credits whose debit a snapshot holds
    snapshot_outbox: dict[int, dict[int, int]] = {}
    for shard in range(shard_count):
        read = await read_shard(store, shard)
        state = read.state
        for check, subject, detail in read.findings:
            report.add(check, shard, subject, detail)
        report.batches += read.batches
        report.snapshot_batches += read.snapshot_seq
        report.transfers_committed += read.committed
        report.transfers_refused += read.refused
        for tid, count in read.decided.items():
            decided[tid] = decided.get(tid, 0) + count
        for tid, count in read.credited.items():
            credited[tid] = credited.get(tid, 0) + count
        if read.credits:
            credits[shard] = read.credits
        snapshot_outbox[shard] = read.snapshot_outbox
        states[shard] = state
        if progress is not None:
            progress(shard + 1, shard_count)
    # A credit applied after its credit shard's snapshot whose debit its debit shard's
    # snapshot already holds (the journal of that debit is truncated): the debit shard's
    # outbox sequence says it was decided there; its transfer record may be purged already.
    for dst, items in credits.items():
        for src, credit in items:
            if credit.outbox_seq <= snapshot_outbox.get(src, {}).get(dst, 0):
                before_snapshot.add(credit.transfer_id)

    # A credit whose debit is not in the part of its debit shard's journal read here: if the
    # debit shard was read before the credit shard, the debit may have been journaled after
    # that read (a later cut) - it is set aside if the journal holds it now. Otherwise the
    # credit has no debit, and the checks below name it.
    beyond: dict[str, int] = {}
    late_transfers: set[str] = set()
    for dst, items in credits.items():
        for src, credit in items:
            if src not in states or credit.outbox_seq <= states[src].outbox_last_seq.get(dst, 0):
                continue
            if src < dst and await _journaled_after(store, src, states[src].seq, dst,
                                                    credit.outbox_seq):
                beyond[credit.currency] = beyond.get(credit.currency, 0) + credit.amount_minor
                late_transfers.add(credit.transfer_id)

    for shard, state in states.items():
        for wallet in state.wallets.values():
            report.wallets += 1
            report.totals[wallet.currency] = (report.totals.get(wallet.currency, 0)
                                              + wallet.balance_minor)
            if not wallet.allow_negative and wallet.balance_minor - wallet.held_minor < 0:
                report.add("non_negative", shard, wallet.wallet_id,
                           f"available {wallet.balance_minor - wallet.held_minor} < 0")
        for dst, by_seq in state.outbox.items():
            applied = states[dst].inbox_applied.get(shard, 0) if dst in states else 0
            for seq, credit in by_seq.items():
                if seq > applied:  # not applied on the credit shard yet: in transit
                    report.in_transit[credit.currency] = (report.in_transit.get(
                        credit.currency, 0) + credit.amount_minor)
                    if now - credit.at_ms > recovery_timeout_ms:
                        report.add("nothing_in_doubt", shard, credit.transfer_id,
                                   f"credit to shard {dst} undelivered for "
                                   f"{(now - credit.at_ms) / 1000:.1f} s")
        for hold in state.holds.values():
            if hold.state != HOLD_HELD:
                continue
            if hold.chain_id:
                if now - hold.created_at_ms > recovery_timeout_ms:
                    report.add("nothing_in_doubt", shard, hold.hold_id,
                               f"linked chain {hold.chain_id} undecided for "
                               f"{(now - hold.created_at_ms) / 1000:.1f} s")
            elif now > hold.expires_at_ms + HOLD_GRACE_MS:
                report.add("holds_timely", shard, hold.hold_id,
                           f"held {(now - hold.expires_at_ms) / 1000:.1f} s past its timeout")

    for shard, state in states.items():
        for subject, detail in _envelope_problems(state, now, report):
            report.add("envelopes", shard, subject, detail)
    for shard, subject, detail in _grant_problems(states):
        report.add("headroom_grants", shard, subject, detail)

    for currency in set(report.totals) | set(report.in_transit) | set(beyond):
        total = (report.totals.get(currency, 0) + report.in_transit.get(currency, 0)
                 - beyond.get(currency, 0))
        if total != 0:
            report.add("books_balance", -1, currency,
                       f"balances + in transit = {total}, not 0")

    for tid, count in decided.items():
        if count != 1:
            report.add("legs_once", -1, tid, f"committed {count} times")
        got = credited.get(tid, 0)
        if got > 1:
            report.add("legs_once", -1, tid, f"credited {got} times")
    for tid, count in credited.items():
        if tid not in decided and tid not in late_transfers and tid not in before_snapshot:
            report.add("legs_once", -1, tid, f"credited {count} times but never committed")

    for shard, state in states.items():
        # Rows are written behind the journal (a bounded lag): a row behind its journal is
        # looked at again for a few seconds before it counts as a discrepancy.
        settle_until = time.monotonic() + ROWS_SETTLE_S
        while True:
            problems = _row_problems(state, await store.scan_wallets(shard))
            behind = [p for p in problems if p[2]]
            if not behind or time.monotonic() >= settle_until:
                break
            await asyncio.sleep(ROWS_SETTLE_POLL_S)
        for wallet_id, detail, _ in problems:
            report.add("rows_match_journal", shard, wallet_id, detail)
    return report


def _grant_problems(states: dict[int, ShardState]) -> list[tuple[int, str, str]]:
    """Headroom grants (PROTOCOL.md) agree across each pair of shards: a debit shard D may
    owe a credit shard R under grants only what R granted it (D's noted total <= R's granted
    total), and R cannot have landed more granted credits from D than D owed (R's used <=
    D's used). Shards are read one after the other (0 first) and both sides only grow, so
    each inequality is checked where the read order makes it exact: the first when D was
    read before R, the second when R was read before D."""
    problems = []
    for d, debit in states.items():
        for r, noted in debit.headroom_in.items():
            credit = states.get(r)
            if credit is None:
                continue
            granted = credit.grants_out.get(d, 0)
            if d < r and noted > granted:
                problems.append((d, f"shard {r}", f"noted {noted} of headroom from shard {r}, "
                                                  f"which granted {granted}"))
            landed, owed = credit.grants_used.get(d, 0), debit.headroom_used.get(r, 0)
            if r < d and landed > owed:
                problems.append((r, f"shard {d}", f"landed {landed} of granted credits from "
                                                  f"shard {d}, which owed {owed}"))
    for r, credit in states.items():
        for d, landed in credit.grants_used.items():
            if d in states and r < d and r not in states[d].headroom_in:
                problems.append((r, f"shard {d}", f"landed {landed} of granted credits from "
                                                  f"shard {d}, which noted no grant"))
    return problems


def _envelope_problems(state: ShardState, now: int, report: Report,
                       only: str = "") -> list[tuple[str, str]]:
    """What does not add up about the envelopes a shard keeps (and their totals, counted into
    ``report``). A grab whose transfer left the owner's memory (spilled: its credit was
    acknowledged before) was checked while it was there."""
    problems: list[tuple[str, str]] = []
    owed = state._owed()
    sums = report.envelope_minor
    for env in state.envelopes.values():
        if only and env.envelope_id != only:
            continue
        report.envelopes += 1
        grabs = state.grabs.get(env.envelope_id, {})
        report.grabs += len(grabs)
        grabbed = sum(g.amount_minor for g in grabs.values())
        sums["grabbed"] = sums.get("grabbed", 0) + grabbed
        sums["refunded"] = sums.get("refunded", 0) + env.refunded_minor
        sums["left"] = sums.get("left", 0) + env.left_minor
        escrow = state.wallets.get(escrow_wallet_id(env.envelope_id))
        if escrow is None or escrow.balance_minor != env.left_minor:
            problems.append((env.envelope_id, f"escrow holds "
                             f"{escrow.balance_minor if escrow else None}, left {env.left_minor}"))
        if env.funded_at_ms and (grabbed + env.refunded_minor + env.left_minor != env.total_minor
                                 or len(grabs) + env.left_shares != env.shares):
            problems.append((env.envelope_id, f"grabbed {grabbed} + refunded "
                             f"{env.refunded_minor} + left {env.left_minor} != total "
                             f"{env.total_minor} (or the shares do not add up)"))
        for g in grabs.values():
            t = state.transfers.get(g.transfer_id)
            if t is None:
                continue
            if (t.state != STATE_COMMITTED or t.amount_minor != g.amount_minor
                    or t.to_wallet_id != g.receiver_wallet_id):
                problems.append((g.transfer_id, f"grab {g.position} of {g.envelope_id} does "
                                 f"not match its transfer"))
            elif not t.credited and g.transfer_id not in owed:
                problems.append((g.transfer_id, f"grab {g.position} of {g.envelope_id} "
                                 f"neither credited nor owed"))
        if (env.funded_at_ms and env.left_minor and not env.refund_transfer_id
                and now > env.expires_at_ms + HOLD_GRACE_MS):
            problems.append((env.envelope_id, f"{env.left_minor} left "
                             f"{(now - env.expires_at_ms) / 1000:.1f} s past its expiry, not "
                             f"refunded"))
    return problems


def _row_problems(state: ShardState, scanned: list) -> list[tuple[str, str, bool]]:
    """(wallet, what is wrong, whether the row is merely behind the journal)."""
    problems = []
    rows = {w.wallet_id: w for w in scanned}
    for wallet in state.wallets.values():
        row = rows.pop(wallet.wallet_id, None)
        if row is None:
            problems.append((wallet.wallet_id, "no materialized wallet row", True))
        elif row.version == wallet.version:
            if (row.balance_minor, row.held_minor) != (wallet.balance_minor, wallet.held_minor):
                problems.append((wallet.wallet_id,
                                 f"row balance {row.balance_minor}/held {row.held_minor}, "
                                 f"journal {wallet.balance_minor}/{wallet.held_minor}", False))
        elif row.version < wallet.version:
            problems.append((wallet.wallet_id, f"row at version {row.version}, journal at "
                             f"{wallet.version}", True))
        # A row newer than the journal cut was written after this shard was read.
    for wallet_id in rows:
        problems.append((wallet_id, "row without journal entries", False))
    return problems


async def _journaled_after(store: JournalStore, shard: int, after_seq: int, to_shard: int,
                           outbox_seq: int) -> bool:
    """True if ``shard``'s journal after ``after_seq`` owes ``to_shard`` its ``outbox_seq``."""
    while True:
        page = await store.read_journal(shard, after_seq, JOURNAL_PAGE_BATCHES)
        for batch in page:
            for event in codec.loads(batch.events):
                if (type(event) is TransferDecided and event.to_shard == to_shard
                        and event.outbox_seq == outbox_seq):
                    return True
        if len(page) < JOURNAL_PAGE_BATCHES:
            return False
        after_seq = page[-1].seq




@dataclass
class _ShardRead:
    """One shard's snapshot and journal after it, folded, with what the checks need."""

    state: ShardState
    snapshot_seq: int = 0
    snapshot_outbox: dict[int, int] = field(default_factory=dict)  # its outbox_last_seq
    batches: int = 0
    committed: int = 0
    refused: int = 0
    decided: dict[str, int] = field(default_factory=dict)
    credited: dict[str, int] = field(default_factory=dict)
    credits: list = field(default_factory=list)          # [(src shard, Credit)]
    findings: list = field(default_factory=list)         # [(check, subject, detail)]
    truncated: bool = False   # the journal after the snapshot was gone: read again


class _ReadObserver:
    """Counts what a shard's journal decided and credited as ``fold`` applies it, and turns
    gaps and events that do not apply into findings (``ledger.core.step.FoldObserver``)."""

    def __init__(self, read: _ShardRead, shard: int) -> None:
        self._read = read
        self._shard = shard

    def on_gap(self, seq: int, expected: int) -> None:
        self._read.findings.append(("legs_once", f"batch {seq}",
                                    f"journal gap: expected batch {expected}"))

    def on_violation(self, seq: int, error: InvariantViolation) -> None:
        self._read.findings.append(("journal_replays", f"batch {seq}", str(error)))

    def on_event(self, seq: int, event: Event) -> None:
        read = self._read
        if type(event) is TransferDecided:
            if event.transfer.state == STATE_COMMITTED:
                tid = event.transfer.transfer_id
                read.decided[tid] = read.decided.get(tid, 0) + 1
                read.committed += 1
                if event.to_shard == self._shard:
                    read.credited[tid] = read.credited.get(tid, 0) + 1
            elif event.transfer.state != "PENDING":
                read.refused += 1
        elif type(event) is CreditsApplied:
            for credit in event.credits:
                read.credited[credit.transfer_id] = read.credited.get(credit.transfer_id,
                                                                      0) + 1
                read.credits.append((event.from_shard, credit))


async def read_shard(store: JournalStore, shard: int) -> _ShardRead:
    """Fold the shard's latest snapshot and the journal after it.

    Transfers the snapshot holds (those within the idempotency retention) count as decided
    once, so a second decision of one in the journal after it is still found; what was
    purged before the snapshot can no longer be checked (it was checked by the reconciliations
    that ran while its journal existed). A compaction that truncates the journal during the
    read makes it start again from the newer snapshot.
    """
    read = _ShardRead(ShardState(shard))
    for _ in range(SHARD_READ_ATTEMPTS_MAX):
        read = await _read_shard_once(store, shard)
        if not read.truncated:
            return read
    read.findings.append(("journal_replays", f"shard {shard}", "the journal kept being "
                          "truncated by compactions during the read; run again"))
    return read


async def _read_shard_once(store: JournalStore, shard: int) -> _ShardRead:
    snapshot_seq, snapshot = await store.load_snapshot(shard)
    try:
        state = await asyncio.to_thread(decode_snapshot, shard, snapshot, snapshot_seq)
    except (ValueError, KeyError, TypeError, CompactionError) as exc:
        read = _ShardRead(ShardState(shard), snapshot_seq)
        read.findings.append(("journal_replays", f"snapshot {snapshot_seq}",
                              f"snapshot does not load: {exc}"))
        return read
    read = _ShardRead(state, snapshot_seq, dict(state.outbox_last_seq))
    for transfer in state.transfers.values():
        if transfer.state == STATE_COMMITTED:
            read.decided[transfer.transfer_id] = 1
            read.committed += 1
        elif transfer.state != "PENDING":
            read.refused += 1
    observer = _ReadObserver(read, shard)
    after = snapshot_seq
    while True:
        page = await store.read_journal(shard, after, JOURNAL_PAGE_BATCHES)
        if after == snapshot_seq and (not page or page[0].seq > snapshot_seq + 1):
            # Nothing right after the snapshot: a newer one truncated the journal meanwhile
            # (read again from it), or there is nothing after it.
            if (await store.journal_position(shard))[2] > snapshot_seq:
                read.truncated = True
                return read
        read.batches += fold(state, page, observer=observer)
        if len(page) < JOURNAL_PAGE_BATCHES:
            return read
        after = page[-1].seq


async def envelope_report(store: JournalStore, shard_count: int, envelope_id: str,
                          now_ms: int | None = None) -> dict | None:
    """One envelope for operators (``ledgerctl envelope show``): folded from its shard's
    snapshot and journal, or read from the views when its owner no longer keeps it. None if
    neither has it."""
    from dataclasses import asdict

    from ledger.core.model import escrow_wallet_id as escrow_of
    from shard_router.hashing import shard_of

    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    shard = shard_of(escrow_of(envelope_id), shard_count)
    read = await read_shard(store, shard)
    state = read.state
    envelope = state.envelopes.get(envelope_id)
    problems: list[str] = [f"{check} {subject}: {detail}" for check, subject, detail
                           in read.findings]
    if envelope is not None:
        source = "journal"
        grabs = sorted(state.grabs.get(envelope_id, {}).values(), key=lambda g: g.position)
        escrow = state.wallets.get(escrow_of(envelope_id))
        escrow_minor = escrow.balance_minor if escrow is not None else None
        problems += [f"{subject}: {detail}" for subject, detail
                     in _envelope_problems(state, now, Report(), only=envelope_id)]
    else:
        stored = await store.get_envelope(envelope_id)
        if stored is None:
            return None
        envelope, source, escrow_minor = stored, "views", None
        grabs, after = [], -1
        while True:
            page = await store.list_grabs(envelope_id, after, 1000)
            grabs.extend(page)
            if len(page) < 1000:
                break
            after = page[-1].position
    owed = state._owed()
    rows = []
    for g in grabs:
        t = state.transfers.get(g.transfer_id)
        credit = ("owed" if g.transfer_id in owed else
                  "credited" if t is None or t.credited else "unknown")
        rows.append({**asdict(g), "credit": credit})
    best = luckiest(grabs)
    return {"shard": shard, "source": source, "state": envelope.state(now),
            "envelope": asdict(envelope), "escrow_minor": escrow_minor, "grabs": rows,
            "luckiest": asdict(best) if best is not None else None, "problems": problems}
