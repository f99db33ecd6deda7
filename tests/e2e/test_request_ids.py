"""A request id travels from the client to every node that handles the request, and is on
every log record written for it; ``ledgerd --log-format json`` writes one JSON object per
record with it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys

import grpc

from ledger import server
from ledger.api.shard_service import GrpcShardTransport
from ledger.core.model import GetWallet
from ledger.logs import RequestContext
from ledger.runtime.requests import REQUEST_ID
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

SHARDS = 4
TIMEOUT_S = 10.0


def records_of(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "request_id", "") == request_id]


async def test_the_callers_id_is_on_the_records_of_every_node(tmp_path, caplog):
    caplog.handler.addFilter(RequestContext("test"))
    caplog.set_level(logging.DEBUG, logger="ledger.rpc")
    first = await server.start_dev(tmp_path / "a", port=0, shard_count=SHARDS)
    second = await server.start_dev(tmp_path / "b", port=0, shard_count=SHARDS)
    transport = GrpcShardTransport()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            with_id = (("ledger-request-id", "req-from-client"),)
            await pb_grpc.LedgerServiceStub(ch).CreateWallet(pb.CreateWalletRequest(
                idempotency_key="w", wallet_id="rid", currency="CNY"), metadata=with_id,
                timeout=TIMEOUT_S)
            # Without one, the first node makes one: still an id on the record.
            await pb_grpc.LedgerServiceStub(ch).GetWallet(pb.GetWalletRequest(
                wallet_id="rid"), timeout=TIMEOUT_S)
        mine = records_of(caplog, "req-from-client")
        assert [r.getMessage().split()[0] for r in mine] == [
            "/ledger.v1.LedgerService/CreateWallet"]
        made = [r for r in caplog.records if r.name == "ledger.rpc"
                and "GetWallet" in r.getMessage()]
        assert made and re.fullmatch(r"[0-9a-f]{16}", made[0].request_id)

        # A node's call to another node carries the id of the request it serves.
        REQUEST_ID.set("req-hop")
        outcome = (await transport.execute(f"127.0.0.1:{second.port}", 0,
                                           [GetWallet("nobody")], False,
                                           asyncio.get_running_loop().time() + 5))[0]
        assert outcome.field == "wallet_id"
        hop = records_of(caplog, "req-hop")
        assert any(r.getMessage().startswith("/ledger.v1.ShardOwnerService/Execute OK")
                   for r in hop), [r.getMessage() for r in hop]
    finally:
        REQUEST_ID.set("")
        await transport.close()
        await second.close()
        await first.close()


async def test_json_logs_carry_the_request_id(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", "0", "--shards",
        str(SHARDS), "--data-dir", str(tmp_path), "--metrics-port", "0", "--log-format",
        "json", "--log-level", "DEBUG", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        port = int(re.search(rb"serving ledger\.v1 on \S+:(\d+)", line).group(1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await pb_grpc.LedgerServiceStub(ch).CreateWallet(pb.CreateWalletRequest(
                idempotency_key="w", wallet_id="jl", currency="CNY"),
                metadata=(("ledger-request-id", "req-json"),), timeout=TIMEOUT_S)
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    objects = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    assert objects, err.decode()[-2000:]
    assert all({"time", "level", "logger", "message", "request_id"} <= set(o) for o in objects)
    call = [o for o in objects if o["request_id"] == "req-json"]
    assert call and call[0]["logger"] == "ledger.rpc" and "CreateWallet OK" in call[0]["message"]
