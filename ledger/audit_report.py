"""Reading the audit trail back from a store: ``ledgerctl audit verify`` and ``audit show``.

``verify`` proves every shard's chain (``ledger.core.audit``) from the store alone: the rows
in batch order, each linked to the one before and hashed as its content says, and the last
one equal to the head that the shard's latest snapshot and the journal after it give (the
fold of ``ledger.reconcile``), which is what catches deleting or altering the newest rows.
Heads given back from an earlier run (``anchors``: kept outside the ledger by finance) must
still be in the chain; that catches a consistent rewrite of the rows together with the
snapshot and journal, which the chain alone cannot.

The ledger may be running while this reads. The cut is the fold: rows of batches after the
folded batch are left for the next run, unless they lie beyond the journal head read after
them (no batch made them: inserted). On Cassandra the rows are written behind the journal,
so a shard being written may show its newest batches as missing for a moment (its owner's
rows are at most ``ROWS_LAG_BATCHES_MAX`` batches behind); a run on a quiet store, or a
second run, tells a lag from a deletion.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Iterable, Iterator, AsyncIterator

from ledger.core.audit import AuditHead, AuditRecord, AuditRow, ChainCheck, Problem
from ledger.reconcile import read_shard
from ledger.store.port import JournalStore

# Audit rows read per store call.
AUDIT_PAGE_ROWS = 500


@dataclass
class ShardChain:
    """What ``verify`` found for one shard."""

    head: AuditHead
    folded_seq: int  # the journal batch the head is as of
    rows: int = 0
    records: int = 0


@dataclass
class VerifyReport:
    shards: dict[int, ShardChain] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        """The report as ``--json`` prints it; its ``shards`` part is what ``--expect``
        reads back (``anchors_from_json``)."""
        return {"ok": self.ok,
                "shards": {str(s): {"head": {"seq": c.head.seq, "hash": c.head.hash},
                                    "folded_seq": c.folded_seq, "rows": c.rows,
                                    "records": c.records}
                           for s, c in sorted(self.shards.items())},
                "problems": [{"shard": p.shard, "seq": p.seq, "what": p.what}
                             for p in self.problems]}


def anchors_from_json(body: dict) -> dict[int, AuditHead]:
    """Anchored heads from a saved ``verify --json`` output.

    Raises:
        ValueError: not such an output.
    """
    try:
        return {int(shard): AuditHead(int(entry["head"]["seq"]), str(entry["head"]["hash"]))
                for shard, entry in body["shards"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not the output of `ledgerctl audit verify --json`: {exc!r}") from exc


async def audit_rows(store: JournalStore, shard: int,
                     page_rows: int = AUDIT_PAGE_ROWS) -> AsyncIterator[list[AuditRow]]:
    """A shard's audit rows, page by page, ascending ``seq``."""
    after = 0
    while True:
        page = await store.read_audit(shard, after, page_rows)
        if page:
            yield page
        if len(page) < page_rows:
            return
        after = page[-1].seq


async def verify_shard(store: JournalStore, shard: int, report: VerifyReport,
                       anchor: AuditHead | None = None) -> None:
    """Verify one shard's chain into ``report`` (see the module docstring)."""
    read = await read_shard(store, shard)
    for check, subject, detail in read.findings:
        if check == "journal_replays":
            # The head is only as good as the fold: a snapshot that does not load or a
            # journal that does not replay is a finding of its own.
            report.problems.append(Problem(shard, 0, f"head unknown: {subject}: {detail}"))
    state = read.state
    head = AuditHead(state.audit_seq, state.audit_head)
    walk = ChainCheck(shard, anchor=anchor)
    beyond: list[AuditRow] = []
    async for page in audit_rows(store, shard):
        walk.check_rows((r for r in page if r.seq <= state.seq), report.problems)
        beyond.extend(r for r in page if r.seq > state.seq)
    if beyond:
        _, journal_head, _ = await store.journal_position(shard)
        for row in beyond:
            if row.seq > journal_head:
                report.problems.append(Problem(shard, row.seq,
                                               f"row beyond the journal's head (batch "
                                               f"{journal_head}): inserted"))
    walk.finish(head, report.problems)
    report.shards[shard] = ShardChain(head, state.seq, walk.rows, walk.records)


async def verify(store: JournalStore, shards: Iterable[int],
                 anchors: dict[int, AuditHead] | None = None) -> VerifyReport:
    """Verify every shard's chain. A shard with an anchor but no longer any row is reported
    by its anchor."""
    report = VerifyReport()
    for shard in shards:
        await verify_shard(store, shard, report, (anchors or {}).get(shard))
    return report


# --- show -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShownRecord:
    shard: int
    epoch: int
    seq: int
    record: AuditRecord

    def to_json(self) -> dict:
        return {"shard": self.shard, "epoch": self.epoch, "seq": self.seq,
                **self.record._asdict()}


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch from an integer or an RFC 3339 time ("...Z" or an
    offset; a time without one is taken as UTC).

    Raises:
        ValueError: neither.
    """
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time (RFC 3339 or ms since the epoch): {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def format_time_ms(at_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(at_ms / 1000, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(record: AuditRecord, wallet: str | None, principal: str | None,
             since_ms: int | None, until_ms: int | None) -> bool:
    return ((wallet is None or wallet in (record.from_wallet_id, record.to_wallet_id))
            and (principal is None or record.principal == principal)
            and (since_ms is None or record.at_ms >= since_ms)
            and (until_ms is None or record.at_ms < until_ms))


def filter_rows(rows: Iterable[AuditRow], wallet: str | None = None,
                principal: str | None = None, since_ms: int | None = None,
                until_ms: int | None = None) -> Iterator[ShownRecord]:
    """The records of ``rows`` that match every filter given (``until_ms`` exclusive)."""
    for row in rows:
        if since_ms is not None and row.at_ms < since_ms:
            continue  # the row's time is its latest record's: none of them is late enough
        for record in row.decoded():
            if _matches(record, wallet, principal, since_ms, until_ms):
                yield ShownRecord(row.shard, row.epoch, row.seq, record)


async def show(store: JournalStore, shards: Iterable[int], wallet: str | None = None,
               principal: str | None = None, since_ms: int | None = None,
               until_ms: int | None = None) -> AsyncIterator[ShownRecord]:
    """The matching records of every shard, shard by shard, in chain order. Shows what the
    rows say; ``verify`` says whether they are intact."""
    for shard in shards:
        async for page in audit_rows(store, shard):
            for shown in filter_rows(page, wallet, principal, since_ms, until_ms):
                yield shown


def format_record(shown: ShownRecord) -> str:
    """One record on one line, for operators."""
    r = shown.record
    money = f" {r.amount_minor} {r.currency}" if r.amount_minor or r.currency else ""
    wallets = (f" {r.from_wallet_id or '-'} -> {r.to_wallet_id}" if r.to_wallet_id
               else f" {r.from_wallet_id}" if r.from_wallet_id else "")
    detail = f" ({r.detail})" if r.detail else ""
    return (f"{format_time_ms(r.at_ms)} shard {shown.shard} epoch {shown.epoch} "
            f"seq {shown.seq}: {r.method} by {r.principal or 'system'} {r.outcome}{money}"
            f"{wallets} [{r.subject}]{detail} req={r.request_hash or '-'}")
