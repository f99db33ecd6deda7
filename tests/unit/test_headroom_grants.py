"""Headroom grants in the pure core (PROTOCOL.md, "Headroom grants"): a credit shard promises a
debit shard room for credits owed without a reservation each; every wallet of the credit shard
keeps that room, so a granted credit always lands; the debit shard never owes past the grant.
Invariants are checked after every step (``ShardState.check``)."""

from __future__ import annotations

import pytest

from ledger.core import codec
from ledger.core import constants as C
from ledger.core.ids import envelope_id_for, grab_key, transfer_id_for
from ledger.core.invariants import InvariantViolation
from ledger.core.model import (
    KIND_DEPOSIT, KIND_ENVELOPE_FUND, KIND_TRANSFER, ApplyCredits, CreateWallet, Envelope,
    GrabEnvelope, GrantHeadroom, NoteHeadroom, OpenEnvelope, Post, ReserveCredit,
    escrow_wallet_id, settlement_wallet_id,
)
from ledger.core.shard import HEADROOM_NEEDED, ShardState
from ledger.core.status import Status
from ledger.core.step import step

ENVELOPES, RECEIVERS = 0, 1


def run(state: ShardState, *commands):
    result = step(state, commands)
    state.check()
    return result.outcomes if len(commands) > 1 else result.outcomes[0]


def receiver_shard(*wallets: str, balance: int = 0) -> ShardState:
    s = ShardState(RECEIVERS)
    for w in wallets:
        assert run(s, CreateWallet("svc", "w-" + w, w, "CNY", False, 1)).ok
    if balance:
        assert run(s, Post("svc", "dep", transfer_id_for(RECEIVERS, "svc", "dep"), KIND_DEPOSIT,
                           settlement_wallet_id("CNY", RECEIVERS), wallets[0], balance, "CNY",
                           "", RECEIVERS, 1)).ok
    return s


def envelope_shard(total=1_000, shares=5) -> tuple[ShardState, str]:
    s = ShardState(ENVELOPES)
    assert run(s, CreateWallet("svc", "w-alice", "alice", "CNY", False, 1)).ok
    assert run(s, Post("svc", "dep", transfer_id_for(ENVELOPES, "svc", "dep"), KIND_DEPOSIT,
                       settlement_wallet_id("CNY", ENVELOPES), "alice", 10_000, "CNY", "",
                       ENVELOPES, 1)).ok
    eid = envelope_id_for("svc", "env")
    fund = transfer_id_for(ENVELOPES, "svc", "env")
    assert run(s, OpenEnvelope(Envelope(eid, "alice", "CNY", "FIXED", total, shares, 1, "", "",
                                        7, "svc", "env", fund, 10, 60_000), 10)).ok
    assert run(s, Post("svc", "env", fund, KIND_ENVELOPE_FUND, "alice", escrow_wallet_id(eid),
                       total, "CNY", "", ENVELOPES, 10)).ok
    return s, eid


def grab_under_grant(s: ShardState, eid: str, receiver: str):
    key = grab_key(eid, "g-" + receiver)
    return run(s, GrabEnvelope("svc", key, eid, receiver, RECEIVERS,
                               transfer_id_for(ENVELOPES, "svc", key), 20,
                               reserved_at_ms=C.UNDER_GRANT))


def test_a_grant_is_idempotent_by_its_total_and_takes_room_from_every_wallet():
    r = receiver_shard("bob", balance=C.AMOUNT_MINOR_MAX - 5_000)
    assert run(r, GrantHeadroom(ENVELOPES, 4_000)).value == 4_000
    assert r.granted_open == 4_000
    # A retry, or a racing coordinator asking for less: the grant as it stands, no event.
    again = step(r, [GrantHeadroom(ENVELOPES, 4_000), GrantHeadroom(ENVELOPES, 10)])
    assert [o.value for o in again.outcomes] == [4_000, 4_000] and not again.events
    # The room granted is no longer there for reservations: 1,001 would have fit before.
    refused = run(r, ReserveCredit("t1", "bob", "CNY", 1_001, 5))
    assert refused.status is Status.BALANCE_OVERFLOW
    assert run(r, ReserveCredit("t2", "bob", "CNY", 1_000, 5)).ok


