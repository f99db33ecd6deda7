"""``ledger-bench``: throughput, latency and cost per transfer of the ledger, with a naive
baseline in the same run.

    ledger-bench [--backend embedded|cassandra] [--seconds 10] [--wallets 10000]
                 [--workloads batch,single,hot-out,hot-in] [--batch 2000]
                 [--batches-in-flight 2] [--clients 64] [--regions r1,r2,r3]
                 [--envelope-receivers 10000] [--grab-batch 500] [--unary-receivers N]
                 [--nye-envelopes 200] [--nye-shares 20]
                 [--target HOST:PORT [--ledger-pid PID] [--metrics URL] [--store-pid PID]]
                 [--plot FILE.png|.svg|.html] [--json]

The ledger runs as its own process (``ledgerd dev``, or ``ledgerd node`` per region on
Cassandra + etcd started by ``clients.localcluster``; ``--regions r1,r2,r3`` runs three
regions on the durable commit path), or is already running (``--target``); this process is
the load generator, through gRPC. Workloads (``clients.bench.workloads``): batch, single,
hot-out, hot-in; then the naive baseline (``clients.bench.naive``): one transaction per
balance change against the same kind of store.

Red envelopes (``clients.bench.envelopes``; opt-in, see --workloads): hot-envelope (ONE
envelope of --envelope-receivers shares grabbed by as many receivers at once, GrabEnvelopes
calls of --grab-batch items, --batches-in-flight in flight), hot-envelope-unary (a second
envelope of --unary-receivers shares, one GrabEnvelope per receiver from --clients clients),
nye (--nye-envelopes senders each create an envelope of --nye-shares shares, LUCKY and FIXED,
while receivers grab them in calls mixing envelopes), and naive-envelope (the envelope as one
row: a transaction per grab on it, then one per credit; SQLite on embedded, a lightweight
transaction each on Cassandra). Their rows add credited_s (first grab sent until every
receiver is credited), credits/s, and a correctness verdict (all grabs OK, one per receiver,
amounts summing to the total, SOLD_OUT): a wrong result makes the bench exit with status 1.
Their x_naive is against naive-envelope. The bench's own ledger is started with
--envelope-shares-max and --envelope-total-max-minor large enough; a --target ledger must
allow them itself, and --shards must be the target's (the credit check asks `ledgerctl
shard-of` which shard each receiver is on).

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
from clients.bench.envelopes import (ENVELOPE_WORKLOADS, NAIVE_ENVELOPE, receivers,
                                     settle, setup_envelope_wallets)
from clients.bench.naive import (naive_cassandra, naive_envelope_cassandra,
                                 naive_envelope_sqlite, naive_sqlite)
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
# Receivers of hot-envelope-unary by default (one GrabEnvelope call each).
UNARY_RECEIVERS_DEFAULT = 10_000
# Every workload --workloads accepts; a run without it runs the transfer ones (WORKLOADS).
ALL_WORKLOADS = [*WORKLOADS, *ENVELOPE_WORKLOADS, NAIVE_ENVELOPE]
# Exit status of a run whose envelope check found a wrong result.
EXIT_WRONG_RESULT = 1


def probe_of(server: Server, args) -> Probe:
    """Where the bench reads CPU and counters from, for what ``server`` started or was told."""
    return Probe(ledger_pids=server.ledger_pids, store_pids=server.store_pids,
                 store_thread=SQLITE_STORE_THREAD if args.backend == "embedded" else None,
                 metrics_urls=server.metrics_urls)


async def naive_envelope(server: Server, args) -> Result | None:
    """The naive red envelope on the store the ledger runs on, or None (with a note) when
    the bench cannot reach that store."""
    people = receivers(args)[:args.envelope_receivers]
    if args.backend == "embedded":
        return await asyncio.to_thread(naive_envelope_sqlite, people, args)
    if server.cassandra:
        return await asyncio.to_thread(naive_envelope_cassandra, server.cassandra, people,
                                       args, server.regions)
    print("(no naive-envelope: --target on Cassandra needs --cassandra HOST:PORT)",
          file=sys.stderr)
    return None


async def measure(server: Server, args) -> list[Result]:
    """Set up the wallets, run each workload through the ledger, then the baseline."""
    rng = random.Random(args.seed)
    wallets = [f"bw{i}" for i in range(args.wallets)]
    probe = probe_of(server, args)
    transfers = any(name in WORKLOADS for name in args.workloads)
    envelopes = any(name in ENVELOPE_WORKLOADS for name in args.workloads)
    async with LedgerClient(server.target, caller="bench",
                            timeout_s=BENCH_RPC_TIMEOUT_S) as client:
        if transfers:
            t0 = time.monotonic()
            await setup_wallets(client, wallets + [HOT_PAYER, HOT_PAYEE])
            print(f"set up {len(wallets) + 2} wallets in {time.monotonic() - t0:.1f} s",
                  file=sys.stderr)
        shards: dict[str, int] | None = None
        if envelopes:
            t0 = time.monotonic()
            shards = await setup_envelope_wallets(client, args,
                                                  set(wallets) if transfers else set())
            print(f"set up {len(receivers(args))} receivers and the senders in "
                  f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
        results = []
        for name in args.workloads:
            print(f"{name} ...", file=sys.stderr)
            if name == NAIVE_ENVELOPE:
                naive = await naive_envelope(server, args)
                if naive is not None:
                    results.append(naive)
                continue
            if name in ENVELOPE_WORKLOADS:
                # Its envelope (and the wait for its funding) is set up before the probe.
                workload = ENVELOPE_WORKLOADS[name]
                plan = await workload.prepare(client, args, rng, shards)
                before = probe.sample()
                result = await workload.run(client, plan, args, rng)
            else:
                before = probe.sample()
                result = await WORKLOADS[name](client, wallets, args, rng)
            after = probe.sample()
            if result.family == "envelope":
                after = await settle(client, probe, result, before, after)
            result.extra = costs(before, after, result.committed, result.seconds, probe)
            if result.family == "envelope":
                result.extra["cpu_us_per_grab"] = result.extra["cpu_us_per_transfer"]
                result.extra["store_cpu_us_per_grab"] = result.extra[
                    "store_cpu_us_per_transfer"]
            results.append(result)
    if not transfers:
        return results
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
                        help=f"comma separated, in order (default: {','.join(WORKLOADS)}; "
                             f"the red-envelope ones are opt-in, as with them a default run "
                             f"takes over 3 minutes on 2 cores: "
                             f"{','.join([*ENVELOPE_WORKLOADS, NAIVE_ENVELOPE])})")
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--clients", type=int, default=SINGLE_CLIENTS_DEFAULT,
                        help="concurrent single Transfer clients")
    parser.add_argument("--envelope-receivers", type=int, default=10_000,
                        help="hot-envelope and naive-envelope: shares of the one envelope "
                             "and receivers grabbing it")
    parser.add_argument("--grab-batch", type=int, default=500,
                        help="hot-envelope, nye: grabs per GrabEnvelopes call")
    parser.add_argument("--unary-receivers", type=int, default=UNARY_RECEIVERS_DEFAULT,
                        help="hot-envelope-unary: shares of its envelope and receivers, one "
                             "GrabEnvelope call each from --clients clients")
    parser.add_argument("--nye-envelopes", type=int, default=200,
                        help="nye: envelopes created, one per sender")
    parser.add_argument("--nye-shares", type=int, default=20, help="nye: shares per envelope")
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
    unknown = [w for w in args.workloads if w not in ALL_WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--workloads: unknown {unknown}; choose from {', '.join(ALL_WORKLOADS)}")
    for flag in ("envelope_receivers", "grab_batch", "unary_receivers", "nye_envelopes",
                 "nye_shares"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
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
    # Each row against the naive baseline of its family (transfers, or envelope grabs).
    naive = {r.family: r.per_s for r in results if r.name.startswith("naive")}
    rows = [r.row() | {"x_naive": round(r.per_s / naive[r.family], 2)
                       if naive.get(r.family) else None}
            for r in results]
    series = {r.name: per_second(r.samples, r.seconds) for r in results}
    marks = {r.name: r.fields["credited_s"] for r in results
             if r.fields.get("credited_s") is not None}
    regions = server.regions if args.backend == "cassandra" else []
    sizes = [f"{args.wallets} wallets" if any(w in WORKLOADS for w in args.workloads) else "",
             f"{len(receivers(args))} receivers"
             if any(w in ENVELOPE_WORKLOADS for w in args.workloads) else ""]
    title = (f"ledger-bench: backend={args.backend}"
             f"{', regions ' + ','.join(regions) if regions else ''}, {args.shards} shards, "
             f"{', '.join(s for s in sizes if s) or 'no wallets'}, {os.cpu_count()} cores")
    if args.plot:
        plot.write(args.plot, series, title, marks)
        print(f"plot written to {args.plot}", file=sys.stderr)
    # With --json the table goes to stderr, so a saved JSON run still shows its figures.
    print_table(title, rows, args, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"backend": args.backend, "regions": regions, "nproc": os.cpu_count(),
                          "args": vars(args), "results": rows, "series": series}, indent=2))
    wrong = [r["workload"] for r in rows if r.get("correct") is False]
    if wrong:
        print(f"ledger-bench: WRONG RESULT in {', '.join(wrong)} (see check)", file=sys.stderr)
        return EXIT_WRONG_RESULT
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
    envelope_rows = [r for r in rows if r.get("family") == "envelope"]
    if envelope_rows:
        out(f"\n{'red envelopes':<22}{'grabs':>8}{'grabs/s':>9}{'credited s':>11}"
            f"{'credits/s':>10}{'created/s':>10}  check")
        for r in envelope_rows:
            out(f"{r['workload']:<22}{r['grabs']:>8}{r['per_s']:>9.0f}"
                f"{_fmt(r.get('credited_s'), 11, 2)}{_fmt(r.get('credits_per_s'), 10)}"
                f"{_fmt(r.get('created_per_s'), 10)}  "
                f"{'OK' if r['correct'] else 'WRONG'}: {r['check']}")
    out(f"\n{'per transfer / grab':<22}{'CPU us':>8}{'store us':>9}{'appends':>9}"
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
    if envelope_rows:
        out(f"(hot-envelope, nye: {args.grab_batch} grabs per GrabEnvelopes call, "
            f"{args.batches_in_flight} calls in flight; hot-envelope-unary: {args.clients} "
            f"clients, one GrabEnvelope each; naive-envelope: latency of the grab's "
            f"transaction. grabs/s: from the first grab sent to the last answered; credited "
            f"s: from the first grab sent until every receiver is credited; CPU per grab: "
            f"net of the bench's credit polls; nye's includes its CreateEnvelope calls.)")
