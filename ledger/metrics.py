"""What a ledger process exposes for Prometheus (``/metrics``): its calls, its shards, its
store work, its takeovers.

Families (names and units by Prometheus conventions; ``_total`` counters, ``_seconds``):

* calls: ``ledger_grpc_server_handled_total{grpc_service,grpc_method,grpc_code}`` and
  ``ledger_grpc_server_handling_seconds{grpc_service,grpc_method}`` (``RpcMetrics``, every
  port, every method, refusals and failures with their code);
* per shard, read when scraped from the owners (``NodeCollector``: nothing on the hot path):
  ``ledger_shard_owned``, ``ledger_shard_epoch``, ``ledger_shard_queue_commands``,
  ``ledger_shard_outbox_credits`` (credits owed to other shards, not yet known delivered),
  ``ledger_shard_credit_lag_seconds`` (age of the oldest of them), ``ledger_shard_idempotency_
  records``, and the counters ``ledger_shard_appends_total``, ``ledger_shard_commands_total``
  and ``ledger_shard_append_seconds_total`` (a shard's group-commit size is the ratio of the
  rates of the second to the first, its mean append latency the third's to the first's);
* node-wide distributions: ``ledger_group_commit_commands``, ``ledger_append_duration_seconds``;
* ownership: ``ledger_takeovers_total``, ``ledger_takeover_duration_seconds`` (gain reported to
  serving, replay included), ``ledger_takeover_failures_total``, ``ledger_shard_losses_total``,
  ``ledger_failovers_total`` (shards a node took from a region without a live node),
  ``ledger_lease_suspensions_total`` (times a node's keep-alives were late past its local
  deadline and its shards were held) and ``ledger_lease_resumptions_total`` (of those, the
  times etcd then confirmed the lease and the shards served again without a takeover);
* the event loop of a node with an etcd lease: ``ledger_event_loop_stalls_total`` (its beat
  ran more than 0.5 s late) and ``ledger_event_loop_longest_stall_seconds``: the pauses a
  lease must ride out (keep-alives come from their own thread, ``shard_router.etcd``), and
  ``ledger_lease_keepalive_longest_gap_seconds``, the longest time between two keep-alives
  sent under one lease (a lease is lost when it reaches the TTL);
* ``ledger_owner_lease_waits_total``: an owner held its queue for the lease (a keep-alive
  late by more than the append headroom, or the node suspended);
* the store: ``ledger_store_errors_total{op,kind}`` and the work counters below.

Why: the cost of a transfer is mostly the store work around it (journal appends, view rows,
lightweight transactions), and ``ledger-bench`` reports that work per committed transfer by
scraping these counters before and after each workload. Counting in the process that does
the work is the only exact source (the store's own statistics mix in every other client).

Why ``prometheus-client``: it is the reference client of the Prometheus exposition format, its
counters are thread-safe (the SQLite writer thread and the Cassandra driver's I/O thread
increment them), and its default registry adds the process collector
(``process_cpu_seconds_total``, memory), which a bench against a running server can use.

The counters are process-wide (the default registry): one ledger process has one store. An
increment costs a lock and an add (well under a microsecond); they are bumped per store
call, append or row batch, never per event inside a loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Callable

import asyncio
import inspect
import time
import weakref
from typing import Any, Iterable

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ledger import tracing
from ledger.api.handlers import rewrap
from ledger.runtime.requests import REQUEST_ID, from_metadata

log = logging.getLogger("ledger.metrics")
rpc_log = logging.getLogger("ledger.rpc")

# The port ``ledgerd dev`` serves /metrics on unless told otherwise (``make run`` documents
# localhost:9464/metrics; 9464 is the port commonly used by Prometheus exporters of
# OpenTelemetry). ``ledgerd node`` serves none unless given one: several nodes share a host
# in tests and drills. 0 disables the endpoint.
DEV_METRICS_PORT_DEFAULT = 9464
METRICS_DISABLED = 0
# prctl(2) option that names the calling thread (linux/prctl.h), and the longest name the
# kernel keeps (16 bytes with the terminating NUL).
PR_SET_NAME = 15
OS_THREAD_NAME_BYTES_MAX = 15

# Prometheus names: ``ledger_store_*`` counters end in ``_total`` (the client library adds the
# suffix to the name given here).
STORE_APPENDS = Counter(
    "ledger_store_appends",
    "Journal appends the store accepted (one per group commit of one shard).")
STORE_ROWS_WRITTEN = Counter(
    "ledger_store_rows_written",
    "Materialized view rows (wallets, wallet history entries, transfers) written to the "
    "store, after coalescing rows of one key within a write.")
STORE_LWT = Counter(
    "ledger_store_lwt",
    "Lightweight transactions and SERIAL reads (Paxos rounds) sent to Cassandra: the "
    "fence at each takeover; appends are plain writes (coordinator/PROTOCOL.md, Fencing).")
STORE_STATEMENTS = Counter(
    "ledger_store_statements",
    "Requests sent to the store: Cassandra, every statement or batch handed to the driver; "
    "SQLite, every call queued to the writer thread (each runs in its own savepoint).")
STORE_HEDGED = Counter(
    "ledger_store_hedged_statements",
    "Cassandra statements of takeovers and warm-ups (their reads and fence) that were sent to "
    "more than one node: no answer within HEDGE_DELAY_S, so a node of another region was "
    "asked too (a region's node just back from an outage is slow to answer).")
STORE_TRANSACTIONS = Counter(
    "ledger_store_transactions",
    "SQLite transactions committed by the writer thread (one fsync each: group commit of "
    "every queued call).")
STORE_ROWS_BEHIND = Gauge(
    "ledger_store_rows_behind",
    "SQLite: view rows of acknowledged journal batches the writer thread holds, to be written "
    "behind the journal (at most ROWS_BEHIND_MAX, or for ROWS_BEHIND_MS; ledger.store.sqlite).")
TRANSFERS_COMMITTED = Counter(
    "ledger_transfers_committed",
    "Transfers the API answered as committed (Transfer and BatchTransfer items), replayed "
    "answers excluded: a transfer whose call was cancelled (deadline) after it committed, "
    "and whose retry was answered as a replay, is not counted.")


AUTHZ_REFUSALS = Counter(
    "ledger_authz_refusals",
    "Calls the authorization policy refused before they ran (``ledger.security.authz``), by "
    "method and gRPC code; each is also logged on the logger ``ledger.audit``.",
    ["method", "code"])


# --- calls --------------------------------------------------------------------------------

RPC_HANDLED = Counter(
    "ledger_grpc_server_handled",
    "Calls completed by this process's gRPC server, by service, method and gRPC code "
    "(refusals and failures included; a stream counts once, when it ends).",
    ["grpc_service", "grpc_method", "grpc_code"])
RPC_SECONDS = Histogram(
    "ledger_grpc_server_handling_seconds",
    "Time from a call's handler starting to its answer (or the end of its stream).",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0))

# --- shards and ownership --------------------------------------------------------------------

GROUP_COMMIT_COMMANDS = Histogram(
    "ledger_group_commit_commands",
    "Commands decided per journal append (group commit) of one shard.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
APPEND_SECONDS = Histogram(
    "ledger_append_duration_seconds",
    "Time of one journal append (the batch's events and rows) as the shard owner saw it.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
TAKEOVERS = Counter(
    "ledger_takeovers",
    "Shards this process began to serve (each gain of a shard that ended serving).")
TAKEOVER_SECONDS = Histogram(
    "ledger_takeover_duration_seconds",
    "From a shard's gain being reported to its owner serving: fence, journal replay, checks.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0))
LEASE_WAITS = Counter(
    "ledger_owner_lease_waits",
    "Times an owner held its queue because its node's lease had under "
    "APPEND_LEASE_HEADROOM_S left (keep-alives late, or the node suspended).")
WARM_STANDBYS = Counter(
    "ledger_warm_standbys",
    "Warm standbys of shards a planned move hands to this node, or that it would take over if "
    "their owner failed, by outcome: ready (loaded and folded while the old owner served), "
    "followed (brought up to date: the batches appended since read and folded), failed (the "
    "load failed), waiting (not tried: this region's store is catching up with the others), "
    "used (a takeover replayed only the batches after it), discarded (the journal no longer "
    "continued it: full replay).",
    ["outcome"])
TAKEOVER_FAILURES = Counter(
    "ledger_takeover_failures",
    "Gains of a shard whose owner failed to start (fenced, store unreachable): given up, "
    "elected again.")
SHARD_LOSSES = Counter(
    "ledger_shard_losses",
    "Shards this process stopped serving: a handover, a lease lost, or an owner that gave "
    "its shard up (fenced, an unknown outcome, an invariant).")
STORE_ERRORS = Counter(
    "ledger_store_errors",
    "Store calls of the shard owners that failed, by operation and error "
    "(StoreUnavailable, UnknownOutcome, Fenced, or another exception's class).",
    ["op", "kind"])


def code_name(code: Any) -> str:
    """A gRPC status code's name, whether gRPC gives the enum or its integer."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "OK" if code is None else str(code)


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Server interceptor: counts every call by service, method and code, and times it; and
    serves it under its request id (``ledger.runtime.requests``: the caller's, or a new one),
    so every log record of the call carries it; at DEBUG it logs each call's end (logger
    ``ledger.rpc``: method, code, time, request id). Placed first, so it sees the code of
    refusals by the authorization interceptor and of failures the error boundary answered.

    Cost: two clock reads, two metric updates and a metadata scan per call. The wrapped
    handler of each method is built once, on its first call, and reused (building closures
    and a handler per call cost about 5 % of a unary call's CPU, measured with py-spy):
    the interceptors below this one do their per-call work inside the handler they return,
    never in ``intercept_service`` itself, so reusing their handler keeps every check."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        full = handler_call_details.method
        cached = self._handlers.get(full)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(full, handler)
        self._handlers[full] = wrapped
        return wrapped

    def _wrap(self, full: str, handler: Any) -> Any:
        service, _, method = full.lstrip("/").rpartition("/")
        seconds = RPC_SECONDS.labels(service, method)
        handled: dict[str, Any] = {}

        def done(started: float, code: str) -> None:
            took_s = time.perf_counter() - started
            seconds.observe(took_s)
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = RPC_HANDLED.labels(service, method, code)
            counter.inc()
            if rpc_log.isEnabledFor(logging.DEBUG):
                rpc_log.debug("%s %s in %.1f ms", full, code, took_s * 1000)

        def ended(exc: BaseException, context: Any) -> str:
            if isinstance(exc, asyncio.CancelledError):
                return "CANCELLED"
            if isinstance(exc, grpc.aio.AbortError):
                return code_name(context.code())
            return "UNKNOWN"

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):
                async def stream(request: Any, context: Any) -> Any:
                    metadata = context.invocation_metadata()
                    request_id = from_metadata(metadata)
                    REQUEST_ID.set(request_id)
                    started, code = time.perf_counter(), "OK"
                    with tracing.server_span(full, metadata, request_id) as span:
                        try:
                            async for item in behavior(request, context):
                                yield item
                        except BaseException as exc:
                            code = ended(exc, context)
                            raise
                        finally:
                            done(started, code)
                            tracing.end_code(span, code)
                return stream

            async def run(request: Any, context: Any, span: Any) -> Any:
                started, code = time.perf_counter(), "OK"
                try:
                    result = behavior(request, context)
                    return await result if inspect.isawaitable(result) else result
                except BaseException as exc:
                    code = ended(exc, context)
                    raise
                finally:
                    done(started, code)
                    tracing.end_code(span, code)

            async def call(request: Any, context: Any) -> Any:
                metadata = context.invocation_metadata()
                request_id = from_metadata(metadata)
                REQUEST_ID.set(request_id)
                if not tracing.enabled():
                    return await run(request, context, None)
                with tracing.server_span(full, metadata, request_id) as span:
                    return await run(request, context, span)
            return call

        return rewrap(handler, wrap)


