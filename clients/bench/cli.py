"""``ledger-bench``: throughput and latency of the ledger, with a naive baseline in the same run.

    ledger-bench [--backend embedded|cassandra] [--seconds 10] [--wallets 10000]
                 [--batch 2000] [--batches-in-flight 2] [--clients 32]

The ledger runs as its own process (``ledgerd dev``, or ``ledgerd node`` on Cassandra + etcd
started by ``clients.localcluster``); this process is the load generator, through gRPC.
Workloads (``clients.bench.workloads``): batch (BatchTransfer calls), single (concurrent
Transfer calls), and the naive baseline (``clients.bench.naive``): one transaction per
balance change against the same kind of store.

Figures are printed as a table (and ``--json``). Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

from clients import LedgerClient
from clients.bench.naive import naive_cassandra, naive_sqlite
from clients.bench.server import Server
from clients.bench.workloads import Result, run_batch, run_single, setup_wallets

# Deadline of each bench RPC (s): a BatchTransfer of 2,000 items on a loaded machine.
BENCH_RPC_TIMEOUT_S = 120


async def measure(server: Server, args) -> list[Result]:
    """Set up the wallets, run batch and single through the ledger, then the baseline."""
    rng = random.Random(args.seed)
    wallets = [f"bw{i}" for i in range(args.wallets)]
    async with LedgerClient(f"127.0.0.1:{server.port}", caller="bench", timeout_s=BENCH_RPC_TIMEOUT_S) as client:
        t0 = time.monotonic()
        await setup_wallets(client, wallets)
        print(f"set up {len(wallets)} wallets in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        results = []
        print("batch ...", file=sys.stderr)
        results.append(await run_batch(client, wallets, args, rng))
        print("single ...", file=sys.stderr)
        results.append(await run_single(client, wallets, args, rng))
    print("naive ...", file=sys.stderr)
    if args.backend == "embedded":
        results.append(naive_sqlite(wallets, args, rng))
    else:
        results.append(await asyncio.to_thread(naive_cassandra, server.cassandra, wallets, args))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the bench and print its table (or JSON)."""
    parser = argparse.ArgumentParser(prog="ledger-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["embedded", "cassandra"], default="embedded")
    parser.add_argument("--seconds", type=float, default=10.0, help="per workload")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heap-mb", type=int, default=1024)
    parser.add_argument("--cassandra", default=None, help="use running servers: HOST:PORT")
    parser.add_argument("--etcd", default=None, help="with --cassandra: HOST:PORT")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = Server(args)
    try:
        server.start()
        results = asyncio.run(measure(server, args))
    finally:
        server.stop()
    naive = results[-1].per_s
    rows = [r.row() | {"x_naive": round(r.per_s / naive, 2) if naive else None}
            for r in results]
    if args.json:
        print(json.dumps({"backend": args.backend, "nproc": os.cpu_count(),
                          "args": vars(args), "results": rows}, indent=2))
        return 0
    print(f"\nledger-bench: backend={args.backend}, {args.shards} shards, {args.wallets} "
          f"wallets, {os.cpu_count()} cores, {args.seconds:.0f} s per workload")
    print(f"{'workload':<22}{'committed':>10}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'x naive':>9}")
    for r in rows:
        print(f"{r['workload']:<22}{r['committed']:>10}{r['per_s']:>10.0f}{r['p50_ms']:>10.1f}"
              f"{r['p99_ms']:>10.1f}{r['x_naive']:>9.2f}")
    print(f"(batch: {args.batch} transfers per BatchTransfer call, {args.batches_in_flight} "
          f"calls in flight; latencies are per call)")
    return 0
