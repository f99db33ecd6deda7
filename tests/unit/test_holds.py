"""Holds in the pure core (``ledger.core.shard``): create, capture (all or part), release and
expiry, and what each refuses, with which status and field.

A hold moves money out of a wallet's available balance into ``held_minor`` without changing
its balance; a capture turns (part of) it into a transfer and gives the rest back; a release
or an expiry gives all of it back. Every state reached here is also reached by replaying the
journaled events on a fresh state (what a new owner does). No I/O: commands go through
``decide`` and events through ``evolve``.
"""

import pytest

from ledger.core import constants as C
from ledger.core.model import (
    HOLD_CAPTURED, HOLD_EXPIRED, HOLD_HELD, HOLD_RELEASED, KIND_HOLD_CAPTURE, STATE_COMMITTED,
    STATE_REFUSED, CaptureHold, CreateHold, CreateWallet, ExpireHolds, GetHold, Post,
    ReleaseHold, settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core import step
from ledger.core.status import Status

SHARD = 0
OTHER_SHARD = 1
T0_MS = 1_000_000
TIMEOUT_MS = 60_000


class Ledger:
    """One shard's state and the journal of every event it accepted."""

    def __init__(self) -> None:
        self.state = ShardState(SHARD)
        self.journal: list = []

    def run(self, command):
        result = step.step(self.state, [command])
        self.journal.extend(result.events)
        return result.outcomes[0]

    def wallet(self, wallet_id: str):
        return self.state.wallets[wallet_id]

    def replayed(self) -> ShardState:
        fresh = ShardState(SHARD)
        step.fold_events(fresh, self.journal)
        return fresh


def create(key="h1", wallet="alice", amount=400, currency="CNY", timeout_ms=TIMEOUT_MS,
           now_ms=T0_MS, caller="svc"):
    return CreateHold(caller, key, "hold-" + key, wallet, amount, currency, timeout_ms, now_ms)


def capture(hold_key="h1", key="c1", to="bob", amount=0, now_ms=T0_MS + 1, to_shard=SHARD,
            memo=""):
    return CaptureHold("svc", key, "t-" + key, "hold-" + hold_key, amount, to, to_shard, memo,
                       now_ms)


def release(hold_key="h1", key="r1", now_ms=T0_MS + 1):
    return ReleaseHold("svc", key, "hold-" + hold_key, now_ms)


@pytest.fixture
def ledger() -> Ledger:
    """alice holds 1,000 CNY; bob and carol (USD) have wallets."""
    ledger = Ledger()
    ledger.run(CreateWallet("svc", "w-a", "alice", "CNY", False, 1))
    ledger.run(CreateWallet("svc", "w-b", "bob", "CNY", False, 1))
    ledger.run(CreateWallet("svc", "w-c", "carol", "USD", False, 1))
    assert ledger.run(Post("svc", "dep", "t-dep", "DEPOSIT", settlement_wallet_id("CNY", SHARD),
                           "alice", 1_000, "CNY", "", SHARD, 1)).ok
    return ledger


def assert_replays_to_the_same_state(ledger: Ledger) -> None:
    fresh = ledger.replayed()
    assert {w: (v.balance_minor, v.held_minor) for w, v in fresh.wallets.items()} == {
        w: (v.balance_minor, v.held_minor) for w, v in ledger.state.wallets.items()}
    assert {h: (v.state, v.captured_minor) for h, v in fresh.holds.items()} == {
        h: (v.state, v.captured_minor) for h, v in ledger.state.holds.items()}
    fresh.check()


# --- create ---------------------------------------------------------------------------------

def test_create_reserves_the_amount_without_changing_the_balance(ledger):
    outcome = ledger.run(create(amount=400))
    assert outcome.ok and not outcome.replayed
    hold = outcome.value
    assert (hold.state, hold.amount_minor, hold.wallet_id) == (HOLD_HELD, 400, "alice")
    assert (hold.created_at_ms, hold.expires_at_ms) == (T0_MS, T0_MS + TIMEOUT_MS)
    alice = ledger.wallet("alice")
    assert (alice.balance_minor, alice.held_minor, alice.available_minor) == (1_000, 400, 600)
    assert ledger.run(GetHold("hold-h1")).value.state == HOLD_HELD
    assert_replays_to_the_same_state(ledger)


def test_holds_add_up_and_cannot_reserve_more_than_is_available(ledger):
    assert ledger.run(create("h1", amount=600)).ok
    refused = ledger.run(create("h2", amount=401))
    assert (refused.status, refused.field) == (Status.INSUFFICIENT_FUNDS, "amount_minor")
    assert ledger.run(create("h3", amount=400)).ok
    alice = ledger.wallet("alice")
    assert (alice.held_minor, alice.available_minor) == (1_000, 0)
    assert "hold-h2" not in ledger.state.holds


def test_held_money_cannot_be_transferred(ledger):
    assert ledger.run(create(amount=900)).ok
    refused = ledger.run(Post("svc", "t", "t-t", "TRANSFER", "alice", "bob", 101, "CNY", "",
                              SHARD, T0_MS))
    assert refused.status is Status.INSUFFICIENT_FUNDS
    assert ledger.wallet("alice").balance_minor == 1_000


@pytest.mark.parametrize("command, status, field", [
    (create(wallet="nobody"), Status.WALLET_NOT_FOUND, "wallet_id"),
    (create(currency="USD"), Status.CURRENCY_MISMATCH, "currency"),
    (create(amount=1_001), Status.INSUFFICIENT_FUNDS, "amount_minor"),
])
def test_create_refusals_name_their_field_and_reserve_nothing(ledger, command, status, field):
    refused = ledger.run(command)
    assert (refused.status, refused.field) == (status, field)
    assert ledger.wallet("alice").held_minor == 0 and not ledger.state.holds


def test_a_frozen_wallet_cannot_hold(ledger):
    ledger.wallet("alice").frozen = True
    refused = ledger.run(create())
    assert (refused.status, refused.field) == (Status.WALLET_FROZEN, "wallet_id")


def test_a_wallet_that_may_go_negative_holds_past_its_balance_but_not_past_int64():
    ledger = Ledger()
    ledger.run(CreateWallet("svc", "w-n", "neg", "CNY", True, 1))
    assert ledger.run(create(wallet="neg", amount=5_000)).ok
    assert ledger.wallet("neg").available_minor == -5_000
    refused = ledger.run(create("h2", wallet="neg", amount=C.AMOUNT_MINOR_MAX))
    assert (refused.status, refused.field) == (Status.BALANCE_OVERFLOW, "amount_minor")


def test_create_again_with_the_same_key_and_payload_replays_and_holds_once(ledger):
    first = ledger.run(create(amount=400))
    again = ledger.run(create(amount=400, now_ms=T0_MS + 5))
    assert again.ok and again.replayed and again.value.hold_id == first.value.hold_id
    assert ledger.wallet("alice").held_minor == 400


@pytest.mark.parametrize("changed, field", [
    (dict(amount=401), "amount_minor"),
    (dict(timeout_ms=TIMEOUT_MS + 1), "timeout_ms"),
    (dict(wallet="bob"), "wallet_id"),
])
def test_create_again_with_the_same_key_and_another_payload_names_the_field(ledger, changed,
                                                                            field):
    assert ledger.run(create(amount=400)).ok
    refused = ledger.run(create(**{"amount": 400, **changed}))
    assert (refused.status, refused.field) == (Status.IDEMPOTENCY_KEY_REUSED, field)
    assert ledger.wallet("alice").held_minor == 400


def test_keys_are_scoped_per_caller(ledger):
    assert ledger.run(create(amount=100, caller="svc")).ok
    other = ledger.run(CreateHold("other", "h1", "hold-other-h1", "alice", 100, "CNY",
                                  TIMEOUT_MS, T0_MS))
    assert other.ok and not other.replayed
    assert ledger.wallet("alice").held_minor == 200


# --- capture --------------------------------------------------------------------------------

def test_capture_all_moves_the_held_amount(ledger):
    assert ledger.run(create(amount=400)).ok
    captured = ledger.run(capture(amount=0))
    assert captured.ok
    transfer = captured.value
    assert (transfer.kind, transfer.state, transfer.amount_minor) == (
        KIND_HOLD_CAPTURE, STATE_COMMITTED, 400)
    assert (transfer.from_wallet_id, transfer.to_wallet_id) == ("alice", "bob")
    alice, bob = ledger.wallet("alice"), ledger.wallet("bob")
    assert (alice.balance_minor, alice.held_minor) == (600, 0)
    assert bob.balance_minor == 400
    hold = ledger.state.holds["hold-h1"]
    assert (hold.state, hold.captured_minor, hold.closed_at_ms) == (HOLD_CAPTURED, 400,
                                                                    T0_MS + 1)
    assert_replays_to_the_same_state(ledger)


def test_capture_part_gives_the_rest_back(ledger):
    assert ledger.run(create(amount=400)).ok
    assert ledger.run(capture(amount=150)).ok
    alice = ledger.wallet("alice")
    assert (alice.balance_minor, alice.held_minor, alice.available_minor) == (850, 0, 850)
    assert ledger.wallet("bob").balance_minor == 150
    assert ledger.state.holds["hold-h1"].captured_minor == 150
    assert_replays_to_the_same_state(ledger)


def test_capture_again_with_the_same_key_replays(ledger):
    assert ledger.run(create(amount=400)).ok
    first = ledger.run(capture(amount=150))
    again = ledger.run(capture(amount=150))
    assert again.ok and again.replayed and again.value.transfer_id == first.value.transfer_id
    assert ledger.wallet("bob").balance_minor == 150
    reused = ledger.run(capture(amount=151))
    assert (reused.status, reused.field) == (Status.IDEMPOTENCY_KEY_REUSED, "amount_minor")
    reused = ledger.run(capture(amount=150, to="carol"))
    assert (reused.status, reused.field) == (Status.IDEMPOTENCY_KEY_REUSED, "to_wallet_id")


def test_a_hold_is_captured_once(ledger):
    assert ledger.run(create(amount=400)).ok
    assert ledger.run(capture(key="c1", amount=100)).ok
    second = ledger.run(capture(key="c2", amount=100))
    assert (second.status, second.field) == (Status.HOLD_NOT_ACTIVE, "hold_id")
    assert "captured" in second.detail
    assert ledger.wallet("bob").balance_minor == 100


def test_capturing_more_than_the_hold_is_refused_recorded_and_leaves_the_hold(ledger):
    assert ledger.run(create(amount=400)).ok
    refused = ledger.run(capture(key="c1", amount=401))
    assert (refused.status, refused.field) == (Status.HOLD_AMOUNT_EXCEEDED, "amount_minor")
    assert refused.value.state == STATE_REFUSED
    # The refusal is a decision, kept under its key; the hold stays as it was.
    again = ledger.run(capture(key="c1", amount=401))
    assert again.status is Status.HOLD_AMOUNT_EXCEEDED and again.replayed
    assert ledger.state.holds["hold-h1"].state == HOLD_HELD
    assert ledger.wallet("alice").held_minor == 400 and ledger.wallet("bob").balance_minor == 0
    assert ledger.run(capture(key="c2", amount=400)).ok
    assert_replays_to_the_same_state(ledger)


def test_capturing_into_another_currency_is_refused_and_leaves_the_hold(ledger):
    assert ledger.run(create(amount=400)).ok
    refused = ledger.run(capture(to="carol"))
    assert (refused.status, refused.field) == (Status.CURRENCY_MISMATCH, "to_wallet_id")
    assert ledger.state.holds["hold-h1"].state == HOLD_HELD


def test_capturing_into_an_unknown_wallet_is_refused_and_not_recorded(ledger):
    assert ledger.run(create(amount=400)).ok
    refused = ledger.run(capture(to="nobody"))
    assert (refused.status, refused.field) == (Status.WALLET_NOT_FOUND, "to_wallet_id")
    assert ("svc", "c1") not in ledger.state.idempotency
    ledger.run(CreateWallet("svc", "w-n", "nobody", "CNY", False, 1))
    assert ledger.run(capture(to="nobody")).ok


def test_capturing_into_another_shard_owes_the_credit_through_the_outbox(ledger):
    assert ledger.run(create(amount=400)).ok
    captured = ledger.run(capture(to="dave", to_shard=OTHER_SHARD, amount=300))
    assert captured.ok and not captured.value.credited
    assert ledger.wallet("alice").balance_minor == 700
    [credit] = ledger.state.outbox[OTHER_SHARD].values()
    assert (credit.to_wallet_id, credit.amount_minor) == ("dave", 300)


def test_an_unknown_hold_is_not_found(ledger):
    for command in (capture(hold_key="nope"), release(hold_key="nope"), GetHold("hold-nope")):
        refused = ledger.run(command)
        assert (refused.status, refused.field) == (Status.HOLD_NOT_FOUND, "hold_id")


# --- release --------------------------------------------------------------------------------

def test_release_gives_everything_back(ledger):
    assert ledger.run(create(amount=400)).ok
    released = ledger.run(release())
    assert released.ok and released.value.state == HOLD_RELEASED
    alice = ledger.wallet("alice")
    assert (alice.balance_minor, alice.held_minor) == (1_000, 0)
    again = ledger.run(release())
    assert again.ok and again.replayed
    assert_replays_to_the_same_state(ledger)


def test_a_released_hold_can_be_neither_captured_nor_released_again(ledger):
    assert ledger.run(create(amount=400)).ok
    assert ledger.run(release()).ok
    for command in (capture(), release(key="r2")):
        refused = ledger.run(command)
        assert (refused.status, refused.field) == (Status.HOLD_NOT_ACTIVE, "hold_id")
        assert "released" in refused.detail
    assert ledger.wallet("bob").balance_minor == 0


def test_a_captured_hold_cannot_be_released(ledger):
    assert ledger.run(create(amount=400)).ok
    assert ledger.run(capture(amount=100)).ok
    refused = ledger.run(release())
    assert (refused.status, refused.field) == (Status.HOLD_NOT_ACTIVE, "hold_id")
    assert ledger.wallet("alice").balance_minor == 900


# --- expiry ---------------------------------------------------------------------------------

def test_a_hold_is_active_until_its_deadline_and_not_at_it(ledger):
    assert ledger.run(create(key="h1", amount=100)).ok
    assert ledger.run(create(key="h2", amount=100)).ok
    deadline_ms = T0_MS + TIMEOUT_MS
    assert ledger.run(capture(hold_key="h1", now_ms=deadline_ms - 1)).ok
    late = ledger.run(capture(hold_key="h2", key="c2", now_ms=deadline_ms))
    assert (late.status, late.field) == (Status.HOLD_NOT_ACTIVE, "hold_id")
    assert "expired" in late.detail


@pytest.mark.parametrize("late_command", [capture(now_ms=T0_MS + TIMEOUT_MS + 5),
                                          release(now_ms=T0_MS + TIMEOUT_MS + 5)])
def test_a_late_capture_or_release_journals_the_expiry(ledger, late_command):
    assert ledger.run(create(amount=400)).ok
    refused = ledger.run(late_command)
    assert refused.status is Status.HOLD_NOT_ACTIVE and "expired" in refused.detail
    hold = ledger.state.holds["hold-h1"]
    assert (hold.state, hold.closed_at_ms) == (HOLD_EXPIRED, T0_MS + TIMEOUT_MS + 5)
    assert ledger.wallet("alice").held_minor == 0
    # An older copy of the request, stamped before the deadline, still finds it expired.
    older = ledger.run(capture(key="c-old", now_ms=T0_MS + 1))
    assert older.status is Status.HOLD_NOT_ACTIVE
    assert_replays_to_the_same_state(ledger)


def test_the_sweep_expires_exactly_the_holds_past_their_deadline(ledger):
    assert ledger.run(create(key="short", amount=100, timeout_ms=1_000)).ok
    assert ledger.run(create(key="long", amount=200, timeout_ms=TIMEOUT_MS)).ok
    assert ledger.run(create(key="done", amount=300, timeout_ms=1_000)).ok
    assert ledger.run(release(hold_key="done")).ok
    assert not ledger.state.expired_holds(T0_MS + 999)
    assert ledger.run(ExpireHolds(T0_MS + 999)).value == 0
    assert ledger.state.expired_holds(T0_MS + 1_000)
    swept = ledger.run(ExpireHolds(T0_MS + 1_000))
    assert swept.ok and swept.value == 1
    states = {h: v.state for h, v in ledger.state.holds.items()}
    assert states == {"hold-short": HOLD_EXPIRED, "hold-long": HOLD_HELD,
                      "hold-done": HOLD_RELEASED}
    assert ledger.wallet("alice").held_minor == 200
    assert ledger.run(ExpireHolds(T0_MS + 1_000)).value == 0  # nothing expires twice
    assert_replays_to_the_same_state(ledger)


# --- bad input the core refuses itself ------------------------------------------------------

def test_capturing_into_the_holds_own_wallet_is_refused(ledger):
    """Failed before the fix (kept as a strict expected failure until it was refused): the
    capture committed a self-transfer (no money moved, two history entries)."""
    assert ledger.run(create(amount=400)).ok
    journal, before = len(ledger.journal), ledger.wallet("alice").copy()
    refused = ledger.run(capture(to="alice"))
    assert (refused.status, refused.field) == (Status.SAME_WALLET, "to_wallet_id")
    assert len(ledger.journal) == journal  # nothing decided, nothing journaled
    assert ledger.wallet("alice") == before and before.held_minor == 400
    assert ledger.run(capture(key="c2", to="bob")).ok  # the hold is still there to capture


@pytest.mark.parametrize("amount, timeout_ms, status, field", [
    (0, TIMEOUT_MS, Status.INVALID_AMOUNT, "amount_minor"),
    (-5, TIMEOUT_MS, Status.INVALID_AMOUNT, "amount_minor"),
    (400, 0, Status.INVALID_ARGUMENT, "timeout_ms"),
    (400, -1, Status.INVALID_ARGUMENT, "timeout_ms"),
    (400, C.HOLD_TIMEOUT_MS_MAX + 1, Status.INVALID_ARGUMENT, "timeout_ms")])
def test_the_core_refuses_a_bad_hold_amount_or_timeout(ledger, amount, timeout_ms, status,
                                                       field):
    """The coordinator refuses these first; the core refuses them too, with the same status
    (``ledger.core.validate``), and changes nothing."""
    journal = len(ledger.journal)
    refused = ledger.run(create(amount=amount, timeout_ms=timeout_ms))
    assert (refused.status, refused.field) == (status, field)
    assert len(ledger.journal) == journal and not ledger.state.holds

