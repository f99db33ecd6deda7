"""Assembles a serving process: store, ownership, node, coordinator, gRPC server.

``ledgerd dev`` uses the embedded default (SQLite file, in-process ownership of every shard);
``ledgerd node`` uses Cassandra and etcd. Same core, same owners, same API; only adapters differ.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from coordinator import Coordinator
from coordinator.changes import ChangeFeed
from coordinator.envelopes import EnvelopeRules, Envelopes
from ledger import constants as K
from ledger import metrics
from ledger.api.envelopes import RedEnvelopeServicer
from ledger.api.errors import ErrorBoundary
from ledger.api.servicer import LedgerServicer
from ledger.core.constants import IDEMPOTENCY_RETENTION_MS
from ledger.api.shard_service import GrpcShardTransport, ShardOwnerServicer
from ledgerpb import ledger_pb2, shard_pb2, ledger_pb2_grpc, shard_pb2_grpc
from ledger.node import Node
from ledger.security import certs
from ledger.security.authz import Authorization, Authorizer
from ledger.security.tls import TlsFiles, is_loopback, server_credentials
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

# Messages up to this size are sent and accepted (the largest BatchTransfer fits; see
# ledger/constants.py). The node-to-node channel uses the same limit.
GRPC_MESSAGE_BYTES_MAX = K.GRPC_MESSAGE_BYTES_MAX
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind too and
    # the kernel would spread connections over both. Without it, a taken port fails to bind.
    ("grpc.so_reuseport", 0),
)
# The red-envelope rules of a server started without others (``ledgerd``'s defaults).
DEFAULT_ENVELOPE_RULES = EnvelopeRules()
# The exclusive lock of a ``ledgerd dev`` data directory (holds the pid of its holder).
DATA_DIR_LOCK_FILE = "ledgerd.lock"


class StartupRefused(Exception):
    """The server must not start; the message says why, for an operator."""


class PortInUse(StartupRefused):
    pass


class DataDirLocked(StartupRefused):
    pass


def _why_not_bound(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on (gRPC only says that it failed)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    reasons = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (f"port {port} is already in use (another ledgerd, or another "
                            f"program, listens on it); stop it or choose another --port")
                reasons.append(exc.strerror or str(exc))
    return "; ".join(reasons) or "gRPC could not bind it"


def lock_data_dir(data_dir: str | Path):
    """Take the exclusive lock of a data directory for the life of this process.

    Returns the open lock file: closing it (or the process ending, however it ends) releases
    the lock. Raises ``DataDirLocked`` naming the directory and the holder's pid.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / DATA_DIR_LOCK_FILE, "a+")  # not inherited by child processes
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StartupRefused(f"cannot lock data directory {directory}: {exc}") from exc
        by = f"ledgerd pid {holder}" if holder.isdigit() else "another ledgerd"
        raise DataDirLocked(f"data directory {directory} is in use by {by}; stop it or "
                            f"choose another --data-dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


SERVICE_NAMES = (
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["RedEnvelopeService"].full_name,
    shard_pb2.DESCRIPTOR.services_by_name["ShardOwnerService"].full_name,
)
# The services of the public API (proto/ledgerpb/ledger.proto: LedgerService and
# RedEnvelopeService), guarded by ErrorBoundary; the health service reports on each.
PUBLIC_SERVICE_NAMES = tuple(service.full_name for service in
                             ledger_pb2.DESCRIPTOR.services_by_name.values())


@dataclass
class Running:
    """A started ledger process; ``close()`` shuts it down in order."""

    server: grpc.aio.Server
    node: Node
    store: JournalStore
    coordinator: Coordinator
    envelopes: Envelopes
    port: int
    health: HealthServicer
    closers: list = field(default_factory=list)
    # Released after the store is closed (the data directory's lock).
    releases: list = field(default_factory=list)

    async def close(self, grace_s: float = 2.0) -> None:
        try:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
            await self.node.close()
            for closer in self.closers:
                await closer()
            await self.store.close()
        finally:
            for release in self.releases:
                release()


@dataclass(frozen=True)
class Security:
    """How a server admits callers. ``tls`` None: plaintext, loopback only (unless
    ``insecure`` says the operator accepts plaintext elsewhere), no authorization, callers
    named by the ``ledger-caller`` header. With ``tls``: mutual TLS on the port and on calls to
    other nodes, callers named by their certificate, every call checked against the policy
    (``policy``: a file, or ``ledger.security.authz.DEFAULT_POLICY``)."""

    tls: TlsFiles | None = None
    policy: str | None = None
    insecure: bool = False


PLAINTEXT = Security()


def _check_security(host: str, security: Security) -> None:
    if security.tls is None and not security.insecure and not is_loopback(host):
        raise StartupRefused(
            f"{host} is not a loopback address and no TLS is configured (--tls-dir): every "
            f"caller on the network could move money; give --tls-dir, or "
            f"--insecure-plaintext to accept that explicitly")
    if security.tls is None and security.policy:
        raise StartupRefused("--policy needs TLS (--tls-dir): without certificates there is "
                             "no identity to authorize")


async def start(store: JournalStore, ownership, shard_count: int, host: str, port: int,
                serve_timeout_s: float = 60.0, shards_min: int = 0,
                retention_ms: int = IDEMPOTENCY_RETENTION_MS,
                memory_ms: int = K.IDEMPOTENCY_MEMORY_MS,
                envelope_rules: EnvelopeRules = DEFAULT_ENVELOPE_RULES,
                security: Security = PLAINTEXT, log_transitions: bool = True) -> Running:
    """Start node and gRPC server; return once the node serves its shards (or timeout).

    ``log_transitions``: a line at INFO per shard taken over or given up (False: at DEBUG,
    for the embedded default, whose one node takes every shard at start and gives every one
    up at stop)."""
    _check_security(host, security)
    loop = asyncio.get_running_loop()
    # The node's certificate as the audit trail records it: (principal, fingerprint, expiry).
    cert: list[tuple[str | None, str, str]] = []

    def cert_rotated(pem: bytes) -> None:  # a gRPC thread: hand over to the event loop
        cert[0] = certs.describe(pem)
        who, fingerprint, until = cert[0]
        loop.call_soon_threadsafe(node.note_admin, "CertificateRotated", who or "?",
                                  f"sha256:{fingerprint} valid until {until}")

    try:
        authorizer = (Authorizer(security.policy) if security.tls is not None else None)
        if security.tls is not None:
            cert.append(certs.describe(security.tls.cert.read_bytes()))
        credentials = (server_credentials(security.tls, cert_rotated)
                       if security.tls is not None else None)
        transport = GrpcShardTransport(security.tls)
    except (OSError, ValueError) as exc:
        raise StartupRefused(f"TLS or policy files unusable: {exc}") from None
    node = Node(store, ownership, transport, principal=cert[0][0] if cert else None,
                log_transitions=log_transitions,
                idempotency_retention_ms=retention_ms, idempotency_memory_ms=memory_ms)
    metrics.watch_node(node)
    if authorizer is not None:
        def enforced() -> str:
            who, fingerprint, until = cert[0]
            return (f"policy {authorizer.policy.name} sha256:{authorizer.digest} "
                    f"({authorizer.source}); certificate {who} sha256:{fingerprint} "
                    f"valid until {until}")

        node.security_facts = enforced
        authorizer.on_reload = lambda: node.note_admin(
            "PolicyReloaded", authorizer.policy.name,
            f"sha256:{authorizer.digest} ({authorizer.source})")
    coordinator = Coordinator(node.router, store, shard_count)
    # The store's envelope views (get_envelope, list_grabs, list_envelopes_sent,
    # list_grabs_received) answer what the owners no longer hold, and the per-wallet lists.
    envelopes = Envelopes(coordinator, node.router, store, shard_count,
                          envelope_rules)
    # Public calls answer failures (store down, a bug) with a fixed message and a reference,
    # never the exception's text; the node-to-node service keeps its own errors.
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorBoundary(PUBLIC_SERVICE_NAMES)]
    if authorizer is not None:
        interceptors.insert(0, Authorization(authorizer))
    interceptors.insert(0, metrics.RpcMetrics())  # first: it sees every call's final code
    server = grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=interceptors)
    changes = ChangeFeed(node.router, store, node.router.local_owner)
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        LedgerServicer(coordinator, authorizer, changes, shard_count), server)
    ledger_pb2_grpc.add_RedEnvelopeServiceServicer_to_server(RedEnvelopeServicer(envelopes),
                                                             server)
    shard_pb2_grpc.add_ShardOwnerServiceServicer_to_server(ShardOwnerServicer(node), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                         reflection.SERVICE_NAME), server)
    try:
        bound = (server.add_secure_port(f"{host}:{port}", credentials)
                 if credentials is not None else server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        bound = 0
    if bound == 0:
        await server.stop(None)
        raise PortInUse(f"cannot listen on {host}:{port}: {_why_not_bound(host, port)}")
    for name in ("",) + PUBLIC_SERVICE_NAMES:
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
    for name in ("",) + PUBLIC_SERVICE_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, node, store, coordinator, envelopes, bound, health,
                   [transport.close])


