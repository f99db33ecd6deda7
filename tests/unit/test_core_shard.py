"""The pure shard state machine: validation, funds, idempotency, outbox credits, replay.

No I/O: commands go through ``ledger.core.step`` as an owner would, and journals through its fold.
"""

from ledger.core import codec
from ledger.core.model import (
    AckOutbox, ApplyCredits, CreateWallet, Credit, GetWallet, Post, ReserveCredit,
    settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.step import fold_events, step
from ledger.core.status import Status
from ledger.core import constants as C


def run(state, command, journal=None):
    result = step(state, [command])
    if journal is not None:
        journal.extend(result.events)
    return result.outcomes[0]


def post(key, src, dst, amount, to_shard=0, kind="TRANSFER", currency="CNY", memo=""):
    return Post("svc", key, "t-" + key, kind, src, dst, amount, currency, memo, to_shard, 1)


def funded(shard=0, amount=1000):
    s = ShardState(shard)
    run(s, CreateWallet("svc", "w-a", "alice", "CNY", False, 1))
    run(s, CreateWallet("svc", "w-b", "bob", "CNY", False, 1))
    run(s, post("dep", settlement_wallet_id("CNY", shard), "alice", amount, shard, "DEPOSIT"))
    return s


def test_deposit_and_same_shard_transfer_keep_books_balanced():
    s = funded()
    assert run(s, post("t1", "alice", "bob", 300)).ok
    balances = {w.wallet_id: w.balance_minor for w in s.wallets.values()}
    assert balances == {"alice": 700, "bob": 300, settlement_wallet_id("CNY", 0): -1000}
    assert sum(balances.values()) == 0


def test_insufficient_funds_is_recorded_and_replayed_and_moves_nothing():
    s = funded(amount=100)
    first = run(s, post("t1", "alice", "bob", 101))
    assert first.status is Status.INSUFFICIENT_FUNDS and first.field == "amount_minor"
    run(s, post("dep2", settlement_wallet_id("CNY", 0), "alice", 500, 0, "DEPOSIT"))
    again = run(s, post("t1", "alice", "bob", 101))
    assert again.status is Status.INSUFFICIENT_FUNDS and again.replayed
    assert s.wallets["bob"].balance_minor == 0


def test_same_key_same_payload_replays_original_and_different_payload_names_field():
    s = funded()
    first = run(s, post("t1", "alice", "bob", 10))
    again = run(s, post("t1", "alice", "bob", 10))
    assert again.ok and again.replayed and again.value.transfer_id == first.value.transfer_id
    assert s.wallets["alice"].balance_minor == 990
    other = run(s, post("t1", "alice", "bob", 11))
    assert other.status is Status.IDEMPOTENCY_KEY_REUSED and other.field == "amount_minor"
    memo = run(s, post("t1", "alice", "bob", 10, memo="x"))
    assert memo.status is Status.IDEMPOTENCY_KEY_REUSED and memo.field == "memo"


def test_unknown_wallet_and_currency_mismatch():
    s = funded()
    assert run(s, post("t1", "nobody", "bob", 1)).status is Status.WALLET_NOT_FOUND
    out = run(s, post("t2", "alice", "bob", 1, currency="USD"))
    assert out.status is Status.CURRENCY_MISMATCH and out.field == "currency"


def test_overflow_is_refused_before_anything_changes():
    s = ShardState(0)
    run(s, CreateWallet("svc", "w", "rich", "CNY", False, 1))
    assert run(s, post("d1", settlement_wallet_id("CNY", 0), "rich", C.AMOUNT_MINOR_MAX, 0,
                       "DEPOSIT")).ok
    out = run(s, post("d2", settlement_wallet_id("CNY", 0), "rich", 1, 0, "DEPOSIT"))
    assert out.status is Status.BALANCE_OVERFLOW
    assert s.wallets["rich"].balance_minor == C.AMOUNT_MINOR_MAX


def test_cross_shard_credit_is_applied_exactly_once_in_order():
    debit, credit = funded(shard=1), ShardState(2)
    run(credit, CreateWallet("svc", "w-c", "carol", "CNY", False, 1))
    assert run(credit, ReserveCredit("t-x1", "carol", "CNY", 100, 1)).ok
    assert run(debit, post("x1", "alice", "carol", 100, to_shard=2)).ok
    assert run(debit, post("x2", "alice", "carol", 50, to_shard=2)).ok
    owed = tuple(debit.outbox[2].values())
    assert [c.outbox_seq for c in owed] == [1, 2]
    # Deliver the second alone first: a gap, nothing applied.
    gap = run(credit, ApplyCredits(1, owed[1:]))
    assert gap.value == 0 and credit.wallets["carol"].balance_minor == 0
    # Deliver both, twice: applied once.
    assert run(credit, ApplyCredits(1, owed)).value == 2
    assert run(credit, ApplyCredits(1, owed)).value == 2
    assert credit.wallets["carol"].balance_minor == 150
    run(debit, AckOutbox(2, 2))
    assert not debit.outbox and debit.transfers["t-x1"].credited
    assert credit.incoming == {}


def test_replay_of_journal_and_snapshot_rebuild_the_same_state():
    s, journal = ShardState(0), []
    run(s, CreateWallet("svc", "w-a", "alice", "CNY", False, 1), journal)
    run(s, post("dep", settlement_wallet_id("CNY", 0), "alice", 500, 0, "DEPOSIT"), journal)
    run(s, post("x", "alice", "zed", 200, to_shard=9), journal)
    replayed = ShardState(0)
    fold_events(replayed, codec.loads(codec.dumps(journal)))
    restored = codec.snapshot_loads(codec.snapshot_dumps(replayed))
    for state in (replayed, restored):
        assert state.wallets["alice"].balance_minor == 300
        assert state.outbox[9][1].amount_minor == 200
        again = run(state, post("x", "alice", "zed", 200, to_shard=9))
        assert again.replayed and again.ok


def test_get_wallet_of_unknown_wallet():
    assert run(ShardState(0), GetWallet("ghost")).status is Status.WALLET_NOT_FOUND


def test_apply_credits_refuses_wallet_that_does_not_exist_loudly():
    from ledger.core.invariants import InvariantViolation
    import pytest
    s = ShardState(0)
    credit = Credit(1, "t", "TRANSFER", "a", "ghost", 5, "CNY", 1)
    with pytest.raises(InvariantViolation):
        step(s, [ApplyCredits(3, (credit,))])


def test_expired_idempotency_keys_are_purged_and_the_key_runs_anew():
    from ledger.core.model import ExpireIdempotency
    s = funded()
    first = run(s, post("old", "alice", "bob", 10))
    assert run(s, post("old", "alice", "bob", 10)).replayed
    run(s, ExpireIdempotency(before_ms=2))  # every record here was made at time 1
    assert ("svc", "old") not in s.idempotency and first.value.transfer_id not in s.transfers
    again = run(s, post("old", "alice", "bob", 10))
    assert again.ok and not again.replayed
    assert s.wallets["bob"].balance_minor == 20


def test_claim_key_first_payload_wins():
    from ledger.core.model import ClaimKey
    from ledger.core.shard import transfer_fingerprint
    s = ShardState(5)
    fp = transfer_fingerprint("TRANSFER", "a", "b", 10, "CNY", "")
    assert not run(s, ClaimKey("svc", "k", fp, "t1", 1)).replayed
    assert run(s, ClaimKey("svc", "k", fp, "t1", 1)).replayed
    other = run(s, ClaimKey("svc", "k", transfer_fingerprint("TRANSFER", "c", "b", 10, "CNY", ""),
                            "t2", 1))
    assert other.status is Status.IDEMPOTENCY_KEY_REUSED and other.field == "from_wallet_id"
    restored = codec.snapshot_loads(codec.snapshot_dumps(s))
    assert run(restored, ClaimKey("svc", "k", fp, "t1", 1)).replayed


def test_reservations_and_fences_survive_a_snapshot():
    from ledger.core.model import ReserveCredit, ResolveReservations
    credit = ShardState(2)
    run(credit, CreateWallet("svc", "w-c", "carol", "CNY", False, 1))
    assert run(credit, ReserveCredit("t0001aa", "carol", "CNY", 40, 7)).value == 7
    debit = ShardState(1)
    assert run(debit, ResolveReservations((("t0001bb", 9),), 100)).value == (False,)
    again = codec.snapshot_loads(codec.snapshot_dumps(credit))
    assert again.reservations == {"t0001aa": ("carol", 40, 7)}
    assert again.incoming == {"carol": 40}
    assert codec.snapshot_loads(codec.snapshot_dumps(debit)).fenced == {"t0001bb": (9, 100)}
