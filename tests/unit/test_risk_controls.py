"""Risk controls in the pure core (``ledger.core.risk``): velocity limits by amount and count
within a rolling window, per wallet and by default; the device step-up check; both enforced by
the shard's decision (a step of many racing debits passes exactly the limit), journaled,
replayed and snapshotted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.core import codec, risk
from ledger.core.model import (
    KIND_DEPOSIT, KIND_TRANSFER, KIND_WITHDRAWAL, ConfirmDevice, CreateHold, CreateWallet,
    GetWallet, Post, PrepareLinked, SetRiskLimits, TransferDecided, settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.status import Status
from ledger.core.step import fold_events, step

SHARD = 0
SECOND = 1_000
MINUTE = 60 * SECOND


def run(state, command):
    result = step(state, [command])
    state.check()
    return result.outcomes[0], result.events


def post(key, amount, now, source="alice", target="bob", kind=KIND_TRANSFER, device=""):
    return Post("svc", key, "t-" + key, kind, source, target, amount, "CNY", "", SHARD, now,
                device_id=device)


def limits(wallet="alice", window=0, amount=0, count=0, step_up=0, now=1):
    return SetRiskLimits(wallet, window, amount, count, step_up, "test", "ops", now)


def funded(journal=None, balance=1_000_000) -> ShardState:
    s = ShardState(SHARD)
    for command in (CreateWallet("svc", "w-alice", "alice", "CNY", False, 1),
                    CreateWallet("svc", "w-bob", "bob", "CNY", False, 1),
                    post("dep", balance, 1, settlement_wallet_id("CNY", SHARD), "alice",
                         KIND_DEPOSIT)):
        out, events = run(s, command)
        assert out.ok
        if journal is not None:
            journal += events
    return s


def test_count_limit_refuses_the_debit_past_it_and_records_the_refusal():
    s = funded()
    assert run(s, limits(window=MINUTE, count=2))[0].ok
    assert run(s, post("a", 10, 1_000))[0].ok
    assert run(s, post("b", 10, 2_000))[0].ok
    out, events = run(s, post("c", 10, 3_000))
    assert out.status is Status.VELOCITY_LIMIT_EXCEEDED and out.field == "from_wallet_id"
    assert "limit is 2" in out.detail
    # Recorded like INSUFFICIENT_FUNDS: the refusal is journaled and a retry gets it again.
    assert [type(e) for e in events] == [TransferDecided]
    again, events = run(s, post("c", 10, MINUTE * 5))
    assert again.replayed and again.status is Status.VELOCITY_LIMIT_EXCEEDED and not events
    # Once the first two debits left the window, a new request passes.
    assert run(s, post("d", 10, 1_000 + MINUTE + MINUTE // risk.BUCKETS))[0].ok


def test_amount_limit_counts_money_out_within_the_window():
    s = funded()
    run(s, limits(window=MINUTE, amount=1_000))
    assert run(s, post("a", 600, 10_000))[0].ok
    out, _ = run(s, post("b", 500, 20_000))
    assert out.status is Status.VELOCITY_LIMIT_EXCEEDED and out.field == "amount_minor"
    assert run(s, post("c", 400, 30_000))[0].ok  # exactly at the limit
    view = run(s, GetWallet("alice", True, 30_000))[0].value[1]
    assert (view.used_amount_minor, view.used_count, view.velocity_own) == (1_000, 2, True)


def test_a_window_never_forgets_a_debit_early():
    # The bucketed window errs on the safe side: a debit counts for at least window_ms.
    s = funded()
    run(s, limits(window=MINUTE, count=1))
    assert run(s, post("a", 1, 59_999))[0].ok
    for now in (59_999, 60_000, 100_000, 119_998):
        assert run(s, post(f"b{now}", 1, now))[0].status is Status.VELOCITY_LIMIT_EXCEEDED


def test_racing_debits_in_one_step_pass_exactly_the_limit():
    # The writer decides each debit against the state the ones before it left: twenty
    # requests racing in one group commit cannot all pass a check made before any of them.
    s = funded()
    run(s, limits(window=MINUTE, count=5, amount=10_000))
    result = step(s, [post(f"r{i}", 100, 5_000 + i) for i in range(20)])
    passed = [o for o in result.outcomes if o.ok]
    assert len(passed) == 5
    assert all(o.status is Status.VELOCITY_LIMIT_EXCEEDED for o in result.outcomes[5:])


def test_the_default_applies_to_wallets_without_their_own_and_exemptions_hold():
    s = funded()
    run(s, CreateWallet("svc", "w-carol", "carol", "CNY", False, 1))
    run(s, post("dep-c", 1_000, 1, settlement_wallet_id("CNY", SHARD), "carol", KIND_DEPOSIT))
    assert run(s, limits("", window=MINUTE, count=1))[0].ok
    # alice follows the default; carol has her own "no limit" (a merchant account).
    run(s, limits("carol", window=0))
    assert run(s, post("a1", 1, 10, "alice"))[0].ok
    assert run(s, post("a2", 1, 11, "alice"))[0].status is Status.VELOCITY_LIMIT_EXCEEDED
    for i in range(3):
        assert run(s, post(f"c{i}", 1, 12 + i, "carol"))[0].ok
    # Deposits debit the settlement account: the ledger's own accounts are never limited.
    for i in range(3):
        assert run(s, post(f"d{i}", 5, 20 + i, settlement_wallet_id("CNY", SHARD), "alice",
                           KIND_DEPOSIT))[0].ok
    # Back to the default (-1): carol is limited again.
    run(s, limits("carol", window=risk.INHERIT, step_up=risk.INHERIT))
    assert run(s, post("c9", 1, 30, "carol"))[0].ok
    assert run(s, post("c10", 1, 31, "carol"))[0].status is Status.VELOCITY_LIMIT_EXCEEDED


def test_holds_and_chain_items_are_debits():
    s = funded()
    run(s, limits(window=MINUTE, count=2))
    assert run(s, CreateHold("svc", "h1", "h-1", "alice", 100, "CNY", MINUTE, 10))[0].ok
    assert run(s, PrepareLinked(post("l1", 10, 20), "chain-1", SHARD))[0].ok
    held, events = run(s, CreateHold("svc", "h2", "h-2", "alice", 100, "CNY", MINUTE, 30))
    assert held.status is Status.VELOCITY_LIMIT_EXCEEDED and not events
    item, events = run(s, PrepareLinked(post("l2", 10, 40), "chain-2", SHARD))
    assert item.status is Status.VELOCITY_LIMIT_EXCEEDED


def test_step_up_needs_a_confirmed_device_and_is_not_recorded():
    s = funded()
    run(s, limits(step_up=10_000))
    assert run(s, post("small", 10_000, 10))[0].ok  # at the threshold: no check
    out, events = run(s, post("big", 10_001, 20, device="phone-2"))
    assert out.status is Status.STEP_UP_REQUIRED and out.field == "device_id" and not events
    out, _ = run(s, post("big2", 20_000, 20))
    assert out.status is Status.STEP_UP_REQUIRED and "names no device_id" in out.detail
    confirmed, events = run(s, ConfirmDevice("alice", "phone-2", True, "sms code", "risk", 30))
    assert confirmed.ok and events
    assert not run(s, ConfirmDevice("alice", "phone-2", True, "again", "risk", 31))[1]
    # The same request, same key, passes now: nothing was recorded under it.
    again = run(s, post("big", 10_001, 40, device="phone-2"))[0]
    assert again.ok and not again.replayed
    assert run(s, post("other", 10_001, 50, device="phone-3"))[0].status is \
        Status.STEP_UP_REQUIRED
    # Using a device does not make it known; forgetting one does.
    run(s, ConfirmDevice("alice", "phone-2", False, "lost", "risk", 60))
    assert run(s, post("big3", 10_001, 70, device="phone-2"))[0].status is \
        Status.STEP_UP_REQUIRED
    # Withdrawals and holds are checked too.
    assert run(s, post("wd", 10_001, 80, target=settlement_wallet_id("CNY", SHARD),
                       kind=KIND_WITHDRAWAL))[0].status is Status.STEP_UP_REQUIRED
    assert run(s, CreateHold("svc", "h", "h-1", "alice", 10_001, "CNY", MINUTE, 90))[0] \
        .status is Status.STEP_UP_REQUIRED


def test_devices_kept_per_wallet_are_bounded():
    s = funded()
    for i in range(risk.DEVICES_MAX + 5):
        run(s, ConfirmDevice("alice", f"d{i}", True, "", "risk", i))
    devices = s.risk["alice"].devices
    assert len(devices) == risk.DEVICES_MAX and devices[-1] == f"d{risk.DEVICES_MAX + 4}"
    assert "d0" not in devices


def test_unknown_wallets_and_unchanged_limits_journal_nothing():
    s = funded()
    out, events = run(s, limits("ghost", window=MINUTE, count=1))
    assert out.status is Status.WALLET_NOT_FOUND and out.field == "wallet_id" and not events
    out, events = run(s, ConfirmDevice("ghost", "d", True, "", "risk", 1))
    assert out.status is Status.WALLET_NOT_FOUND and not events
    assert run(s, limits(window=MINUTE, count=1))[1]
    assert not run(s, limits(window=MINUTE, count=1))[1]


def test_replay_and_snapshot_rebuild_limits_devices_and_windows():
    journal: list = []
    s = funded(journal)
    for command in (limits("", window=MINUTE, amount=5_000),
                    limits(window=risk.INHERIT, step_up=1_000),
                    ConfirmDevice("alice", "phone", True, "", "risk", 2),
                    post("a", 3_000, 10_000, device="phone"), post("b", 1_500, 11_000,
                                                                   device="phone")):
        out, events = run(s, command)
        assert out.ok
        journal += events
    replayed = ShardState(SHARD)
    fold_events(replayed, codec.loads(codec.dumps(journal)))
    snapshot = codec.snapshot_loads(codec.snapshot_dumps(replayed))
    for state in (replayed, snapshot):
        assert state.risk == s.risk and state.risk_default == s.risk_default
        out, _ = run(state, post("c", 600, 12_000, device="phone"))
        assert out.status is Status.VELOCITY_LIMIT_EXCEEDED  # 3,000 + 1,500 + 600 > 5,000
        assert run(state, post("d", 1_001, 12_000))[0].status is Status.STEP_UP_REQUIRED
    assert snapshot.risk_default is not risk.NO_LIMITS
    assert codec.snapshot_loads(codec.snapshot_dumps(ShardState(SHARD))).risk_default \
        is risk.NO_LIMITS


@settings(max_examples=150, deadline=None)
@given(window=st.integers(risk.WINDOW_MIN_MS, 10 * MINUTE), cap=st.integers(1, 5_000),
       debits=st.lists(st.tuples(st.integers(0, 20 * MINUTE), st.integers(1, 800)),
                       min_size=1, max_size=40))
def test_no_window_ever_holds_more_than_the_limit(window, cap, debits):
    """Whatever the timing, the committed debits within any span of ``window_ms`` never sum
    past the amount limit (the bucketing only ever counts a debit longer)."""
    s = funded()
    run(s, limits(window=window, amount=cap))
    committed = []
    for i, (at, amount) in enumerate(sorted(debits)):
        out, _ = run(s, post(f"k{i}", amount, at))
        if out.ok:
            committed.append((at, amount))
    for start, _ in committed:
        assert sum(a for t, a in committed if start <= t < start + window) <= cap


@pytest.mark.parametrize("bad", [
    dict(wallet_id="", window_ms=-1), dict(window_ms=10), dict(window_ms=MINUTE),
    dict(max_count=3), dict(window_ms=MINUTE, max_count=-1),
    dict(window_ms=MINUTE, max_count=1, step_up_above_minor=-2),
])
def test_bad_limits_name_their_field(bad):
    from ledger.core import validate
    args = dict(wallet_id="alice", window_ms=0, max_amount_minor=0, max_count=0,
                step_up_above_minor=0) | bad
    out = validate.risk_limits(bool(args["wallet_id"]), args["window_ms"],
                               args["max_amount_minor"], args["max_count"],
                               args["step_up_above_minor"])
    assert out is not None and out.status is Status.INVALID_ARGUMENT and out.field


def test_ledgerctl_reads_limits_as_operators_write_them():
    from ledger.cli.ledgerctl import _limit_value
    assert [_limit_value(t) for t in ("1h", "90s", "7d", "250ms", "5000", "none", "default")] \
        == [3_600_000, 90_000, 7 * 86_400_000, 250, 5_000, 0, -1]
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        _limit_value("soon")


def test_risk_changes_are_audited_without_the_device_id():
    from ledger.core import audit
    from ledger.core.model import DeviceConfirmed, RiskLimitsSet
    records = audit.records_of([
        RiskLimitsSet("alice", MINUTE, 0, 3, 500, "fraud wave", "spiffe://redledger/operator/ops",
                      7),
        RiskLimitsSet("", MINUTE, 10_000, 0, 0, "", "ops", 8),
        DeviceConfirmed("alice", "imei-356938035643809", True, "sms ok", "ops", 9),
        DeviceConfirmed("alice", "imei-356938035643809", False, "lost", "ops", 10)])
    assert [(r[0], r[1], r[8]) for r in records] == [
        ("SetRiskLimits", "spiffe://redledger/operator/ops", "alice"),
        ("SetRiskLimits", "ops", "default"), ("ConfirmDevice", "ops", "alice"),
        ("ForgetDevice", "ops", "alice")]
    assert "max_count=3" in records[0][-1] and "fraud wave" in records[0][-1]
    assert "imei" not in repr(records)
    assert records[2][2] != records[3][2]  # the request hashes differ


def test_a_window_not_a_multiple_of_the_bucket_count_is_never_short():
    """Found by the property test above: a 1,000 ms window in buckets of 16 ms summed only
    960-976 ms back, so a debit 999 ms after a full window passed."""
    s = funded()
    run(s, limits(window=1000, amount=104))
    assert run(s, post("k1", 104, 7465))[0].ok
    late = run(s, post("k2", 1, 8464))[0]
    assert late.status is Status.VELOCITY_LIMIT_EXCEEDED
    # A window and one bucket (16 ms) later the first debit no longer counts.
    assert run(s, post("k3", 1, 7465 + 1000 + 16))[0].ok


def test_a_debit_stamped_earlier_than_the_last_is_checked_against_its_window():
    # Coordinators' clocks differ: a later command may carry an earlier time.
    s = funded()
    run(s, limits(window=60_000, amount=100))
    assert run(s, post("k1", 100, 200_000))[0].ok
    assert run(s, post("k2", 1, 150_000))[0].status is Status.VELOCITY_LIMIT_EXCEEDED
