"""The public gRPC API end to end, on the embedded default and on Cassandra + etcd.

Proves: wallets, deposits, withdrawals, transfers on one shard and across shards, reads of
balances, transfers and history; every kind of bad input answers the right gRPC code, names
the field, and changes nothing; the books (settlement accounts included) sum to zero.
"""

from __future__ import annotations

import grpc
import pytest

from clients import LedgerError
from ledgerpb import ledger_pb2 as pb
from shard_router import shard_of
from tests.e2e.conftest import SHARDS


def two_wallets(same_shard: bool, prefix: str) -> tuple[str, str]:
    """Two wallet ids on the same shard or on different shards."""
    first = f"{prefix}-a"
    for i in range(10_000):
        other = f"{prefix}-b{i}"
        if (shard_of(other, SHARDS) == shard_of(first, SHARDS)) == same_shard:
            return first, other
    raise AssertionError("no id found")


async def snapshot(client, *wallet_ids):
    return {w: (await client.get_wallet(w)).balance_minor for w in wallet_ids}


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
async def test_money_moves_and_books_balance(client, same_shard):
    a, b = two_wallets(same_shard, "mm")
    await client.create_wallet(a, "CNY")
    await client.create_wallet(b, "CNY")
    await client.deposit(a, 10_000, "CNY")
    response = await client.transfer(a, b, 2_500, "CNY", memo="lunch")
    assert response.transfer.state == pb.TRANSFER_STATE_COMMITTED
    assert response.transfer.credited
    await client.withdraw(b, 500, "CNY")
    assert await snapshot(client, a, b) == {a: 7_500, b: 2_000}
    wallet_a = await client.get_wallet(a)
    assert (wallet_a.version, wallet_a.available_minor, wallet_a.held_minor) == (2, 7_500, 0)

    fetched = await client.get_transfer(response.transfer.transfer_id)
    assert (fetched.from_wallet_id, fetched.to_wallet_id, fetched.amount_minor,
            fetched.memo) == (a, b, 2_500, "lunch")

    entries_b = await client.all_entries(b)
    assert [(e.amount_minor, e.balance_after_minor) for e in entries_b] == [(2_500, 2_500),
                                                                            (-500, 2_000)]
    assert entries_b[0].counterparty_wallet_id == a


async def test_history_pages(client):
    a, b = two_wallets(False, "pages")
    await client.create_wallet(a, "CNY")
    await client.create_wallet(b, "CNY")
    await client.deposit(a, 1_000, "CNY")
    for i in range(7):
        await client.transfer(a, b, 10 + i, "CNY")
    page1 = await client.list_entries(a, page_size=3)
    page2 = await client.list_entries(a, page_size=3, page_token=page1.next_page_token)
    page3 = await client.list_entries(a, page_size=3, page_token=page2.next_page_token)
    versions = [e.version for p in (page1, page2, page3) for e in p.entries]
    assert versions == list(range(1, 9)) and page3.next_page_token == ""


async def test_idempotent_retry_returns_original_and_moves_money_once(client):
    a, b = two_wallets(False, "idem")
    await client.create_wallet(a, "CNY")
    await client.create_wallet(b, "CNY")
    await client.deposit(a, 1_000, "CNY", idempotency_key="dep-1")
    again = await client.deposit(a, 1_000, "CNY", idempotency_key="dep-1")
    assert again.replayed
    first = await client.transfer(a, b, 100, "CNY", idempotency_key="tx-1")
    retry = await client.transfer(a, b, 100, "CNY", idempotency_key="tx-1")
    assert retry.replayed and retry.transfer.transfer_id == first.transfer.transfer_id
    assert await snapshot(client, a, b) == {a: 900, b: 100}
    with pytest.raises(LedgerError) as err:
        await client.transfer(a, b, 101, "CNY", idempotency_key="tx-1")
    assert err.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert err.value.field == "amount_minor"
    assert await snapshot(client, a, b) == {a: 900, b: 100}


async def test_create_wallet_twice(client):
    first = await client.create_wallet("dup-1", "CNY", idempotency_key="cw-1")
    again = await client.create_wallet("dup-1", "CNY", idempotency_key="cw-1")
    assert again.replayed and again.wallet.created_at_ms == first.wallet.created_at_ms
    with pytest.raises(LedgerError) as err:
        await client.create_wallet("dup-1", "CNY", idempotency_key="cw-2")
    assert (err.value.code, err.value.status) == (grpc.StatusCode.ALREADY_EXISTS,
                                                   "RESULT_STATUS_WALLET_EXISTS")
    with pytest.raises(LedgerError) as err:
        await client.create_wallet("dup-1", "USD", idempotency_key="cw-1")
    assert err.value.field == "currency"


