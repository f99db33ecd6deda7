"""Assembles a serving process: store, ownership, node, coordinator, gRPC server.

``ledgerd dev`` uses the embedded default (SQLite file, in-process ownership of every shard);
``ledgerd node`` uses Cassandra and etcd. Same core, same owners, same API; only adapters differ.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from coordinator import Coordinator
from ledger.api.servicer import LedgerServicer
from ledger.core.constants import IDEMPOTENCY_RETENTION_MS
from ledger.api.shard_service import GrpcShardTransport, ShardOwnerServicer
from ledger.ledgerpb import ledger_pb2, shard_pb2, ledger_pb2_grpc, shard_pb2_grpc
from ledger.node import Node
from ledger.store.port import JournalStore

log = logging.getLogger("ledger.server")

# The owners keep every wallet, idempotency record and recent transfer in memory: millions of
# long-lived objects. With CPython's default thresholds a full collection walks all of them
# every few thousand allocations, and throughput fell by half within seconds of load
# (measured: 5000-transfer batches went from 4.5 s to 11.9 s). Young collections stay
# frequent; full ones become rare, and what exists at start-up is frozen out of them.
GC_THRESHOLDS = (100_000, 50, 1_000)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)

# Messages up to this size are accepted (a full BatchTransfer of 10,000 items fits).
GRPC_MESSAGE_BYTES_MAX = 16 * 1024 * 1024
SERVICE_NAMES = (
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    shard_pb2.DESCRIPTOR.services_by_name["ShardOwnerService"].full_name,
)


@dataclass
class Running:
    """A started ledger process; ``close()`` shuts it down in order."""

    server: grpc.aio.Server
    node: Node
    store: JournalStore
    coordinator: Coordinator
    port: int
    health: HealthServicer
    closers: list = field(default_factory=list)

    async def close(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.node.close()
        for closer in self.closers:
            await closer()
        await self.store.close()


async def start(store: JournalStore, ownership, shard_count: int, host: str, port: int,
                serve_timeout_s: float = 60.0, shards_min: int = 0,
                retention_ms: int = IDEMPOTENCY_RETENTION_MS) -> Running:
    """Start node and gRPC server; return once the node serves its shards (or timeout)."""
    transport = GrpcShardTransport()
    node = Node(store, ownership, transport, idempotency_retention_ms=retention_ms)
    coordinator = Coordinator(node.router, store, shard_count)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    ])
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(coordinator), server)
    shard_pb2_grpc.add_ShardOwnerServiceServicer_to_server(ShardOwnerServicer(node), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    for name in ("", SERVICE_NAMES[0]):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    started = time.monotonic()
    await node.start()
    tune_gc()
    if await node.wait_serving(shards_min, serve_timeout_s):
        log.info("serving %d shards after %.2f s", len(node.owners), time.monotonic() - started)
    else:
        log.warning("serving %d shards (%d expected) after %.0f s", len(node.owners),
                    shards_min, serve_timeout_s)
    gc.collect()
    gc.freeze()  # the replayed state is long-lived: keep it out of future collections
    for name in ("", SERVICE_NAMES[0]):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, node, store, coordinator, bound, health, [transport.close])


async def start_dev(data_dir: str | Path, host: str = "127.0.0.1", port: int = 50051,
                    shard_count: int = 256,
                    retention_ms: int = IDEMPOTENCY_RETENTION_MS) -> Running:
    """The embedded default: one process, SQLite file, this process owns every shard."""
    from ledger.store.sqlite import SqliteStore
    from shard_router.local import LocalOwnership

    store = await SqliteStore.open(Path(data_dir) / "ledger.sqlite3")
    # Epochs must grow across restarts; the start time in ms does (a clock set back makes the
    # store refuse the stale epoch, loudly, rather than let two writers interleave).
    ownership = LocalOwnership(shard_count, epoch=time.time_ns() // 1_000_000)
    return await start(store, ownership, shard_count, host, port, shards_min=shard_count,
                       retention_ms=retention_ms)


async def run_until_signalled(running: Running) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.close()
