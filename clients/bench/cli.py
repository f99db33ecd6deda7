"""``ledger-bench``: throughput, latency and cost per transfer of the ledger, with a naive
baseline in the same run.

    ledger-bench [--backend embedded|cassandra] [--seconds 10] [--wallets 10000]
                 [--workloads batch,single,hot-out,hot-in] [--batch 2000]
                 [--batches-in-flight 2] [--clients 64] [--regions r1,r2,r3]
                 [--target HOST:PORT [--ledger-pid PID] [--metrics URL] [--store-pid PID]]
                 [--plot FILE.png|.svg|.html] [--json]

The ledger runs as its own process (``ledgerd dev``, or ``ledgerd node`` per region on
Cassandra + etcd started by ``clients.localcluster``; ``--regions r1,r2,r3`` runs three
regions on the durable commit path), or is already running (``--target``); this process is
the load generator, through gRPC. Workloads (``clients.bench.workloads``): batch, single,
hot-out, hot-in; then the naive baseline (``clients.bench.naive``): one transaction per
balance change against the same kind of store.

Besides transfers/s and latency, each workload reports what it cost (``clients.bench.probe``,
read before and after it): the ledger processes' CPU microseconds per committed transfer
(/proc), the CPU of the store (Cassandra's java processes, or the embedded store's
``sqlite-store`` thread) and its share of the server side, the bench's own CPU, and the
store work per committed transfer from the ledger's /metrics counters (journal appends,
view rows, lightweight transactions, statements, SQLite transactions). Store work still in
flight when a workload ends (credits, rows behind the journal) is counted in the next one.

Figures are printed as a table (and ``--json``). Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import sys
import time
import uuid
from typing import TextIO

from clients import LedgerClient
from clients.bench import plot
from clients.bench.naive import naive_cassandra, naive_sqlite
from clients.bench.probe import SQLITE_STORE_THREAD, Probe, costs
from clients.bench.series import per_second
from clients.bench.server import Server
from clients.bench.workloads import (HOT_PAYEE, HOT_PAYER, WORKLOADS, Result,
                                     setup_wallets)

# Deadline of each bench RPC (s): a BatchTransfer of 2,000 items on a loaded machine.
BENCH_RPC_TIMEOUT_S = 120
# Hex digits of the run id that prefixes every transfer key of a run (32 bits: runs against
# one ledger do not collide in practice).
RUN_ID_CHARS = 8
# Concurrent single Transfer clients by default: the figure the bar names.
SINGLE_CLIENTS_DEFAULT = 64


def probe_of(server: Server, args) -> Probe:
    """Where the bench reads CPU and counters from, for what ``server`` started or was told."""
    return Probe(ledger_pids=server.ledger_pids, store_pids=server.store_pids,
                 store_thread=SQLITE_STORE_THREAD if args.backend == "embedded" else None,
                 metrics_urls=server.metrics_urls)


async def measure(server: Server, args) -> list[Result]:
    """Set up the wallets, run each workload through the ledger, then the baseline."""
    rng = random.Random(args.seed)
    wallets = [f"bw{i}" for i in range(args.wallets)]
    probe = probe_of(server, args)
    async with LedgerClient(server.target, caller="bench",
                            timeout_s=BENCH_RPC_TIMEOUT_S) as client:
        t0 = time.monotonic()
        await setup_wallets(client, wallets + [HOT_PAYER, HOT_PAYEE])
        print(f"set up {len(wallets) + 2} wallets in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        results = []
        for name in args.workloads:
            print(f"{name} ...", file=sys.stderr)
            before = probe.sample()
            result = await WORKLOADS[name](client, wallets, args, rng)
            after = probe.sample()
            result.extra = costs(before, after, result.committed, result.seconds, probe)
            results.append(result)
    if args.backend == "embedded":
        print("naive ...", file=sys.stderr)
        results.append(naive_sqlite(wallets, args, rng))
    elif server.cassandra:
        print("naive ...", file=sys.stderr)
        results.append(await asyncio.to_thread(naive_cassandra, server.cassandra, wallets,
                                               args, server.regions))
    else:
        print("(no naive baseline: --target on Cassandra needs --cassandra HOST:PORT)",
              file=sys.stderr)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ledger-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["embedded", "cassandra"], default="embedded")
    parser.add_argument("--seconds", type=float, default=10.0, help="per workload")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma separated, in order (default: {','.join(WORKLOADS)})")
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--clients", type=int, default=SINGLE_CLIENTS_DEFAULT,
                        help="concurrent single Transfer clients")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heap-mb", type=int, default=1024)
    parser.add_argument("--regions", default=None,
                        help="cassandra: start these regions (e.g. r1,r2,r3) and a node per "
                             "region on the durable commit path; traffic goes to the first")
    parser.add_argument("--cassandra", default=None, help="use running servers: HOST:PORT")
    parser.add_argument("--etcd", default=None, help="with --cassandra: HOST:PORT")
    parser.add_argument("--target", default=None,
                        help="run against a running ledger at HOST:PORT (start nothing)")
    parser.add_argument("--ledger-pid", type=int, action="append",
                        help="with --target: a ledger process to read CPU from (repeatable)")
    parser.add_argument("--store-pid", type=int, action="append",
                        help="with --target: a store process (Cassandra) to read CPU from")
    parser.add_argument("--metrics", action="append",
                        help="with --target: a ledger's /metrics URL (repeatable, summed)")
    parser.add_argument("--plot", default=None,
                        help="write throughput and latency over time (.png, .svg, .html)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Transfer keys start with this, so a run against a ledger that served an earlier run
    # (--target) makes new transfers instead of replaying the earlier run's answers.
    args.run_id = uuid.uuid4().hex[:RUN_ID_CHARS] + "-"
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.regions and args.backend != "cassandra":
        parser.error("--regions needs --backend cassandra")
    if args.regions and (args.cassandra or args.target):
        parser.error("--regions starts its own cluster: not with --cassandra or --target")
    if not args.target and (args.ledger_pid or args.metrics):
        parser.error("--ledger-pid and --metrics are for --target (the bench knows its own)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench and print its table (or JSON)."""
    args = parse_args(argv)
    server = Server(args)
    try:
        server.start()
        results = asyncio.run(measure(server, args))
    finally:
        server.stop()
    naive = results[-1].per_s if results[-1].name.startswith("naive") else 0.0
    rows = [r.row() | {"x_naive": round(r.per_s / naive, 2) if naive else None}
            for r in results]
    series = {r.name: per_second(r.samples, r.seconds) for r in results}
    regions = server.regions if args.backend == "cassandra" else []
    title = (f"ledger-bench: backend={args.backend}"
             f"{', regions ' + ','.join(regions) if regions else ''}, {args.shards} shards, "
             f"{args.wallets} wallets, {os.cpu_count()} cores")
    if args.plot:
        plot.write(args.plot, series, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    # With --json the table goes to stderr, so a saved JSON run still shows its figures.
    print_table(title, rows, args, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"backend": args.backend, "regions": regions, "nproc": os.cpu_count(),
                          "args": vars(args), "results": rows, "series": series}, indent=2))
    return 0


