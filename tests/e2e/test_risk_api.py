"""Risk controls through the API, on the embedded default and on Cassandra + etcd, across a
failover: velocity limits (a wallet's own and the default), the device step-up check and
freezing, set through ``SetRiskLimits`` / ``ConfirmDevice`` / ``SetWalletFrozen``, shown by
``GetWallet``, enforced by the wallet's shard owner; then the node stops and a new owner
(another node on the same journal) takes every shard over, replays, and enforces exactly the
same: the same frozen wallet, the same confirmed device, and the debits counted before the
failover still count in the window. Bad input names its field and changes nothing."""

from __future__ import annotations


import grpc
import pytest

from clients import LedgerClient, LedgerRefused
from ledger import server
from tests.e2e.conftest import SHARDS, _start_cassandra_backend

HOUR = 3_600_000


async def _start(kind: str, request, tmp_path, keyspace, node: str):
    if kind == "embedded":
        return await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    return await _start_cassandra_backend(request, keyspace=keyspace, node_id=node)


async def refused(call) -> LedgerRefused:
    with pytest.raises(LedgerRefused) as err:
        await call
    return err.value


@pytest.mark.parametrize("kind", ["embedded", pytest.param("cassandra", marks=pytest.mark.real)])
async def test_risk_controls_hold_across_a_failover(kind, request, tmp_path):
    keyspace = None
    if kind != "embedded":  # both nodes serve one keyspace, the second after a failover
        region = request.getfixturevalue("local_cluster").regions[0]
        keyspace = await request.getfixturevalue("keyspaces").take({region: 1}, "risk")
    first = await _start(kind, request, tmp_path, keyspace, "node-a")
    try:
        async with LedgerClient(f"127.0.0.1:{first.port}", caller="tests",
                                retries=False) as c:
            for w in ("rk-alice", "rk-bob", "rk-merchant", "rk-thief"):
                await c.create_wallet(w, "CNY", idempotency_key="w-" + w)
                await c.deposit(w, 100_000, "CNY", idempotency_key="d-" + w)
            # The default: 3 debits and 100,000 per hour, step-up above 20,000.
            done = await c.set_risk_limits("", HOUR, 100_000, 3, 20_000, reason="policy v1")
            assert done.shards == SHARDS
            # The merchant is exempt from velocity limits, and follows the default step-up.
            own = await c.set_risk_limits("rk-merchant", 0, 0, 0, -1, reason="merchant")
            assert (own.wallet.risk.window_ms, own.wallet.risk.velocity_own,
                    own.wallet.risk.step_up_above_minor) == (0, True, 20_000)
            wallet = await c.get_wallet("rk-alice")
            assert (wallet.risk.window_ms, wallet.risk.max_count, wallet.risk.velocity_own) == \
                (HOUR, 3, False)
            # Two debits count in alice's window.
            await c.transfer("rk-alice", "rk-bob", 100, "CNY", idempotency_key="a1")
            await c.withdraw("rk-alice", 100, "CNY", idempotency_key="a2")
            assert (await c.get_wallet("rk-alice")).risk.used_count == 2
            # Step-up: a big transfer from a new device is refused, not recorded...
            error = await refused(c.transfer("rk-bob", "rk-alice", 30_000, "CNY",
                                             idempotency_key="big", device_id="bob-phone"))
            assert (error.code, error.status, error.field) == (
                grpc.StatusCode.FAILED_PRECONDITION, "RESULT_STATUS_STEP_UP_REQUIRED",
                "device_id")
            # ...and the same request passes once the device is confirmed.
            confirmed = await c.confirm_device("rk-bob", "bob-phone", reason="sms code")
            assert list(confirmed.risk.devices) == ["bob-phone"]
            passed = await c.transfer("rk-bob", "rk-alice", 30_000, "CNY",
                                      idempotency_key="big", device_id="bob-phone")
            assert not passed.replayed
            # A thief's wallet is frozen.
            await c.set_wallet_frozen("rk-thief", True, "account taken over")
            # Bad input names its field and changes nothing.
            for call, field in (
                    (c.set_risk_limits("rk-alice", 10, 0, 1, 0), "window_ms"),
                    (c.set_risk_limits("", -1, 0, 0, 0), "window_ms"),
                    (c.set_risk_limits("rk-alice", HOUR, 0, 0, 0), "max_amount_minor"),
                    (c.set_risk_limits("rk-alice", 0, 0, 0, -7), "step_up_above_minor"),
                    (c.confirm_device("rk-alice", ""), "device_id"),
                    (c.confirm_device("rk-alice", "bad device"), "device_id"),
                    (c.transfer("rk-alice", "rk-bob", 1, "CNY", device_id="x" * 200),
                     "device_id")):
                error = await refused(call)
                assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)
            missing = await refused(c.set_risk_limits("rk-nobody", HOUR, 0, 1, 0))
            assert (missing.code, missing.field) == (grpc.StatusCode.NOT_FOUND, "wallet_id")
            assert (await c.get_wallet("rk-alice")).risk.window_ms == HOUR
    finally:
        await first.close(grace_s=0.5)

    # Failover: another node takes every shard over and replays the journal.
    second = await _start(kind, request, tmp_path, keyspace, "node-b")
    try:
        async with LedgerClient(f"127.0.0.1:{second.port}", caller="tests",
                                retries=False) as c:
            alice = await c.get_wallet("rk-alice")
            assert (alice.risk.used_count, alice.risk.used_amount_minor) == (2, 200)
            await c.transfer("rk-alice", "rk-bob", 100, "CNY", idempotency_key="a3")
            error = await refused(c.transfer("rk-alice", "rk-bob", 100, "CNY",
                                             idempotency_key="a4"))
            assert (error.status, error.field) == ("RESULT_STATUS_VELOCITY_LIMIT_EXCEEDED",
                                                   "from_wallet_id")
            again = await refused(c.transfer("rk-alice", "rk-bob", 100, "CNY",
                                             idempotency_key="a4"))
            assert again.status == "RESULT_STATUS_VELOCITY_LIMIT_EXCEEDED"  # recorded
            for i in range(5):  # the merchant has no velocity limit
                await c.transfer("rk-merchant", "rk-bob", 10, "CNY", idempotency_key=f"m{i}")
            # The device confirmed before the failover is still confirmed; others are not.
            await c.transfer("rk-bob", "rk-alice", 25_000, "CNY", idempotency_key="big2",
                             device_id="bob-phone")
            other = await refused(c.transfer("rk-bob", "rk-alice", 25_000, "CNY",
                                             idempotency_key="big3", device_id="new-phone"))
            assert other.status == "RESULT_STATUS_STEP_UP_REQUIRED"
            frozen = await refused(c.transfer("rk-thief", "rk-bob", 1, "CNY"))
            assert frozen.status == "RESULT_STATUS_WALLET_FROZEN"
            balances = {w: (await c.get_wallet(w)).balance_minor
                        for w in ("rk-alice", "rk-bob", "rk-merchant", "rk-thief")}
            assert balances == {"rk-alice": 100_000 - 300 + 55_000,
                                "rk-bob": 100_000 + 200 - 55_000 + 50,
                                "rk-merchant": 100_000 - 50, "rk-thief": 100_000}
    finally:
        await second.close(grace_s=0.5)
        if kind != "embedded":
            await request.getfixturevalue("keyspaces").give_back(keyspace)


