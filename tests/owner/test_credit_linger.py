"""The crediting pipeline's linger (``ShardOwner._linger``) on real shard owners: credits
nobody waits for (a red envelope's grabs) are merged into one delivery per receiver shard
while grabs keep coming; credits a caller waits for (a Transfer's answer holds for its credit
leg) are never held for that longer linger."""

from __future__ import annotations

import pytest

from coordinator.coordinator import TransferItem
from coordinator.envelopes import EnvelopeRules, Envelopes, GrabItem
from ledger import constants as K
from ledger.core import split
from ledger.core.model import ApplyCredits, escrow_wallet_id
from shard_router.hashing import shard_of
from tests.owner.conftest import Ledger, ledger_of
from tests.owner.test_envelopes import owed, until
from tests.owner.test_idempotency_claims import wallet_on as claims_wallet_on

# Wide enough for the linger (CREDIT_LINGER_FANOUT_MIN destination shards and more).
SHARDS = 24
RECEIVER_SHARDS = 18
GRAB_CALLS = 12  # one grab per receiver shard per call: 12 credits owed to each


def wallet_on(shard: int, prefix: str) -> str:
    return claims_wallet_on(shard, prefix, SHARDS)


@pytest.fixture
async def ledger():
    led = await ledger_of(SHARDS)
    led.envelopes = Envelopes(led.coordinator, led.peers, led.store, SHARDS,
                              EnvelopeRules(shares_max=1_000), clock_ms=lambda: led.now,
                              new_seed=lambda: 7)
    try:
        yield led
    finally:
        await led.close()


async def envelope_and_receivers(led: Ledger, shares: int, kind: str,
                                 per_shard: int) -> tuple:
    """A funded sender's envelope of ``shares`` shares of 10, and ``per_shard`` receivers on
    each of RECEIVER_SHARDS shards other than the envelope's: (envelope, its shard,
    {receiver shard: [wallet, ...]})."""
    c = led.coordinator
    sender = wallet_on(0, "sender")
    assert (await c.create_wallet("svc", "w-" + sender, sender, "CNY")).ok
    assert (await c.deposit("svc", "d-" + sender, sender, 100_000, "CNY")).ok
    made = await led.envelopes.create("svc", "env", sender, shares * 10, shares, kind, "CNY",
                                      60_000)
    assert made.ok, made
    envelope = made.value[0]
    home = shard_of(escrow_wallet_id(envelope.envelope_id), SHARDS)
    targets = [s for s in range(SHARDS) if s != home][:RECEIVER_SHARDS]
    receivers = {s: [wallet_on(s, f"r{s}-{i}-") for i in range(per_shard)] for s in targets}
    for wallets in receivers.values():
        for w in wallets:
            assert (await c.create_wallet("svc", "w-" + w, w, "CNY")).ok
    return envelope, home, receivers


def deliveries_from(led: Ledger, shard: int) -> dict[int, int]:
    """ApplyCredits calls made by ``shard``'s pipeline, per destination shard."""
    out: dict[int, int] = {}
    for dest, commands in led.peers.calls:
        for command in commands:
            if type(command) is ApplyCredits and command.from_shard == shard:
                out[dest] = out.get(dest, 0) + 1
    return out


async def test_grab_credits_go_to_each_receiver_shard_once_while_grabs_keep_coming(
        ledger, monkeypatch):
    # The linger ends when grabs stop for a second (not earlier, however slow the machine):
    # the assertion below is about merging, not about timing.
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MIN_MS", 1_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MAX_MS", 1_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_ASYNC_MS", 60_000)
    shares = RECEIVER_SHARDS * GRAB_CALLS
    envelope, home, receivers = await envelope_and_receivers(ledger, shares, split.KIND_LUCKY,
                                                             GRAB_CALLS)
    targets = list(receivers)
    ledger.peers.calls.clear()
    for call in range(GRAB_CALLS):  # each call its own step and append on the envelope shard
        out = await ledger.envelopes.grab_many("svc", [
            GrabItem(f"g-{call}-{s}", envelope.envelope_id, receivers[s][call])
            for s in targets])
        assert all(o.ok for o in out), out
    await until(lambda: owed(ledger) == 0, "every grab credited")
    # 12 credits per receiver shard: under the old rule (8 per destination) they left in two
    # deliveries; nobody waits for them, so they leave together once the grabs stopped.
    assert deliveries_from(ledger, home) == {s: 1 for s in targets}
    balances = ledger.balances()
    assert sum(balances[w] for ws in receivers.values() for w in ws) == shares * 10
    for owner in ledger.peers.owners.values():
        owner.state.check()


async def test_credits_a_transfer_waits_for_are_not_held_by_the_grab_linger(
        ledger, monkeypatch):
    # Were a waited-for credit held like a grab's, it would wait a minute and the Transfer's
    # answer (which waits CREDIT_WAIT_MS for its credit leg) would say credited=false.
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MIN_MS", 60_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MAX_MS", 60_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_ASYNC_MS", 60_000)
    c = ledger.coordinator
    payer = wallet_on(0, "payer")
    assert (await c.create_wallet("svc", "w-" + payer, payer, "CNY")).ok
    assert (await c.deposit("svc", "d-" + payer, payer, 100_000, "CNY")).ok
    payees = [wallet_on(s, f"p{s}-") for s in range(1, 1 + RECEIVER_SHARDS)]
    for w in payees:
        assert (await c.create_wallet("svc", "w-" + w, w, "CNY")).ok
    # One credit per destination, 18 destinations: a thin fan-out that lingers.
    out = await c.batch_transfer("svc", [TransferItem(f"t-{w}", payer, w, 5, "CNY")
                                         for w in payees])
    assert all(o.ok for o in out), out
    assert [o.value.credited for o in out] == [True] * len(payees)
    balances = ledger.balances()
    assert [balances[w] for w in payees] == [5] * len(payees)


async def test_while_grabs_keep_coming_credits_leave_a_few_destinations_at_a_time(
        ledger, monkeypatch):
    # Never idle (credits keep "coming" for a minute) and no linger: every delivery happens
    # while the envelope's shard is busy, so each goes out in rounds of at most 4 shards.
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MIN_MS", 60_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_IDLE_MAX_MS", 60_000)
    monkeypatch.setattr(K, "CREDIT_LINGER_ASYNC_MS", 0)
    monkeypatch.setattr(K, "CREDIT_DESTS_PER_ROUND", 4)
    envelope, home, per_shard = await envelope_and_receivers(ledger, RECEIVER_SHARDS,
                                                             split.KIND_FIXED, 1)
    receivers = [wallets[0] for wallets in per_shard.values()]
    in_flight, most = 0, 0
    execute = ledger.peers.execute

    async def counting(shard, commands, wait_credit=False, deadline=None):
        nonlocal in_flight, most
        credits = type(commands[0]) is ApplyCredits and commands[0].from_shard == home
        in_flight += credits
        most = max(most, in_flight)
        try:
            return await execute(shard, commands, wait_credit, deadline)
        finally:
            in_flight -= credits
    monkeypatch.setattr(ledger.peers, "execute", counting)
    out = await ledger.envelopes.grab_many("svc", [
        GrabItem(f"g-{w}", envelope.envelope_id, w) for w in receivers])
    assert all(o.ok for o in out), out
    await until(lambda: owed(ledger) == 0, "every grab credited")
    assert 1 <= most <= 4, most  # one round of all 18 shards before rounds existed
    balances = ledger.balances()
    assert [balances[w] for w in receivers] == [10] * RECEIVER_SHARDS