BAD_TRANSFERS = [
    # (name, request fields, gRPC code, field)
    ("zero amount", dict(amount_minor=0), grpc.StatusCode.INVALID_ARGUMENT, "amount_minor"),
    ("negative amount", dict(amount_minor=-5), grpc.StatusCode.INVALID_ARGUMENT, "amount_minor"),
    ("same wallet", dict(to_wallet_id="bad-a"), grpc.StatusCode.INVALID_ARGUMENT, "to_wallet_id"),
    ("unknown source", dict(from_wallet_id="ghost"), grpc.StatusCode.NOT_FOUND, "from_wallet_id"),
    ("unknown destination", dict(to_wallet_id="ghost"), grpc.StatusCode.NOT_FOUND,
     "to_wallet_id"),
    ("currency mismatch", dict(currency="USD"), grpc.StatusCode.FAILED_PRECONDITION, "currency"),
    ("bad currency", dict(currency="yuan"), grpc.StatusCode.INVALID_ARGUMENT, "currency"),
    ("missing key", dict(idempotency_key=""), grpc.StatusCode.INVALID_ARGUMENT,
     "idempotency_key"),
    ("oversized key", dict(idempotency_key="k" * 129), grpc.StatusCode.INVALID_ARGUMENT,
     "idempotency_key"),
    ("malformed key", dict(idempotency_key="has space"), grpc.StatusCode.INVALID_ARGUMENT,
     "idempotency_key"),
    ("malformed wallet id", dict(from_wallet_id="a/b"), grpc.StatusCode.INVALID_ARGUMENT,
     "from_wallet_id"),
    ("reserved wallet id", dict(from_wallet_id="~settlement:CNY:1"),
     grpc.StatusCode.INVALID_ARGUMENT, "from_wallet_id"),
    ("insufficient funds", dict(amount_minor=1_001), grpc.StatusCode.FAILED_PRECONDITION,
     "amount_minor"),
]


@pytest.mark.parametrize("name,fields,code,field", BAD_TRANSFERS, ids=[b[0] for b in BAD_TRANSFERS])
async def test_bad_transfer_is_refused_and_changes_nothing(client, ledger_server, name, fields,
                                                           code, field):
    await client.create_wallet("bad-a", "CNY")
    await client.create_wallet("bad-b", "CNY")
    await client.deposit("bad-a", 1_000, "CNY")
    before = await snapshot(client, "bad-a", "bad-b")
    request = dict(idempotency_key="bad-key", from_wallet_id="bad-a", to_wallet_id="bad-b",
                   amount_minor=100, currency="CNY")
    request.update(fields)
    with pytest.raises(LedgerError) as err:
        await client._call(client._stub.Transfer, pb.TransferRequest(**request), retry=False)
    assert err.value.code is code, err.value
    assert err.value.field == field
    assert err.value.message.startswith(field + ":")
    assert await snapshot(client, "bad-a", "bad-b") == before
    # A refused request never consumed the key unless the refusal is a recorded decision.
    ok = await client.transfer("bad-a", "bad-b", 1, "CNY", idempotency_key="fresh-" + name
                               .replace(" ", "-"))
    assert ok.transfer.state == pb.TRANSFER_STATE_COMMITTED


async def test_amount_past_int64_overflows_balance_and_changes_nothing(client):
    await client.create_wallet("big", "CNY")
    await client.deposit("big", 2**63 - 1, "CNY")
    with pytest.raises(LedgerError) as err:
        await client.deposit("big", 1, "CNY")
    assert (err.value.code, err.value.field) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                 "amount_minor")
    assert (await client.get_wallet("big")).balance_minor == 2**63 - 1


async def test_batch_transfer_one_result_per_item(client):
    a, b = two_wallets(False, "batch")
    await client.create_wallet(a, "CNY")
    await client.create_wallet(b, "CNY")
    await client.deposit(a, 1_000, "CNY")
    items = [pb.TransferRequest(idempotency_key=f"b-{i}", from_wallet_id=a, to_wallet_id=b,
                                amount_minor=100, currency="CNY") for i in range(12)]
    items.append(pb.TransferRequest(idempotency_key="b-bad", from_wallet_id=a, to_wallet_id=b,
                                    amount_minor=0, currency="CNY"))
    response = await client.batch_transfer(items)
    statuses = [r.status for r in response.results]
    assert statuses[:10] == [pb.RESULT_STATUS_OK] * 10
    assert statuses[10:12] == [pb.RESULT_STATUS_INSUFFICIENT_FUNDS] * 2
    assert statuses[12] == pb.RESULT_STATUS_INVALID_AMOUNT
    assert response.results[12].field == "amount_minor"
    assert await snapshot(client, a, b) == {a: 0, b: 1_000}


async def test_oversized_batch_is_refused_whole(client):
    await client.create_wallet("ob-a", "CNY")
    items = [pb.TransferRequest(idempotency_key=f"o-{i}", from_wallet_id="ob-a",
                                to_wallet_id="ob-b", amount_minor=1, currency="CNY")
             for i in range(10_001)]
    with pytest.raises(LedgerError) as err:
        await client.batch_transfer(items)
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "transfers")


async def test_reads_of_unknown_things(client):
    with pytest.raises(LedgerError) as err:
        await client.get_wallet("nobody")
    assert err.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(LedgerError) as err:
        await client.get_transfer("t0001" + "0" * 24)
    assert err.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(LedgerError) as err:
        await client.get_transfer("not-an-id")
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "transfer_id")


async def test_books_sum_to_zero_per_currency(client, ledger_server):
    for i in range(6):
        await client.create_wallet(f"sum-{i}", "CNY")
        await client.deposit(f"sum-{i}", 1_000 + i, "CNY")
    for i in range(5):
        await client.transfer(f"sum-{i}", f"sum-{i + 1}", 300, "CNY")
    await client.withdraw("sum-5", 100, "CNY")
    owners = ledger_server.node.owners
    totals: dict[str, int] = {}
    for shard, owner in owners.items():
        for wallet in owner.state.wallets.values():
            totals[wallet.currency] = totals.get(wallet.currency, 0) + wallet.balance_minor
        # Money in transit: owed by this shard and not yet applied by the credit shard.
        for dest, items in owner.state.outbox.items():
            applied = owners[dest].state.inbox_applied.get(shard, 0)
            for seq, credit in items.items():
                if seq > applied:
                    totals[credit.currency] = totals.get(credit.currency, 0) + credit.amount_minor
    assert totals == {"CNY": 0}
