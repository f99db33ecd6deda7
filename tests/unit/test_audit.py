"""The audit trail's pure core (``ledger.core.audit``): what a batch's records say, that the
owner's live chaining and every fold of the decoded journal give byte-identical rows and the
same head (through codec and snapshot round trips), that no event type is left unclassified,
and that ``check_chain`` names every kind of tampering: a record altered, deleted (first,
middle, last), inserted (middle, end), and a consistent rewrite only an anchor catches."""

from __future__ import annotations

import json
import zlib

import pytest

from ledger.core import audit, codec, model
from ledger.core.audit import AuditHead, AuditRow, check_chain
from ledger.core.ids import envelope_id_for, grab_key, transfer_id_for
from ledger.core.model import (
    KIND_DEPOSIT, KIND_ENVELOPE_FUND, CreateHold, CreateWallet, Envelope, GrabEnvelope,
    NoteAdmin, OpenEnvelope, Post, ReleaseHold, SetFrozen, escrow_wallet_id, settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.step import fold, step
from ledger.store.port import JournalBatch

SHARD = 3
EPOCH = 7


def scenario() -> list[list[object]]:
    """Command groups, one journal batch each: every audited kind of action."""
    eid = envelope_id_for("svc", "env-1")
    fund_id = transfer_id_for(SHARD, "svc", "env-1")
    settlement = settlement_wallet_id("CNY", SHARD)
    gk = grab_key(eid, "g-bob")
    return [
        [NoteAdmin("MoveShard", "spiffe://redledger/operator/ops", "n2",
                   "home r1 -> r2; reason: rack maintenance", "change-1", 1),
         CreateWallet("svc", "w-alice", "alice", "CNY", False, 1),
         CreateWallet("svc", "w-bob", "bob", "CNY", False, 1),
         CreateWallet("admin", "w-ops", "ops-float", "CNY", True, 1)],
        [Post("svc", "dep", "tdep", KIND_DEPOSIT, settlement, "alice", 5_000, "CNY",
              "salary of alice", SHARD, 2)],
        [Post("svc", "t1", "t-1", "TRANSFER", "alice", "bob", 100, "CNY", "lunch", SHARD, 3),
         Post("svc", "t2", "t-2", "TRANSFER", "alice", "bob", 10**9, "CNY", "", SHARD, 3)],
        [CreateHold("svc", "h1", "h-1", "alice", 200, "CNY", 60_000, 4)],
        [ReleaseHold("svc", "r1", "h-1", 5)],
        [OpenEnvelope(Envelope(eid, "alice", "CNY", "LUCKY", 1000, 5, 1, "", "happy new year",
                               42, "svc", "env-1", fund_id, 10, 60_010), 10),
         Post("svc", "env-1", fund_id, KIND_ENVELOPE_FUND, "alice", escrow_wallet_id(eid),
              1000, "CNY", "happy new year", SHARD, 10)],
        [GrabEnvelope("svc", gk, eid, "bob", SHARD, transfer_id_for(SHARD, "svc", gk), 20)],
        [SetFrozen("bob", True, "chargeback review", "ops", 30)],
    ]


def live_run() -> tuple[ShardState, list[JournalBatch], list[AuditRow]]:
    """What an owner does: step each group, chain its events, journal them."""
    state = ShardState(SHARD)
    batches: list[JournalBatch] = []
    rows: list[AuditRow] = []
    for seq, commands in enumerate(scenario(), start=1):
        result = step(state, commands)
        state.check()
        row = audit.chain(state, seq, EPOCH, result.events)
        if row is not None:
            rows.append(row)
        batches.append(JournalBatch(seq, EPOCH, codec.dumps(result.events)))
        state.seq = seq
    return state, batches, rows


def test_records_say_who_did_what_to_which_wallets_and_how_it_ended():
    _, _, rows = live_run()
    records = [r for row in rows for r in row.decoded()]
    by_method: dict[str, list] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    created = by_method["CreateWallet"]
    assert [(r.principal, r.from_wallet_id, r.detail) for r in created] == [
        ("svc", "alice", ""), ("svc", "bob", ""), ("admin", "ops-float", "allow_negative")]
    assert [(r.outcome, r.amount_minor) for r in by_method["Transfer"]] == [
        ("OK", 100), ("INSUFFICIENT_FUNDS", 10**9)]
    assert by_method["Deposit"][0].to_wallet_id == "alice"
    assert [r.method for r in records if r.subject == "h-1"] == ["CreateHold", "ReleaseHold"]
    assert by_method["OpenEnvelope"][0].amount_minor == 1000
    assert by_method["EnvelopeFund"][0].outcome == "OK"
    assert by_method["EnvelopeGrab"][0].to_wallet_id == "bob"
    assert [(r.principal, r.detail) for r in by_method["FreezeWallet"]] == [
        ("ops", "chargeback review")]
    # An admin action made outside the journal (a shard move) is in the chain too.
    assert [(r.principal, r.subject, r.detail) for r in by_method["MoveShard"]] == [
        ("spiffe://redledger/operator/ops", "n2", "home r1 -> r2; reason: rack maintenance")]
    # Every row is stamped with the batch it came from, and its time is its records'.
    assert all(row.shard == SHARD and row.epoch == EPOCH for row in rows)
    assert all(row.at_ms == max(r.at_ms for r in row.decoded()) for row in rows)
    # No memo text anywhere in the trail; the request hash covers it.
    blob = b"".join(row.records for row in rows)
    for memo in (b"salary", b"lunch", b"happy new year"):
        assert memo not in blob
    t1 = by_method["Transfer"][0]
    assert t1.request_hash == audit.request_hash("svc", "t1", "TRANSFER", "alice", "bob", 100,
                                                 "CNY", "lunch")
    assert t1.request_hash != audit.request_hash("svc", "t1", "TRANSFER", "alice", "bob", 100,
                                                 "CNY", "dinner")


def test_a_fold_of_the_decoded_journal_gives_identical_rows_and_head():
    live, batches, live_rows = live_run()
    # Through the codec, as a replay reads the journal.
    decoded = [JournalBatch(b.seq, b.epoch, codec.dumps(codec.loads(b.events)))
               for b in batches]
    replayed = ShardState(SHARD)
    collected: list = []
    fold(replayed, decoded, collected)
    replay_rows = [value for kind, value in collected if kind == "audit"]
    assert replay_rows == live_rows
    assert (replayed.audit_seq, replayed.audit_head) == (live.audit_seq, live.audit_head)
    assert check_chain(SHARD, replay_rows, AuditHead(live.audit_seq, live.audit_head)) == []
    # A snapshot in the middle carries the head: the rest folded onto it ends the same.
    middle = ShardState(SHARD)
    fold(middle, decoded[:4])
    restored = codec.snapshot_loads(codec.snapshot_dumps(middle))
    assert (restored.audit_seq, restored.audit_head) == (middle.audit_seq, middle.audit_head)
    assert restored.audit_head
    assert restored.admin_change == middle.admin_change == "change-1"
    rest: list = []
    fold(restored, decoded[4:], rest)
    assert [v for k, v in rest if k == "audit"] == [r for r in live_rows if r.seq > 4]
    assert codec.snapshot_dumps(restored) == codec.snapshot_dumps(replayed)


def test_the_epoch_of_a_batch_is_part_of_its_hash():
    live, batches, _ = live_run()
    other = ShardState(SHARD)
    fold(other, [JournalBatch(b.seq, b.epoch + 1, b.events) for b in batches])
    assert other.audit_seq == live.audit_seq and other.audit_head != live.audit_head


def test_a_snapshot_of_format_5_loads_with_an_empty_head():
    state, _, _ = live_run()
    lines = [json.loads(line) for line in
             zlib.decompress(codec.snapshot_dumps(state)[len(b"LSNAP2\n"):]).splitlines()]
    header, body = lines[0], [ln for ln in lines[1:] if ln[0] != "audit"]
    header["format"] = 5
    body[-1][1].pop("audit")
    old = b"LSNAP2\n" + zlib.compress(b"\n".join(
        json.dumps(x, separators=(",", ":")).encode() for x in [header, *body]) + b"\n")
    loaded = codec.snapshot_loads(old)
    assert (loaded.audit_seq, loaded.audit_head) == (0, "")
    assert loaded.wallets.keys() == state.wallets.keys()


def test_every_event_type_is_audited_or_excluded_on_purpose():
    audited, excluded = set(audit.BUILDERS), set(audit.NOT_AUDITED)
    assert not audited & excluded
    unclassified = set(model.EVENT_TYPES) - audited - excluded
    assert not unclassified, (
        f"add these event types to ledger.core.audit.BUILDERS or NOT_AUDITED: "
        f"{sorted(t.__name__ for t in unclassified)}")


# --- check_chain ----------------------------------------------------------------------------


def chain_of(count: int, skip: int = 3) -> list[AuditRow]:
    """``count`` rows over batches 1, 2, ..., with batch ``skip`` left without a row."""
    state = ShardState(SHARD)
    rows = []
    seq = 0
    while len(rows) < count:
        seq += 1
        if seq == skip:
            continue
        event = model.WalletCreated(f"w{seq}", "CNY", False, 1_000 + seq, "svc", f"k{seq}")
        row = audit.chain(state, seq, EPOCH, [event])
        assert row is not None
        rows.append(row)
    return rows


def head_of(rows: list[AuditRow]) -> AuditHead:
    return AuditHead(rows[-1].seq, rows[-1].hash)


def rehashed(row: AuditRow, **changes) -> AuditRow:
    fields = {f: getattr(row, f) for f in row.__slots__}  # type: ignore[attr-defined]
    fields.update(changes)
    fields["hash"] = audit.row_hash(fields["prev_hash"], fields["shard"], fields["seq"],
                                    fields["epoch"], fields["at_ms"], fields["prev_seq"],
                                    fields["records"])
    return AuditRow(**fields)


def test_an_intact_chain_has_no_problem():
    rows = chain_of(6)
    assert check_chain(SHARD, rows, head_of(rows)) == []
    assert check_chain(SHARD, [], AuditHead(0, "")) == []


@pytest.mark.parametrize("field,value", [
    ("records", b'[["Transfer","svc","","a","b",1,"CNY","OK","t",1,""]]'),
    ("at_ms", 1), ("epoch", EPOCH + 1), ("prev_seq", 0)])
def test_one_altered_row_is_named(field, value):
    rows = chain_of(6)
    head = head_of(rows)
    altered = AuditRow(**{**{f: getattr(rows[3], f) for f in rows[3].__slots__},  # type: ignore[attr-defined]
                          field: value})
    problems = check_chain(SHARD, rows[:3] + [altered] + rows[4:], head)
    assert problems and {p.seq for p in problems} == {rows[3].seq}
    assert any("hash mismatch" in p.what for p in problems)


def test_an_altered_row_with_its_hash_recomputed_breaks_the_next_link():
    rows = chain_of(6)
    head = head_of(rows)
    forged = rehashed(rows[3], at_ms=1)
    problems = check_chain(SHARD, rows[:3] + [forged] + rows[4:], head)
    assert [(p.seq, "broken link" in p.what) for p in problems] == [(rows[4].seq, True)]


@pytest.mark.parametrize("index", [0, 3])
def test_a_deleted_row_breaks_the_next_link(index):
    rows = chain_of(6)
    problems = check_chain(SHARD, rows[:index] + rows[index + 1:], head_of(rows))
    assert [(p.seq, "broken link" in p.what) for p in problems] == [(rows[index + 1].seq, True)]


def test_the_last_row_deleted_is_caught_by_the_head():
    rows = chain_of(6)
    problems = check_chain(SHARD, rows[:-1], head_of(rows))
    assert [(p.seq, "missing rows" in p.what) for p in problems] == [(rows[-1].seq, True)]
    # And the last row replaced by a consistent forgery: its hash is not the head.
    forged = rehashed(rows[-1], at_ms=1)
    problems = check_chain(SHARD, rows[:-1] + [forged], head_of(rows))
    assert [(p.seq, "differs from the journal's head" in p.what) for p in problems] == [
        (rows[-1].seq, True)]


def test_an_inserted_row_is_caught_in_the_middle_and_at_the_end():
    rows = chain_of(6, skip=3)
    gap = next(i for i in range(len(rows) - 1) if rows[i + 1].seq - rows[i].seq == 2)
    inserted = rehashed(rows[gap], seq=rows[gap].seq + 1, prev_seq=rows[gap].seq,
                        prev_hash=rows[gap].hash)
    problems = check_chain(SHARD, rows[:gap + 1] + [inserted] + rows[gap + 1:], head_of(rows))
    assert [(p.seq, "broken link" in p.what) for p in problems] == [(rows[gap + 1].seq, True)]
    tail = rehashed(rows[-1], seq=rows[-1].seq + 1, prev_seq=rows[-1].seq,
                    prev_hash=rows[-1].hash)
    problems = check_chain(SHARD, rows + [tail], head_of(rows))
    assert [(p.seq, "beyond the journal's head" in p.what) for p in problems] == [
        (tail.seq, True)]


def test_a_consistent_rewrite_is_caught_only_by_an_anchored_head():
    rows = chain_of(6)
    anchor = AuditHead(rows[3].seq, rows[3].hash)
    rewritten: list[AuditRow] = []
    for row in rows:
        prev = rewritten[-1] if rewritten else None
        rewritten.append(rehashed(row, at_ms=row.at_ms + 1,
                                  prev_seq=prev.seq if prev else 0,
                                  prev_hash=prev.hash if prev else ""))
    assert check_chain(SHARD, rewritten, head_of(rewritten)) == []
    problems = check_chain(SHARD, rewritten, head_of(rewritten), anchor=anchor)
    assert [(p.seq, "anchored head" in p.what) for p in problems] == [(anchor.seq, True)]
    # An anchor the chain still extends is fine.
    assert check_chain(SHARD, rows, head_of(rows), anchor=anchor) == []


def test_a_snapshot_of_format_6_loads_without_a_recorded_map_change():
    state, _, _ = live_run()
    lines = [json.loads(line) for line in
             zlib.decompress(codec.snapshot_dumps(state)[len(b"LSNAP2\n"):]).splitlines()]
    header, body = lines[0], lines[1:]
    header["format"] = 6
    for line in body:
        if line[0] == "audit":
            line[1] = [record[:2] for record in line[1]]
    old = b"LSNAP2\n" + zlib.compress(b"\n".join(
        json.dumps(x, separators=(",", ":")).encode() for x in [header, *body]) + b"\n")
    loaded = codec.snapshot_loads(old)
    assert (loaded.audit_seq, loaded.audit_head) == (state.audit_seq, state.audit_head)
    assert state.admin_change == "change-1" and loaded.admin_change == ""
