"""OpenTelemetry traces: a call served is a span in the caller's trace (W3C ``traceparent``),
a node's call to another node carries its span's context, and with a collector configured
``ledgerd`` exports the spans over OTLP/gRPC (to a collector stand-in in this test that
records what it receives)."""

from __future__ import annotations

import asyncio
import re
import sys

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ledger import server, tracing
from ledger.api.shard_service import GrpcShardTransport
from ledger.core.model import GetWallet
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

SHARDS = 4
TIMEOUT_S = 10.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE}-{PARENT}-01"),)


async def test_calls_join_the_callers_trace_and_node_calls_carry_it(tmp_path):
    exporter = InMemorySpanExporter()
    tracing.configure(None, "test", exporter)
    first = await server.start_dev(tmp_path / "a", port=0, shard_count=SHARDS)
    second = await server.start_dev(tmp_path / "b", port=0, shard_count=SHARDS)
    transport = GrpcShardTransport()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            await pb_grpc.LedgerServiceStub(ch).CreateWallet(pb.CreateWalletRequest(
                idempotency_key="w", wallet_id="tr", currency="CNY"),
                metadata=TRACEPARENT + (("ledger-request-id", "req-traced"),),
                timeout=TIMEOUT_S)
        served = [s for s in exporter.get_finished_spans()
                  if s.name == "/ledger.v1.LedgerService/CreateWallet"]
        assert len(served) == 1 and served[0].kind is SpanKind.SERVER
        assert format(served[0].context.trace_id, "032x") == TRACE
        assert format(served[0].parent.span_id, "016x") == PARENT
        assert served[0].attributes["ledger.request_id"] == "req-traced"
        assert served[0].attributes["rpc.grpc.status_code"] == "OK"

        await transport.execute(f"127.0.0.1:{second.port}", 0, [GetWallet("nobody")], False,
                                asyncio.get_running_loop().time() + 5)
        spans = exporter.get_finished_spans()
        out = [s for s in spans if s.kind is SpanKind.CLIENT]
        into = [s for s in spans if s.kind is SpanKind.SERVER
                and s.name == "/ledger.v1.ShardOwnerService/Execute"]
        assert len(out) == 1 and len(into) == 1
        assert into[0].context.trace_id == out[0].context.trace_id
        assert into[0].parent.span_id == out[0].context.span_id
    finally:
        await transport.close()
        await second.close()
        await first.close()
        tracing.disable()


class Collector(otlp_grpc.TraceServiceServicer):
    """Stands in for an OpenTelemetry collector: keeps the spans it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.arrived = asyncio.Event()

    async def Export(self, request, context):
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.arrived.set()
        return otlp.ExportTraceServiceResponse()


async def test_ledgerd_exports_spans_to_a_configured_collector(tmp_path):
    collector = Collector()
    receiver = grpc.aio.server()
    otlp_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", "0", "--shards",
        str(SHARDS), "--data-dir", str(tmp_path), "--metrics-port", "0", "--otlp-endpoint",
        f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"OTEL_BSP_SCHEDULE_DELAY": "100", "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        ledger_port = int(re.search(rb"serving ledger\.v1 on \S+:(\d+)", line).group(1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger_port}") as ch:
            try:
                await pb_grpc.LedgerServiceStub(ch).GetWallet(
                    pb.GetWalletRequest(wallet_id="nobody"), metadata=TRACEPARENT,
                    timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.NOT_FOUND
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        while not any(s.trace_id.hex() == TRACE for s in collector.spans):
            assert loop.time() < give_up, "no span of the traced call reached the collector"
            collector.arrived.clear()
            try:
                await asyncio.wait_for(collector.arrived.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        proc.terminate()
        await proc.communicate()
        await receiver.stop(None)
    span = next(s for s in collector.spans if s.trace_id.hex() == TRACE)
    assert span.name == "/ledger.v1.LedgerService/GetWallet"
    assert span.parent_span_id.hex() == PARENT
    codes = {a.key: a.value.string_value for a in span.attributes}
    assert codes["rpc.grpc.status_code"] == "NOT_FOUND"