def _fmt(value, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_table(title: str, rows: list[dict], args, file: TextIO = sys.stdout) -> None:
    """The figures as two tables: speed, then cost per committed transfer."""
    out = functools.partial(print, file=file)
    out(f"\n{title}, {args.seconds:.0f} s per workload")
    out(f"{'workload':<22}{'committed':>10}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'x naive':>9}")
    for r in rows:
        out(f"{r['workload']:<22}{r['committed']:>10}{r['per_s']:>10.0f}"
            f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{_fmt(r['x_naive'], 9, 2)}")
    for r in rows:
        if r.get("refusals"):
            out(f"  {r['workload']}: not committed: "
                + ", ".join(f"{why} {n}" for why, n in sorted(r["refusals"].items())))
    out(f"\n{'per committed transfer':<22}{'CPU us':>8}{'store us':>9}{'appends':>9}"
        f"{'rows':>7}{'LWT':>7}{'stmts':>7}{'txns':>7}   {'ledger%':>8}{'store%':>7}"
        f"{'share':>6}{'bench%':>7}{'load':>6}")
    for r in rows:
        if "cpu_us_per_transfer" not in r:
            continue  # the naive baseline runs in this process: no ledger to measure
        out(f"{r['workload']:<22}{_fmt(r['cpu_us_per_transfer'], 8)}"
            f"{_fmt(r['store_cpu_us_per_transfer'], 9)}"
            f"{_fmt(r['appends_per_transfer'], 9, 3)}{_fmt(r['rows_per_transfer'], 7, 2)}"
            f"{_fmt(r['lwt_per_transfer'], 7, 3)}{_fmt(r['statements_per_transfer'], 7, 3)}"
            f"{_fmt(r['transactions_per_transfer'], 7, 4)}   "
            f"{_fmt(r['ledger_cpu_pct'], 8)}{_fmt(r['store_cpu_pct'], 7)}"
            f"{_fmt(r['store_cpu_share'], 6, 2)}{_fmt(r['bench_cpu_pct'], 7)}"
            f"{_fmt(r['load_1m'], 6, 1)}")
    out(f"(batch, hot-out, hot-in: {args.batch} transfers per BatchTransfer call, "
        f"{args.batches_in_flight} calls in flight; latencies are per call. CPU %: of one "
        f"core; share: the store's part of the server side's CPU; load: the machine's "
        f"1-minute load average at the workload's end.)")
