"""Idempotency keys that left owner memory, through the API on both stores (issue 9, item 3).

A ledger whose owners keep key records for 0.3 s only: a transfer's key is spilled (its record
then lives in the store, its key in the owner's filters), and a retry through gRPC is still
answered with the recorded outcome, a reuse with another payload is still refused naming the
field, and the money moved once. On the embedded store and on real Cassandra + etcd.
"""

from __future__ import annotations

import asyncio

import pytest

from clients import LedgerClient, LedgerRefused
from ledger import server
from tests.e2e.conftest import SHARDS, _start_cassandra_backend, close_server

# The owners' memory window in these tests (ms): keys spill within about a sweep (1 s).
MEMORY_MS = 300
# How long a key may take to be spilled (s): a few sweeps on a loaded machine.
SPILL_WAIT_S = 30.0


@pytest.fixture(params=["embedded", pytest.param("cassandra", marks=pytest.mark.real)])
async def spilling_server(request, tmp_path):
    if request.param == "embedded":
        running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS,
                                         memory_ms=MEMORY_MS)
    else:
        running = await _start_cassandra_backend(request, memory_ms=MEMORY_MS)
    try:
        yield running
    finally:
        await close_server(request, running)


async def spilled(running, shard: int, key: str) -> None:
    """Wait until the owner of ``shard`` no longer holds ``key`` in memory but in its filters."""
    loop = asyncio.get_running_loop()
    until = loop.time() + SPILL_WAIT_S
    while True:
        owner = running.node.owners.get(shard)
        state = owner.state if owner is not None else None
        if (state is not None and ("tests", key) not in state.idempotency
                and state.spilled.maybe("tests", key)):
            return
        assert loop.time() < until, f"key {key} not spilled within {SPILL_WAIT_S} s"
        await asyncio.sleep(0.05)


async def test_a_retry_after_the_key_left_memory_gets_the_recorded_outcome(spilling_server):
    async with LedgerClient(f"127.0.0.1:{spilling_server.port}", caller="tests",
                            retries=False) as client:
        for wallet in ("sa", "sb"):
            await client.create_wallet(wallet, "CNY", idempotency_key="c-" + wallet)
        await client.deposit("sa", 1_000, "CNY", idempotency_key="d-sa")
        first = await client.transfer("sa", "sb", 70, "CNY", idempotency_key="spill-1")
        debit_shard = int(first.transfer.transfer_id[1:5], 16)
        await spilled(spilling_server, debit_shard, "spill-1")
        again = await client.transfer("sa", "sb", 70, "CNY", idempotency_key="spill-1")
        assert again.replayed and again.transfer.transfer_id == first.transfer.transfer_id
        with pytest.raises(LedgerRefused) as refused:
            await client.transfer("sa", "sb", 71, "CNY", idempotency_key="spill-1")
        assert refused.value.status == "RESULT_STATUS_IDEMPOTENCY_KEY_REUSED"
        assert refused.value.field == "amount_minor"
        assert (await client.get_wallet("sa")).balance_minor == 930
        assert (await client.get_wallet("sb")).balance_minor == 70
