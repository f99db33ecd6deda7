"""Red envelopes across real shard owners (in-memory store, in-process peers): the sender,
the envelope and the receivers on different shards, credits through the crediting pipeline,
a failover of the envelope's owner between the answers and the credits, and the expiry
refund by the owner's sweep."""

from __future__ import annotations

import asyncio

import pytest

from coordinator import Coordinator
from coordinator.envelopes import Envelopes, GrabItem
from ledger.core import split
from ledger.core.model import ApplyCredits, escrow_wallet_id
from ledger.core.status import Status
from shard_router.hashing import shard_of
from tests.owner.conftest import Ledger
from tests.owner.test_idempotency_claims import SHARDS, wallet_on

POLL_S = 0.01
WAIT_S_MAX = 10.0


async def until(condition, what: str) -> None:
    """Poll ``condition`` (bounded): the sweep and the pipeline run on their own timers."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S_MAX
    while not condition():
        assert loop.time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)


async def envelope_ledger(peers=None) -> Ledger:
    """Owners of every shard, a coordinator and the envelope calls over ``peers`` (the
    default test peers unless given)."""
    led = Ledger(SHARDS)
    if peers is not None:
        led.peers = peers
    for shard in range(SHARDS):
        await led.start(shard)
    led.coordinator = Coordinator(led.peers, led.store, SHARDS, clock_ms=lambda: led.now)
    led.envelopes = Envelopes(led.coordinator, led.peers, led.store, SHARDS,
                              clock_ms=lambda: led.now, new_seed=lambda: 7)
    return led


@pytest.fixture
async def ledger():
    led = await envelope_ledger()
    try:
        yield led
    finally:
        await led.close()


def owed(led: Ledger) -> int:
    return sum(len(items) for o in led.peers.owners.values() for items in o.state.outbox.values())


def check_all(led: Ledger) -> None:
    for owner in led.peers.owners.values():
        owner.state.check()


async def setup_people(led: Ledger, sender_shard: int, n: int = 6) -> tuple[str, list[str]]:
    c = led.coordinator
    sender = wallet_on(sender_shard, "sender")
    assert (await c.create_wallet("svc", "w-" + sender, sender, "CNY")).ok
    assert (await c.deposit("svc", "d-" + sender, sender, 10_000, "CNY")).ok
    receivers = []
    for i in range(n):
        r = wallet_on(i % SHARDS, f"r{i}-")
        assert (await c.create_wallet("svc", "w-" + r, r, "CNY")).ok
        receivers.append(r)
    return sender, receivers


async def test_lucky_envelope_across_shards_credits_each_grab_once(ledger):
    sender, receivers = await setup_people(ledger, 1)
    made = await ledger.envelopes.create("svc", "env-1", sender, 1000, 5, split.KIND_LUCKY, "CNY",
                                         60_000, "hny")
    assert made.ok, made
    envelope, funding = made.value
    assert envelope.state(ledger.now) == "ACTIVE" and funding.credited
    out = await ledger.envelopes.grab_many("svc", [GrabItem("g-" + r, envelope.envelope_id, r)
                                                   for r in receivers])
    assert [o.status for o in out] == [Status.OK] * 5 + [Status.ENVELOPE_SOLD_OUT]
    amounts = [o.value[0].amount_minor for o in out[:5]]
    assert amounts == split.all_shares(split.KIND_LUCKY, 7, 1000, 5, 1)
    await until(lambda: owed(ledger) == 0, "credits delivered")
    balances = ledger.balances()
    assert [balances[r] for r in receivers[:5]] == amounts and balances[receivers[5]] == 0
    assert balances[sender] == 9_000
    assert balances[escrow_wallet_id(envelope.envelope_id)] == 0
    retry = await ledger.envelopes.grab("svc", GrabItem("g-" + receivers[0],
                                                        envelope.envelope_id, receivers[0]))
    assert retry.ok and retry.replayed and retry.value[0].amount_minor == amounts[0]
    check_all(ledger)


async def test_envelope_owner_fails_over_between_answers_and_credits(ledger):
    sender, receivers = await setup_people(ledger, 0, n=4)
    made = await ledger.envelopes.create("svc", "env-2", sender, 900, 4, split.KIND_LUCKY,
                                         "CNY", 60_000)
    assert made.ok, made
    env_id = made.value[0].envelope_id
    env_shard = shard_of(escrow_wallet_id(env_id), SHARDS)
    remote = [r for r in receivers if shard_of(r, SHARDS) != env_shard]
    door = ledger.peers.hold(shard_of(remote[0], SHARDS), ApplyCredits)
    out = await ledger.envelopes.grab_many("svc", [GrabItem("g-" + r, env_id, r)
                                                   for r in receivers])
    assert all(o.ok for o in out), out
    first = {r: o.value[0].amount_minor for r, o in zip(receivers, out)}
    await door.entered.wait()
    # The envelope's owner goes away with a credit on its way; a new owner replays.
    await ledger.peers.owners[env_shard].stop("ownership lost")
    await ledger.start(env_shard, epoch=2)
    door.release.set()
    again = await ledger.envelopes.grab_many("svc", [GrabItem("g-" + r, env_id, r)
                                                     for r in receivers])
    assert all(o.ok and o.replayed for o in again), again
    assert {r: o.value[0].amount_minor for r, o in zip(receivers, again)} == first
    await until(lambda: owed(ledger) == 0, "credits delivered after failover")
    balances = ledger.balances()
    assert {r: balances[r] for r in receivers} == first
    assert sum(first.values()) == 900
    check_all(ledger)


async def test_expired_envelope_refunds_the_rest_to_another_shard_once(ledger):
    sender, receivers = await setup_people(ledger, 2, n=2)
    made = await ledger.envelopes.create("svc", "env-3", sender, 500, 5, split.KIND_FIXED,
                                         "CNY", 1_000)
    assert made.ok, made
    env_id = made.value[0].envelope_id
    got = await ledger.envelopes.grab("svc", GrabItem("g1", env_id, receivers[0]))
    assert got.ok and got.value[0].amount_minor == 100
    ledger.now += 1_000
    late = await ledger.envelopes.grab("svc", GrabItem("g2", env_id, receivers[1]))
    assert late.status is Status.ENVELOPE_EXPIRED
    env_owner = ledger.peers.owners[shard_of(escrow_wallet_id(env_id), SHARDS)]
    await until(lambda: env_owner.state.envelopes[env_id].refund_transfer_id
                and owed(ledger) == 0, "the sweep's refund")
    view = await ledger.envelopes.get(env_id)
    assert view.ok and view.value.envelope.state(ledger.now) == "REFUNDED"
    assert view.value.envelope.refunded_minor == 400
    assert ledger.balances()[sender] == 10_000 - 500 + 400
    # Nothing is left to refund: the sweep's next passes find nothing.
    assert env_owner.state.expired_envelopes(ledger.now) == []
    check_all(ledger)


async def test_refusals_change_nothing(ledger):
    sender, receivers = await setup_people(ledger, 3, n=1)
    usd = wallet_on(0, "usd")
    assert (await ledger.coordinator.create_wallet("svc", "w-usd", usd, "USD")).ok
    poor = await ledger.envelopes.create("svc", "env-poor", sender, 20_000, 5, split.KIND_LUCKY,
                                         "CNY", 60_000)
    assert poor.status is Status.INSUFFICIENT_FUNDS, poor
    made = await ledger.envelopes.create("svc", "env-4", sender, 100, 2, split.KIND_FIXED,
                                         "CNY", 60_000)
    assert made.ok, made
    env_id = made.value[0].envelope_id
    before = ledger.balances()
    wrong = await ledger.envelopes.grab("svc", GrabItem("g-usd", env_id, usd))
    assert wrong.status is Status.CURRENCY_MISMATCH and wrong.field == "receiver_wallet_id"
    missing = await ledger.envelopes.grab("svc", GrabItem("g-x", env_id, "nobody-here"))
    assert missing.status is Status.WALLET_NOT_FOUND
    unknown = await ledger.envelopes.grab("svc", GrabItem("g-u", "e" + "1" * 24, receivers[0]))
    assert unknown.status is Status.ENVELOPE_NOT_FOUND
    assert ledger.balances() == before
    again = await ledger.envelopes.create("svc", "env-4", sender, 100, 3, split.KIND_FIXED,
                                          "CNY", 60_000)
    assert again.status is Status.IDEMPOTENCY_KEY_REUSED and again.field == "shares"
    check_all(ledger)


async def test_a_grab_whose_envelope_read_is_unavailable_is_retried_not_refused(ledger):
    """The coordinator reads an envelope's currency before its first grab there; a read its
    owner could not answer (failover) is SHARD_UNAVAILABLE, for the client to retry, never
    a definitive ENVELOPE_NOT_FOUND (found by the seeded simulation, seed 5)."""
    sender, receivers = await setup_people(ledger, 0, n=1)
    made = await ledger.envelopes.create("svc", "env-5", sender, 100, 2, split.KIND_FIXED,
                                         "CNY", 60_000)
    assert made.ok, made
    env_id = made.value[0].envelope_id
    env_shard = shard_of(escrow_wallet_id(env_id), SHARDS)
    fresh = Envelopes(ledger.coordinator, ledger.peers, ledger.store, SHARDS,
                      clock_ms=lambda: ledger.now, new_seed=lambda: 7)
    await ledger.peers.owners[env_shard].stop("ownership lost")
    missed = await fresh.grab("svc", GrabItem("g1", env_id, receivers[0]))
    assert missed.status is Status.SHARD_UNAVAILABLE, missed
    await ledger.start(env_shard, epoch=2)
    got = await fresh.grab("svc", GrabItem("g1", env_id, receivers[0]))
    assert got.ok and got.value[0].amount_minor == 50, got
    check_all(ledger)


async def test_the_same_grab_key_twice_in_one_call_gets_one_answer(ledger):
    sender, receivers = await setup_people(ledger, 1, n=2)
    made = await ledger.envelopes.create("svc", "env-6", sender, 100, 2, split.KIND_FIXED,
                                         "CNY", 60_000)
    env_id = made.value[0].envelope_id
    out = await ledger.envelopes.grab_many("svc", [
        GrabItem("k", env_id, receivers[0]), GrabItem("k", env_id, receivers[0]),
        GrabItem("k", env_id, receivers[1])])
    assert out[0].ok and not out[0].replayed
    assert out[1].ok and out[1].replayed and out[1].value == out[0].value
    assert out[2].status is Status.IDEMPOTENCY_KEY_REUSED
    assert out[2].field == "receiver_wallet_id"
    assert ledger.peers.owners[shard_of(escrow_wallet_id(env_id), SHARDS)].state.envelopes[
        env_id].left_shares == 1


async def test_a_full_currency_memory_keeps_the_envelopes_of_the_call(ledger, monkeypatch):
    from coordinator import envelopes as module
    monkeypatch.setattr(module, "_CURRENCIES_KEPT_MAX", 1)
    sender, receivers = await setup_people(ledger, 2, n=2)
    ids = []
    for key in ("env-7", "env-8"):
        made = await ledger.envelopes.create("svc", key, sender, 100, 2, split.KIND_FIXED,
                                             "CNY", 60_000)
        ids.append(made.value[0].envelope_id)
    assert (await ledger.envelopes.grab("svc", GrabItem("a", ids[0], receivers[0]))).ok
    both = await ledger.envelopes.grab_many("svc", [GrabItem("b", ids[0], receivers[1]),
                                                    GrabItem("c", ids[1], receivers[1])])
    assert all(o.ok for o in both), both


async def test_a_refused_funding_closes_the_envelope_for_grabs(ledger):
    sender, receivers = await setup_people(ledger, 3, n=1)
    poor = await ledger.envelopes.create("svc", "env-9", sender, 20_000, 2, split.KIND_FIXED,
                                         "CNY", 60_000)
    assert poor.status is Status.INSUFFICIENT_FUNDS and poor.field == "total_minor"
    from ledger.core.ids import envelope_id_for
    env_id = envelope_id_for("svc", "env-9")
    got = await ledger.envelopes.grab("svc", GrabItem("g", env_id, receivers[0]))
    assert got.status is Status.ENVELOPE_UNFUNDED, got
    view = await ledger.envelopes.get(env_id)
    assert view.ok and view.value.envelope.state(ledger.now) == "UNFUNDED"
    check_all(ledger)