class NodeCollector(Collector):
    """Per-shard gauges and counters, read from the live owners of every node of this
    process when ``/metrics`` is scraped (so serving pays nothing for them). Nodes register
    with ``watch_node`` and leave when they are garbage (a weak set)."""

    def __init__(self) -> None:
        self._nodes: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, node: Any) -> None:
        self._nodes.add(node)

    def discard(self, node: Any) -> None:
        self._nodes.discard(node)

    def collect(self) -> Iterable[Any]:
        labels = ["node", "shard"]
        owned = GaugeMetricFamily("ledger_shard_owned", "1 if this node serves the shard now, "
                                  "0 if not (every shard of the map is listed).", labels=labels)
        epoch = GaugeMetricFamily("ledger_shard_epoch", "The epoch (fencing token) this node "
                                  "serves the shard with.", labels=labels)
        queue = GaugeMetricFamily("ledger_shard_queue_commands", "Commands queued for the "
                                  "shard's next group commits.", labels=labels)
        outbox = GaugeMetricFamily("ledger_shard_outbox_credits", "Credits the shard owes "
                                   "wallets of other shards, not yet known delivered.",
                                   labels=labels)
        lag = GaugeMetricFamily("ledger_shard_credit_lag_seconds", "Age of the oldest credit "
                                "the shard owes another shard and has not delivered (0: none).",
                                labels=labels)
        keys = GaugeMetricFamily("ledger_shard_idempotency_records", "Idempotency records and "
                                 "key claims the shard's owner holds in memory.", labels=labels)
        appends = CounterMetricFamily("ledger_shard_appends", "Journal appends of the shard by "
                                      "its current owner.", labels=labels)
        commands = CounterMetricFamily("ledger_shard_commands", "Commands the shard's current "
                                       "owner decided in journaled batches.", labels=labels)
        seconds = CounterMetricFamily("ledger_shard_append_seconds", "Time the shard's current "
                                      "owner spent in journal appends.", labels=labels)
        info = GaugeMetricFamily("ledger_node_info", "1 per node of this process, with its "
                                 "region (what ledgerctl top groups by).",
                                 labels=["node", "region"])
        failovers = CounterMetricFamily(
            "ledger_failovers", "Shards the node took over from a home region that had no "
            "live node (AutoFailover in the shard map and the audit trail).", labels=["node"])
        suspensions = CounterMetricFamily(
            "ledger_lease_suspensions", "Times the node's lease keep-alives were late past "
            "its local deadline: its shards were held, not served, until etcd answered.",
            labels=["node"])
        resumptions = CounterMetricFamily(
            "ledger_lease_resumptions", "Suspensions that ended with etcd confirming the "
            "lease: the shards served again without a takeover.", labels=["node"])
        stalls = CounterMetricFamily(
            "ledger_event_loop_stalls", "Times the node's event loop ran more than 0.5 s "
            "late (its lease keep-alives, sent from their own thread, went on).",
            labels=["node"])
        longest_stall = GaugeMetricFamily(
            "ledger_event_loop_longest_stall_seconds", "The longest the node's event loop "
            "ran late since the process started.", labels=["node"])
        keepalive_gap = GaugeMetricFamily(
            "ledger_lease_keepalive_longest_gap_seconds", "The longest time between two "
            "keep-alives the node sent under one lease (a lease is lost at the TTL).",
            labels=["node"])
        dead = CounterMetricFamily(
            "ledger_dead_owner_revocations", "Leases of other nodes this node revoked because "
            "their address refused every probe connection (a crashed process): their shards "
            "were granted again at once instead of after the lease TTL.", labels=["node"])
        now_ms = int(time.time() * 1000)
        for node in list(self._nodes):
            try:
                node_id = node.ownership.node_id
                owners = dict(node.owners)
                shards = {p.shard for p in node.ownership.placements()} | set(owners)
            except Exception:  # a node closing under the scrape: left out of this one
                log.debug("metrics: node skipped", exc_info=True)
                continue
            failovers.add_metric([node_id], getattr(node.ownership, "failovers", 0))
            suspensions.add_metric([node_id], getattr(node.ownership, "suspensions", 0))
            resumptions.add_metric([node_id], getattr(node.ownership, "resumptions", 0))
            dead.add_metric([node_id], getattr(node.ownership, "dead_owner_revocations", 0))
            if hasattr(node.ownership, "loop_stalls"):
                stalls.add_metric([node_id], node.ownership.loop_stalls)
                longest_stall.add_metric([node_id], node.ownership.longest_loop_stall_s)
                keepalive_gap.add_metric([node_id], node.ownership.longest_keepalive_gap_s)
            info.add_metric([node_id, str(getattr(node.ownership, "region", ""))], 1.0)
            for shard in sorted(shards):
                key = [node_id, str(shard)]
                owner = owners.get(shard)
                serving = owner is not None and owner.serving
                owned.add_metric(key, 1.0 if serving else 0.0)
                if owner is None:
                    continue
                st = owner.stats(now_ms)
                epoch.add_metric(key, owner.epoch)
                queue.add_metric(key, st.queued_commands)
                outbox.add_metric(key, st.owed_credits)
                lag.add_metric(key, st.credit_lag_s)
                keys.add_metric(key, st.idempotency_records)
                appends.add_metric(key, st.appends)
                commands.add_metric(key, st.commands)
                seconds.add_metric(key, st.append_seconds)
        yield from (owned, epoch, queue, outbox, lag, keys, appends, commands, seconds,
                    failovers, suspensions, resumptions, dead, stalls, longest_stall,
                    keepalive_gap, info)