def test_a_grant_that_a_full_wallet_could_not_take_is_refused_and_changes_nothing():
    r = receiver_shard("bob", balance=C.AMOUNT_MINOR_MAX - 100)
    out = run(r, GrantHeadroom(ENVELOPES, 101))
    assert out.status is Status.BALANCE_OVERFLOW and out.field == "total_minor"
    assert r.grants_out == {} and r.granted_open == 0


def test_a_grab_owes_under_the_grant_only_what_the_grant_covers():
    e, eid = envelope_shard(total=1_000, shares=5)  # FIXED: 200 each
    short = grab_under_grant(e, eid, "bob")
    assert short.status is Status.REQUEST_IN_FLIGHT and short.field == HEADROOM_NEEDED
    assert short.value == (RECEIVERS, 0)
    assert e.envelopes[eid].left_shares == 5  # nothing decided, nothing drawn
    assert run(e, NoteHeadroom(RECEIVERS, 300)).ok
    assert grab_under_grant(e, eid, "bob").ok
    assert e.headroom_used[RECEIVERS] == 200
    second = grab_under_grant(e, eid, "carol")  # 100 left of the grant, 200 owed
    assert second.field == HEADROOM_NEEDED and second.value == (RECEIVERS, 300)
    credit = e.outbox[RECEIVERS][1]
    assert credit.reserved_at_ms == C.UNDER_GRANT and credit.amount_minor == 200


def test_a_granted_credit_lands_and_gives_its_room_back_to_the_wallets():
    e, eid = envelope_shard()
    r = receiver_shard("bob")
    assert run(r, GrantHeadroom(ENVELOPES, 1_000)).ok
    assert run(e, NoteHeadroom(RECEIVERS, 1_000)).ok
    assert grab_under_grant(e, eid, "bob").ok
    assert run(r, ApplyCredits(ENVELOPES, tuple(e.outbox[RECEIVERS].values()))).value == 1
    assert r.wallets["bob"].balance_minor == 200
    assert (r.grants_out, r.grants_used, r.granted_open) == ({ENVELOPES: 1_000},
                                                             {ENVELOPES: 200}, 800)


def test_a_credit_past_the_grant_stops_the_shard():
    r = receiver_shard("bob")
    e, eid = envelope_shard()
    assert run(e, NoteHeadroom(RECEIVERS, 1_000)).ok  # noted, but never granted by r
    assert grab_under_grant(e, eid, "bob").ok
    with pytest.raises(InvariantViolation):
        step(r, [ApplyCredits(ENVELOPES, tuple(e.outbox[RECEIVERS].values()))])


def test_only_grabs_owe_under_a_grant():
    s = receiver_shard("bob", "carol", balance=500)
    out = run(s, Post("svc", "k", transfer_id_for(RECEIVERS, "svc", "k"), KIND_TRANSFER, "bob",
                      "dave", 10, "CNY", "", 2, 5, reserved_at_ms=C.UNDER_GRANT))
    assert out.status is Status.INVALID_ARGUMENT and out.field == "reserved_at_ms"
    assert s.wallets["bob"].balance_minor == 500 and not s.outbox


def test_grants_survive_a_snapshot_and_a_replay():
    e, eid = envelope_shard()
    r = receiver_shard("bob")
    assert run(r, GrantHeadroom(ENVELOPES, 1_000)).ok
    assert run(e, NoteHeadroom(RECEIVERS, 1_000)).ok
    assert grab_under_grant(e, eid, "bob").ok
    run(r, ApplyCredits(ENVELOPES, tuple(e.outbox[RECEIVERS].values())))
    for s in (e, r):
        back = codec.snapshot_loads(codec.snapshot_dumps(s))
        back.check()
        assert (back.grants_out, back.grants_used, back.granted_open, back.headroom_in,
                back.headroom_used) == (s.grants_out, s.grants_used, s.granted_open,
                                        s.headroom_in, s.headroom_used)