async def test_no_personal_data_or_secret_reaches_the_logs(tmp_path, caplog):
    """Memos, reasons, device ids and idempotency keys (what a caller may fill with personal
    data) never appear in the server's log, at any level, refusals and failures included."""
    import logging
    marker = "PII-7f3a"
    caplog.set_level(logging.DEBUG)
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        async with LedgerClient(f"127.0.0.1:{running.port}", caller="tests",
                                retries=False) as c:
            for w in ("lg-a", "lg-b"):
                await c.create_wallet(w, "CNY", idempotency_key=f"{marker}-w-{w}")
            await c.deposit("lg-a", 1_000, "CNY", memo=f"{marker} salary",
                            idempotency_key=f"{marker}-d")
            await c.transfer("lg-a", "lg-b", 10, "CNY", memo=f"{marker} rent",
                             idempotency_key=f"{marker}-t", device_id=f"{marker}-phone")
            await c.set_risk_limits("lg-a", HOUR, 0, 1, 5, reason=f"{marker} reason")
            await c.confirm_device("lg-a", f"{marker}-phone", reason=f"{marker} sms")
            await c.set_wallet_frozen("lg-b", True, reason=f"{marker} stolen")
            for call in (c.transfer("lg-a", "lg-b", 10, "CNY", memo=f"{marker} again",
                                    idempotency_key=f"{marker}-t2"),
                         c.transfer("lg-b", "lg-a", 1, "CNY", memo=f"{marker} frozen"),
                         c.transfer("lg-a", "lg-b", 1, "CNY", memo=marker * 200)):
                await refused(call)
    finally:
        await running.close(grace_s=0.5)
    assert caplog.records, "the server logged nothing: the test would prove nothing"
    leaked = [r.getMessage() for r in caplog.records if marker in r.getMessage()
              or marker in (r.exc_text or "")]
    assert not leaked


async def test_a_wallet_read_on_another_node_carries_its_risk_controls(tmp_path):
    """GetWallet answered by the owner on another node: the answer (wallet and risk view)
    crosses the node-to-node transport (its codec) intact."""
    from ledger.api.shard_service import GrpcShardTransport
    from ledger.core.model import GetWallet
    from shard_router import shard_of

    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    transport = GrpcShardTransport()
    try:
        async with LedgerClient(f"127.0.0.1:{running.port}", caller="tests",
                                retries=False) as c:
            await c.create_wallet("xn-alice", "CNY", idempotency_key="w-xn")
            await c.set_risk_limits("xn-alice", HOUR, 500, 2, 100, reason="test")
            await c.confirm_device("xn-alice", "phone-1")
        outcome = (await transport.execute(
            f"127.0.0.1:{running.port}", shard_of("xn-alice", SHARDS),
            [GetWallet("xn-alice", True, 1)], False))[0]
        wallet, risk = outcome.value
        assert wallet.wallet_id == "xn-alice"
        assert (risk.limits.window_ms, risk.limits.max_count, risk.limits.step_up_above_minor,
                risk.velocity_own, risk.devices) == (HOUR, 2, 100, True, ("phone-1",))
    finally:
        await transport.close()
        await running.close(grace_s=0.5)