_NODES = NodeCollector()
REGISTRY.register(_NODES)


def watch_node(node: Any) -> None:
    """Expose ``node``'s shards (``NodeCollector``) until ``forget_node``."""
    _NODES.add(node)


def forget_node(node: Any) -> None:
    """Stop exposing a node that closed (its shards are served elsewhere now)."""
    _NODES.discard(node)


def serve(host: str, port: int) -> Callable[[], None]:
    """Serve /metrics on ``host:port`` in a daemon thread; return its stop function.

    ``port`` 0 serves nothing (the stop function does nothing). A taken port raises
    ``OSError`` (EADDRINUSE): the caller refuses to start rather than run unobserved.
    """
    if port == METRICS_DISABLED:
        return lambda: None
    httpd, thread = start_http_server(port, addr=host)
    log.info("metrics at http://%s:%d/metrics", host, port)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    return stop


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel (``/proc/<pid>/task/<tid>/comm``).

    Python 3.11 names threads only for itself; the kernel sees every thread as the
    interpreter. Named, a thread's CPU shows in ``top -H`` and ``ledger-bench`` can tell the
    store's writer thread from the event loop. Elsewhere than Linux this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:OS_THREAD_NAME_BYTES_MAX], 0, 0, 0)
    except (OSError, AttributeError) as exc:  # a name is a convenience, never a failure
        log.debug("cannot name thread %s: %s", name, exc)
