"""Holds and linked chains through the API, on the embedded default and Cassandra + etcd.

Proves: a hold reserves money (available drops, balance does not); capture of part moves that
part and returns the rest; release returns it all; an expired hold releases itself and cannot
be captured; linked BatchTransfer items commit all together or not at all, across shards.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from clients import LedgerError
from ledgerpb import ledger_pb2 as pb
from tests.e2e.test_api import snapshot, two_wallets


async def funded(client, prefix, same_shard=False, amount=1_000):
    a, b = two_wallets(same_shard, prefix)
    await client.create_wallet(a, "CNY")
    await client.create_wallet(b, "CNY")
    await client.deposit(a, amount, "CNY")
    return a, b


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_hold_capture_part_returns_the_rest(client, same_shard):
    a, b = await funded(client, "hc", same_shard)
    hold = (await client.create_hold(a, 600, "CNY", timeout_ms=60_000)).hold
    wallet = await client.get_wallet(a)
    assert (wallet.balance_minor, wallet.held_minor, wallet.available_minor) == (1_000, 600, 400)
    with pytest.raises(LedgerError) as err:  # only 400 is available now
        await client.transfer(a, b, 500, "CNY")
    assert err.value.status == "RESULT_STATUS_INSUFFICIENT_FUNDS"
    captured = await client.capture_hold(hold.hold_id, b, amount_minor=250)
    assert captured.transfer.kind == pb.TRANSFER_KIND_HOLD_CAPTURE and captured.transfer.credited
    wallet = await client.get_wallet(a)
    assert (wallet.balance_minor, wallet.held_minor, wallet.available_minor) == (750, 0, 750)
    assert (await client.get_wallet(b)).balance_minor == 250
    closed = await client.get_hold(hold.hold_id)
    assert (closed.state, closed.captured_minor) == (pb.HOLD_STATE_CAPTURED, 250)
    with pytest.raises(LedgerError) as err:
        await client.capture_hold(hold.hold_id, b)
    assert (err.value.code, err.value.status) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                   "RESULT_STATUS_HOLD_NOT_ACTIVE")


async def test_release_and_idempotent_replay(client):
    a, _ = await funded(client, "hr")
    hold = (await client.create_hold(a, 300, "CNY", 60_000, idempotency_key="h-1")).hold
    again = await client.create_hold(a, 300, "CNY", 60_000, idempotency_key="h-1")
    assert again.replayed and again.hold.hold_id == hold.hold_id
    assert (await client.get_wallet(a)).held_minor == 300
    released = await client.release_hold(hold.hold_id, idempotency_key="r-1")
    assert released.hold.state == pb.HOLD_STATE_RELEASED
    assert (await client.release_hold(hold.hold_id, idempotency_key="r-1")).replayed
    assert (await client.get_wallet(a)).available_minor == 1_000


async def test_capture_more_than_held_is_refused(client):
    a, b = await funded(client, "hx")
    hold = (await client.create_hold(a, 100, "CNY", 60_000)).hold
    with pytest.raises(LedgerError) as err:
        await client.capture_hold(hold.hold_id, b, amount_minor=101)
    assert err.value.status == "RESULT_STATUS_HOLD_AMOUNT_EXCEEDED"
    assert (await client.get_wallet(a)).held_minor == 100


async def test_hold_expires_by_itself(client):
    a, b = await funded(client, "he")
    hold = (await client.create_hold(a, 400, "CNY", timeout_ms=300)).hold
    deadline = time.monotonic() + 10
    while (await client.get_hold(hold.hold_id)).state == pb.HOLD_STATE_HELD:
        assert time.monotonic() < deadline, "hold outlived its timeout by 10 s"
        await asyncio.sleep(0.1)
    expired = await client.get_hold(hold.hold_id)
    assert expired.state == pb.HOLD_STATE_EXPIRED
    assert expired.closed_at_ms >= expired.expires_at_ms
    assert (await client.get_wallet(a)).held_minor == 0
    with pytest.raises(LedgerError) as err:
        await client.capture_hold(hold.hold_id, b)
    assert err.value.status == "RESULT_STATUS_HOLD_NOT_ACTIVE"


async def test_bad_hold_requests(client):
    a, _ = await funded(client, "hb")
    for kwargs, field in [(dict(amount_minor=0), "amount_minor"),
                          (dict(timeout_ms=0), "timeout_ms"),
                          (dict(currency="USD"), "currency")]:
        args = dict(wallet_id=a, amount_minor=10, currency="CNY", timeout_ms=1_000)
        args.update(kwargs)
        with pytest.raises(LedgerError) as err:
            await client.create_hold(**args)
        assert err.value.field == field
    with pytest.raises(LedgerError) as err:
        await client.create_hold(a, 1_001, "CNY", 1_000)
    assert err.value.status == "RESULT_STATUS_INSUFFICIENT_FUNDS"
    with pytest.raises(LedgerError) as err:
        await client.get_hold("nope")
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "hold_id")
    assert (await client.get_wallet(a)).held_minor == 0


def item(key, src, dst, amount, linked=False):
    return pb.TransferRequest(idempotency_key=key, from_wallet_id=src, to_wallet_id=dst,
                              amount_minor=amount, currency="CNY", linked=linked)


async def test_linked_chain_commits_all_across_shards(client):
    a, b = await funded(client, "lc")
    c, d = await funded(client, "ld")
    chain = [item("l1", a, b, 100, linked=True), item("l2", c, d, 200, linked=True),
             item("l3", c, a, 50)]
    response = await client.batch_transfer(chain)
    assert [r.status for r in response.results] == [pb.RESULT_STATUS_OK] * 3
    assert all(r.transfer.state == pb.TRANSFER_STATE_COMMITTED for r in response.results)
    expected = {a: 950, b: 100, c: 750, d: 200}
    assert await snapshot(client, a, b, c, d) == expected
    again = await client.batch_transfer(chain)
    assert all(r.replayed and r.status == pb.RESULT_STATUS_OK for r in again.results)
    assert await snapshot(client, a, b, c, d) == expected


async def test_linked_chain_fails_as_a_whole(client):
    a, b = await funded(client, "lf")
    c, d = await funded(client, "lg", amount=10)
    before = await snapshot(client, a, b, c, d)
    response = await client.batch_transfer([
        item("f1", a, b, 100, linked=True), item("f2", c, d, 200, linked=True),
        item("f3", a, b, 5), item("free", a, b, 1)])
    statuses = [r.status for r in response.results]
    assert statuses == [pb.RESULT_STATUS_LINKED_ITEM_FAILED, pb.RESULT_STATUS_INSUFFICIENT_FUNDS,
                        pb.RESULT_STATUS_LINKED_ITEM_FAILED, pb.RESULT_STATUS_OK]
    after = await snapshot(client, a, b, c, d)
    assert after == {**before, a: before[a] - 1, b: before[b] + 1}
    for w in (a, b, c, d):
        assert (await client.get_wallet(w)).held_minor == 0


async def test_open_chain_is_refused(client):
    a, b = await funded(client, "lo")
    response = await client.batch_transfer([item("o1", a, b, 1, linked=True)])
    assert response.results[0].status == pb.RESULT_STATUS_LINKED_CHAIN_OPEN
    assert (await client.get_wallet(a)).balance_minor == 1_000
