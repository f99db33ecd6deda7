"""``/metrics`` of a running ledger, scraped over HTTP as Prometheus does: every family the
operators' dashboards use is there, and the ones that count work move under traffic (calls by
method and code, per-shard appends and commands, group-commit sizes, append times,
idempotency records, takeovers, store errors)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from ledger import server
from ledger.runtime import failpoints
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc
from shard_router import shard_of

SHARDS = 8
CALL_TIMEOUT_S = 10.0

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
async def node(tmp_path):
    takeovers = REGISTRY.get_sample_value("ledger_takeovers_total") or 0.0
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    httpd, thread = start_http_server(0, addr="127.0.0.1")
    try:
        yield running, httpd.server_port, takeovers
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
        await running.close()


async def test_the_families_are_there_and_move_under_traffic(node):
    running, port, takeovers_before = node
    before = await asyncio.to_thread(scrape, port)
    # Every shard served, with its epoch; the takeovers were counted and timed.
    owned = {dict(k)["shard"]: v for k, v in series(before, "ledger_shard_owned").items()
             if dict(k)["node"] == "dev"}
    assert owned == {str(s): 1.0 for s in range(SHARDS)}
    assert all(v > 0 for k, v in series(before, "ledger_shard_epoch").items()
               if dict(k)["node"] == "dev")
    assert value(before, "ledger_takeovers_total") >= takeovers_before + SHARDS
    assert value(before, "ledger_takeover_duration_seconds_count") >= SHARDS
    for family in ("ledger_shard_queue_commands", "ledger_shard_outbox_credits",
                   "ledger_shard_credit_lag_seconds", "ledger_shard_idempotency_records",
                   "ledger_shard_appends_total", "ledger_shard_commands_total",
                   "ledger_shard_append_seconds_total"):
        assert len([k for k in series(before, family) if dict(k)["node"] == "dev"]) == SHARDS

    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = pb_grpc.LedgerServiceStub(ch)
        for w in ("ma", "mb"):
            await stub.CreateWallet(pb.CreateWalletRequest(
                idempotency_key="w-" + w, wallet_id=w, currency="CNY"), timeout=CALL_TIMEOUT_S)
        await stub.Deposit(pb.DepositRequest(idempotency_key="d", wallet_id="ma",
                                             amount_minor=500, currency="CNY"),
                           timeout=CALL_TIMEOUT_S)
        await stub.Transfer(pb.TransferRequest(
            idempotency_key="t1", from_wallet_id="ma", to_wallet_id="mb", amount_minor=100,
            currency="CNY"), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Transfer(pb.TransferRequest(
                idempotency_key="t2", from_wallet_id="ma", to_wallet_id="mb",
                amount_minor=10**6, currency="CNY"), timeout=CALL_TIMEOUT_S)
        refusal = refused.value.code().name
        # A store failure while the process lives: counted by operation and kind.
        failpoints.arm("owner.append_unavailable")
        try:
            try:
                await stub.Deposit(pb.DepositRequest(idempotency_key="d2", wallet_id="ma",
                                                     amount_minor=5, currency="CNY"),
                                   timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            failpoints.disarm()

    after = await asyncio.to_thread(scrape, port)
    transfer = {"grpc_service": "ledger.v1.LedgerService", "grpc_method": "Transfer"}
    assert value(after, "ledger_grpc_server_handled_total", **transfer, grpc_code="OK") == \
        value(before, "ledger_grpc_server_handled_total", **transfer, grpc_code="OK") + 1
    assert value(after, "ledger_grpc_server_handled_total", **transfer, grpc_code=refusal) == \
        value(before, "ledger_grpc_server_handled_total", **transfer, grpc_code=refusal) + 1
    assert value(after, "ledger_grpc_server_handling_seconds_count", **transfer) == \
        value(before, "ledger_grpc_server_handling_seconds_count", **transfer) + 2
    assert value(after, "ledger_grpc_server_handling_seconds_sum", **transfer) > \
        value(before, "ledger_grpc_server_handling_seconds_sum", **transfer)
    shard = {"node": "dev", "shard": str(shard_of("ma", SHARDS))}
    for family in ("ledger_shard_appends_total", "ledger_shard_commands_total",
                   "ledger_shard_append_seconds_total"):
        assert value(after, family, **shard) > value(before, family, **shard), family
    assert value(after, "ledger_shard_idempotency_records", **shard) > \
        value(before, "ledger_shard_idempotency_records", **shard)
    for family in ("ledger_group_commit_commands_count", "ledger_append_duration_seconds_count"):
        assert value(after, family) > value(before, family), family
    assert value(after, "ledger_store_errors_total", op="append", kind="StoreUnavailable") \
        == value(before, "ledger_store_errors_total", op="append", kind="StoreUnavailable") + 1
