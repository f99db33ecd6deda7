"""The envelope rules of the pure core: open, fund, grab, sell out, expire and refund, on one
shard (receivers and sender local), with the shard's invariants checked after every step."""

from __future__ import annotations

import pytest

from ledger.core import split
from ledger.core.ids import envelope_id_for, grab_key, transfer_id_for
from ledger.core.invariants import InvariantViolation
from ledger.core.model import (
    KIND_DEPOSIT, KIND_ENVELOPE_FUND, CreateWallet, Envelope, GetEnvelope, GrabEnvelope,
    OpenEnvelope, Post, RefundEnvelope, escrow_wallet_id, settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.status import Status
from ledger.core.step import step

SHARD = 0


def run(state: ShardState, *commands):
    result = step(state, commands)
    state.check()
    return result.outcomes if len(commands) > 1 else result.outcomes[0]


def funded_state(kind=split.KIND_LUCKY, total=1000, shares=5, receiver="", expiry=60_000,
                 sender_balance=5_000):
    s = ShardState(SHARD)
    for w in ("alice", "bob", "carol", "dave", "erin", "frank", "gina"):
        assert run(s, CreateWallet("svc", "w-" + w, w, "CNY", False, 1)).ok
    assert run(s, Post("svc", "dep", "tdep", KIND_DEPOSIT, settlement_wallet_id("CNY", SHARD),
                       "alice", sender_balance, "CNY", "", SHARD, 1)).ok
    eid = envelope_id_for("svc", "env-1")
    fund_id = transfer_id_for(SHARD, "svc", "env-1")
    env = Envelope(eid, "alice", "CNY", kind, total, shares, 1, receiver, "happy new year", 42,
                   "svc", "env-1", fund_id, 10, 10 + expiry)
    assert run(s, OpenEnvelope(env, 10)).ok
    assert s.envelopes[eid].state(10) == "FUNDING"
    funded = run(s, Post("svc", "env-1", fund_id, KIND_ENVELOPE_FUND, "alice",
                         escrow_wallet_id(eid), total, "CNY", "happy new year", SHARD, 10))
    assert funded.ok, funded
    assert s.envelopes[eid].state(10) == "ACTIVE"
    return s, eid


def grab(s, eid, receiver, key=None, now=20):
    k = grab_key(eid, key or "g-" + receiver)
    return run(s, GrabEnvelope("svc", k, eid, receiver, SHARD, transfer_id_for(SHARD, "svc", k),
                               now))


def test_grabs_sum_to_total_sixth_is_sold_out_and_balances_move():
    s, eid = funded_state()
    got = {}
    for r in ("bob", "carol", "dave", "erin", "frank"):
        out = grab(s, eid, r)
        assert out.ok, out
        g, t = out.value
        got[r] = g.amount_minor
        assert t.credited and t.to_wallet_id == r
        assert s.wallets[r].balance_minor == g.amount_minor
    assert sum(got.values()) == 1000
    sixth = grab(s, eid, "gina")
    assert sixth.status is Status.ENVELOPE_SOLD_OUT and sixth.field == "envelope_id"
    assert s.envelopes[eid].state(30) == "SOLD_OUT"
    assert s.wallets[escrow_wallet_id(eid)].balance_minor == 0
    assert s.wallets["alice"].balance_minor == 4000
    expected = split.all_shares(split.KIND_LUCKY, 42, 1000, 5, 1)
    assert [got[r] for r in ("bob", "carol", "dave", "erin", "frank")] == expected


def test_retry_replays_another_key_is_already_grabbed_and_key_reuse_names_the_field():
    s, eid = funded_state()
    first = grab(s, eid, "bob", key="k1")
    again = grab(s, eid, "bob", key="k1")
    assert again.ok and again.replayed and again.value[0] == first.value[0]
    other = grab(s, eid, "bob", key="k2")
    assert other.status is Status.ENVELOPE_ALREADY_GRABBED
    assert other.value[0].amount_minor == first.value[0].amount_minor
    reused = grab(s, eid, "carol", key="k1")
    assert reused.status is Status.IDEMPOTENCY_KEY_REUSED and reused.field == "receiver_wallet_id"
    assert s.envelopes[eid].left_shares == 4


def test_exclusive_envelope_only_for_its_receiver():
    s, eid = funded_state(kind=split.KIND_EXCLUSIVE, total=300, shares=1, receiver="carol")
    no = grab(s, eid, "bob")
    assert no.status is Status.ENVELOPE_NOT_ELIGIBLE and no.field == "receiver_wallet_id"
    yes = grab(s, eid, "carol")
    assert yes.ok and yes.value[0].amount_minor == 300


def test_unknown_envelope_and_missing_receiver_change_nothing():
    s, eid = funded_state()
    before = {w: x.balance_minor for w, x in s.wallets.items()}
    unknown = grab(s, "e" + "0" * 24, "bob")
    assert unknown.status is Status.ENVELOPE_NOT_FOUND
    missing = grab(s, eid, "nobody")
    assert missing.status is Status.WALLET_NOT_FOUND and missing.field == "receiver_wallet_id"
    assert {w: x.balance_minor for w, x in s.wallets.items()} == before


def test_expired_envelope_refuses_grabs_and_refunds_the_rest_once():
    s, eid = funded_state(expiry=100)
    assert grab(s, eid, "bob").ok
    late = grab(s, eid, "carol", now=110)
    assert late.status is Status.ENVELOPE_EXPIRED
    left = s.envelopes[eid].left_minor
    assert s.expired_envelopes(110) and not s.expired_envelopes(109)
    refund = run(s, RefundEnvelope(eid, 110))
    assert refund.ok and refund.value.amount_minor == left
    assert s.wallets["alice"].balance_minor == 5000 - 1000 + left
    assert s.envelopes[eid].state(111) == "REFUNDED"
    assert run(s, RefundEnvelope(eid, 120)).value is None  # once
    assert s.expired_envelopes(200) == []
    env, grabs = run(s, GetEnvelope(eid)).value
    assert env.refunded_minor == left and len(grabs) == 1


def test_open_again_with_other_terms_names_the_field():
    s, eid = funded_state()
    env = s.envelopes[eid].copy()
    changed = Envelope(eid, "alice", "CNY", split.KIND_LUCKY, 1000, 6, 1, "", "happy new year",
                       7, "svc", "env-1", env.funding_transfer_id, 50, 50 + 60_000)
    out = run(s, OpenEnvelope(changed, 50))
    assert out.status is Status.IDEMPOTENCY_KEY_REUSED and out.field == "shares"
    same = Envelope(eid, "alice", "CNY", split.KIND_LUCKY, 1000, 5, 1, "", "happy new year",
                    7, "svc", "env-1", env.funding_transfer_id, 50, 50 + 60_000)
    replay = run(s, OpenEnvelope(same, 50))
    assert replay.ok and replay.replayed and replay.value.seed == 42


def test_replay_of_the_journal_rebuilds_the_same_envelope():
    from ledger.core import codec
    s, eid = funded_state()
    for r in ("bob", "carol"):
        assert grab(s, eid, r).ok
    back = codec.snapshot_loads(codec.snapshot_dumps(s))
    back.check()
    assert back.envelopes == s.envelopes and back.grabs == s.grabs


def test_a_grab_that_breaks_the_split_stops_the_shard():
    from ledger.core.model import EnvelopeGrabbed, Grab
    from ledger.core.step import fold_events
    s, eid = funded_state()
    bad = Grab(eid, 0, "bob", 999, "t", "svc", "k", 20)  # leaves 1 for 4 shares
    with pytest.raises(InvariantViolation):
        fold_events(s, [EnvelopeGrabbed(bad)])


def test_a_closed_envelope_leaves_memory_after_the_retention_window():
    from ledger.core.model import ExpireIdempotency
    s, eid = funded_state(kind=split.KIND_FIXED, total=100, shares=1)
    assert grab(s, eid, "bob").ok
    closed = s.envelopes[eid].closed_at_ms
    run(s, ExpireIdempotency(closed))  # closed at, not before: kept
    assert eid in s.envelopes
    run(s, ExpireIdempotency(closed + 1))
    assert eid not in s.envelopes and eid not in s.grabs
    assert run(s, GetEnvelope(eid)).status is Status.ENVELOPE_NOT_FOUND


def test_an_envelope_whose_funding_was_refused_is_unfunded_for_grabs_at_once():
    from ledger.core.model import AbandonEnvelope
    s = ShardState(SHARD)
    assert run(s, CreateWallet("svc", "w-bob", "bob", "CNY", False, 1)).ok
    eid = envelope_id_for("svc", "env-x")
    env = Envelope(eid, "alice", "CNY", split.KIND_FIXED, 100, 2, 1, "", "", 1, "svc", "env-x",
                   "t0000" + "0" * 24, 10, 10 + 60_000)
    assert run(s, OpenEnvelope(env, 10)).ok
    wait = grab(s, eid, "bob", now=20)
    assert wait.status is Status.REQUEST_IN_FLIGHT  # the money may be on its way
    late = grab(s, eid, "bob", now=10 + 10_001)
    assert late.status is Status.ENVELOPE_UNFUNDED  # not within the funding wait: say so
    assert run(s, AbandonEnvelope(eid, "t-other", 30)).value is None  # not its funding
    assert s.envelopes[eid].state(30) == "FUNDING"
    run(s, AbandonEnvelope(eid, env.funding_transfer_id, 30))
    assert s.envelopes[eid].state(31) == "UNFUNDED"
    assert grab(s, eid, "bob", now=31).status is Status.ENVELOPE_UNFUNDED