async def start_dev(data_dir: str | Path, host: str = "127.0.0.1", port: int = 50051,
                    shard_count: int = 256,
                    retention_ms: int = IDEMPOTENCY_RETENTION_MS,
                    memory_ms: int = K.IDEMPOTENCY_MEMORY_MS,
                    envelope_rules: EnvelopeRules = DEFAULT_ENVELOPE_RULES,
                    security: Security = PLAINTEXT) -> Running:
    """The embedded default: one process, SQLite file, this process owns every shard.

    Raises ``DataDirLocked`` when another process serves ``data_dir`` (it owns every shard of
    that journal: two would both believe they do), ``PortInUse`` when the port is taken.
    """
    from ledger.store.sqlite import SqliteStore
    from shard_router.local import LocalOwnership

    lock = lock_data_dir(data_dir)
    try:
        store = await SqliteStore.open(Path(data_dir) / "ledger.sqlite3")
        try:
            # Epochs must grow across restarts; the start time in ms does (a clock set back
            # makes the store refuse the stale epoch, loudly, rather than let two writers
            # interleave).
            ownership = LocalOwnership(shard_count, epoch=time.time_ns() // 1_000_000)
            running = await start(store, ownership, shard_count, host, port,
                                  shards_min=shard_count, retention_ms=retention_ms,
                                  memory_ms=memory_ms, envelope_rules=envelope_rules,
                                  security=security, log_transitions=False)
        except BaseException:
            await store.close()
            raise
    except BaseException:
        lock.close()
        raise
    running.releases.append(lock.close)
    return running


async def run_until_signalled(running: Running) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.close()
