"""Freezing a wallet in the pure core: debits refused with WALLET_FROZEN, credits still land,
setting the same state again journals nothing, and a replay keeps the state."""

from __future__ import annotations

from ledger.core import codec
from ledger.core.model import (
    KIND_DEPOSIT, KIND_TRANSFER, CreateHold, CreateWallet, Post, SetFrozen, WalletFrozen,
    settlement_wallet_id,
)
from ledger.core.shard import ShardState
from ledger.core.status import Status
from ledger.core.step import fold_events, step

SHARD = 0


def run(state, command):
    result = step(state, [command])
    state.check()
    return result.outcomes[0], result.events


def post(key, source, target, amount, kind=KIND_TRANSFER):
    return Post("svc", key, "t-" + key, kind, source, target, amount, "CNY", "", SHARD, 5)


def test_a_frozen_wallet_refuses_debits_and_takes_credits():
    s = ShardState(SHARD)
    journal = []
    for w in ("alice", "bob"):
        _, events = run(s, CreateWallet("svc", "w-" + w, w, "CNY", False, 1))
        journal += events
    _, events = run(s, post("dep", settlement_wallet_id("CNY", SHARD), "alice", 1_000,
                            KIND_DEPOSIT))
    journal += events
    frozen, events = run(s, SetFrozen("alice", True, "stolen phone", "ops", 3))
    assert frozen.ok and frozen.value.frozen and events == [
        WalletFrozen("alice", True, "stolen phone", "ops", 3)]
    journal += events
    again, events = run(s, SetFrozen("alice", True, "twice", "ops", 4))
    assert again.ok and not events  # the state it has: nothing journaled
    out, events = run(s, post("t1", "alice", "bob", 100))
    assert out.status is Status.WALLET_FROZEN and out.field == "from_wallet_id"
    journal += events  # a recorded refusal
    held, _ = run(s, CreateHold("svc", "h1", "h-1", "alice", 100, "CNY", 60_000, 5))
    assert held.status is Status.WALLET_FROZEN
    _, events = run(s, post("dep2", settlement_wallet_id("CNY", SHARD), "alice", 50,
                            KIND_DEPOSIT))
    journal += events
    assert s.wallets["alice"].balance_minor == 1_050  # credits land on a frozen wallet
    # A replay of the journal keeps the wallet frozen.
    replayed = ShardState(SHARD)
    fold_events(replayed, codec.loads(codec.dumps(journal)))
    assert replayed.wallets["alice"].frozen
    unfrozen, _ = run(s, SetFrozen("alice", False, "", "ops", 6))
    assert not unfrozen.value.frozen
    assert run(s, post("t3", "alice", "bob", 100))[0].ok


def test_freezing_an_unknown_wallet_names_it():
    out, events = run(ShardState(SHARD), SetFrozen("nobody", True, "", "ops", 1))
    assert out.status is Status.WALLET_NOT_FOUND and out.field == "wallet_id" and not events
