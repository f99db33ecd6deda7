"""Counters of what the ledger process asks of its store, served for Prometheus.

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

from prometheus_client import Counter, start_http_server

log = logging.getLogger("ledger.metrics")

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
STORE_TRANSACTIONS = Counter(
    "ledger_store_transactions",
    "SQLite transactions committed by the writer thread (one fsync each: group commit of "
    "every queued call).")
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
