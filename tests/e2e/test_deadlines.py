"""The caller's gRPC deadline travels down to the router and the shard owners (issue 8).

Against the embedded ledger, with one shard owner blocked in its journal append:

- a call with a short deadline ends DEADLINE_EXCEEDED in about that deadline; the command
  already decided before it (its batch was being appended) is still reported truthfully on
  retry (committed, replayed), and the command that was still queued at its deadline was never
  started (its retry executes it for the first time);
- a call without a deadline gets the server's default deadline
  (``coordinator.constants.REQUEST_DEADLINE_DEFAULT_S``): the server ends it
  DEADLINE_EXCEEDED (may have executed: retry with the same key) in about that default,
  instead of waiting for the owner.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ledger import server
from ledger.api import servicer
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

SHARDS = 4
CALLER = "tests"
METADATA = ((servicer.CALLER_METADATA, CALLER),)
DEADLINE_S = 0.5


class AppendGate:
    """Blocks journal appends of one shard until released; says when one is blocked."""

    def __init__(self, store, shard: int) -> None:
        self._append = store.append
        self._shard = shard
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        store.append = self.append

    async def append(self, shard: int, *args, **kwargs):
        if shard == self._shard and not self.release.is_set():
            self.entered.set()
            await self.release.wait()
        return await self._append(shard, *args, **kwargs)


@pytest.fixture
async def ledger_stub(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, pb_grpc.LedgerServiceStub(channel)
    finally:
        await channel.close()
        await running.close(grace_s=0.5)


def key_on(running, shard: int, prefix: str) -> str:
    """An idempotency key claimed on ``shard`` itself: its deposit is one command there."""
    return next(f"{prefix}-{n}" for n in range(10_000)
                if running.coordinator.key_shard(CALLER, f"{prefix}-{n}") == shard)


def deposit(key: str, wallet_id: str, amount_minor: int) -> pb.DepositRequest:
    return pb.DepositRequest(idempotency_key=key, wallet_id=wallet_id,
                             amount_minor=amount_minor, currency="CNY")


async def test_short_deadline_against_a_blocked_owner(ledger_stub):
    running, stub = ledger_stub
    await stub.CreateWallet(pb.CreateWalletRequest(idempotency_key="w", wallet_id="alice",
                                                   currency="CNY"), metadata=METADATA)
    shard = running.coordinator.shard_of("alice")
    first, second = key_on(running, shard, "first"), key_on(running, shard, "second")
    gate = AppendGate(running.store, shard)

    started = time.monotonic()
    call = asyncio.ensure_future(stub.Deposit(deposit(first, "alice", 100), metadata=METADATA,
                                              timeout=DEADLINE_S))
    await gate.entered.wait()  # the first deposit is decided; its append hangs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < DEADLINE_S + 1.0

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # queued behind the hanging append
        await stub.Deposit(deposit(second, "alice", 10), metadata=METADATA, timeout=DEADLINE_S)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < DEADLINE_S + 1.0

    gate.release.set()
    # Queued behind the second deposit on the same owner: once it answers, the owner has
    # passed the second deposit by (its deadline was over: not started).
    wallet = (await stub.GetWallet(pb.GetWalletRequest(wallet_id="alice"),
                                   metadata=METADATA, timeout=10)).wallet
    assert wallet.balance_minor == 100

    again = await stub.Deposit(deposit(first, "alice", 100), metadata=METADATA, timeout=10)
    assert again.replayed and again.transfer.amount_minor == 100   # decided: reported as is
    fresh = await stub.Deposit(deposit(second, "alice", 10), metadata=METADATA, timeout=10)
    assert not fresh.replayed                                      # never started before
    wallet = (await stub.GetWallet(pb.GetWalletRequest(wallet_id="alice"),
                                   metadata=METADATA, timeout=10)).wallet
    assert wallet.balance_minor == 110


async def test_no_deadline_gets_the_default_deadline(ledger_stub, monkeypatch):
    running, stub = ledger_stub
    monkeypatch.setattr(servicer, "REQUEST_DEADLINE_DEFAULT_S", DEADLINE_S)
    await stub.CreateWallet(pb.CreateWalletRequest(idempotency_key="w", wallet_id="bob",
                                                   currency="CNY"), metadata=METADATA)
    shard = running.coordinator.shard_of("bob")
    gate = AppendGate(running.store, shard)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            # No timeout from the caller; the test's own bound only guards against a hang.
            await asyncio.wait_for(stub.Deposit(deposit(key_on(running, shard, "k"), "bob", 5),
                                                metadata=METADATA), 30)
        elapsed_s = time.monotonic() - started
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert DEADLINE_S * 0.9 <= elapsed_s < DEADLINE_S + 1.0
        assert gate.entered.is_set()
    finally:
        gate.release.set()
