"""``ledger-chaos``: fault drills of a real deployment under the bank workload (Jepsen style).

    ledger-chaos [SCENARIO ...] [--regions r1,r2,r3] [--seconds N] [--out DIR]
                 [--cassandra-ports CQL[,STORAGE]] [--etcd-ports CLIENT[,PEER]]
                 [--run-dir DIR] [--keep-cluster] [--keep-data] [--seed N]
                 [--nodes-per-region N] [--coordinators N] [--shards N]
                 [--load RATE] [--load-single-share F] [--load-batch N] [--load-wallets N]
                 [--envelope-shares N] [--envelope-receivers N] [--envelope-expiry-s S]

The scenarios and what a run checks are described in ``clients.chaos``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from clients.chaos.constants import ALL_SCENARIOS, SCENARIOS
from clients.chaos.model import DrillConfig, RunReport
from clients.chaos.runner import run_drills
from clients.localcluster import STATE_FILE, LocalCluster


def _ports(text: str | None, defaults: tuple[int, int]) -> tuple[int, int]:
    """``"A,B"`` or ``"A"`` -> (A, B or the default second port)."""
    if not text:
        return defaults
    values = [int(p) for p in text.split(",") if p]
    return (values[0], values[1] if len(values) > 1 else defaults[1])


def main(argv: list[str] | None = None) -> int:
    """Run the drills; exit 0 iff every scenario passed."""
    parser = argparse.ArgumentParser(
        prog="ledger-chaos", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(ALL_SCENARIOS)} (default: all but random)")
    parser.add_argument("--regions", default="r1,r2,r3")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="workload time per scenario, warm-up included (at least)")
    parser.add_argument("--out", default="chaos-out", help="report.json, chaos.html, logs")
    parser.add_argument("--cassandra-ports", default=None, metavar="CQL[,STORAGE]",
                        help="default 19042,17000")
    parser.add_argument("--etcd-ports", default=None, metavar="CLIENT[,PEER]",
                        help="default 12379,12380")
    parser.add_argument("--run-dir", default=None,
                        help="cluster directory; a cluster running there is reused "
                             "(default: a new temporary one)")
    parser.add_argument("--keep-cluster", action="store_true",
                        help="leave the cluster running at the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the keyspaces of passed drills (failed ones are always kept)")
    parser.add_argument("--nodes-per-region", type=int, default=1)
    parser.add_argument("--coordinators", type=int, default=1,
                        help="coordinator-only nodes in all (spread over regions)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--heap-mb", type=int, default=512)
    parser.add_argument("--lease-ttl-s", type=float, default=DrillConfig.lease_ttl_s,
                        help="the nodes' etcd lease (ledgerd node --lease-ttl-s; etcd's "
                             "minimum is 2)")
    parser.add_argument("--takeover-grace-s", type=float,
                        default=DrillConfig.takeover_grace_s,
                        help="ledgerd node --takeover-grace-s")
    parser.add_argument("--catch-up-wait-s", type=float, default=None,
                        help="ledgerd node --catch-up-wait-s (default: ledgerd's, 300): how "
                             "long a failback waits for a region whose Cassandra is catching "
                             "up")
    parser.add_argument("--load", type=float, default=0.0, metavar="RATE",
                        help="transfer load beside the bank: RATE transfers/s through "
                             "Transfer and BatchTransfer, every acknowledged one checked "
                             "(default 0: none)")
    parser.add_argument("--load-single-share", type=float, default=0.2,
                        help="share of the load sent as single Transfer calls")
    parser.add_argument("--load-singles", type=int, default=32,
                        help="single Transfer calls in flight at most")
    parser.add_argument("--load-batch", type=int, default=200,
                        help="items per BatchTransfer call")
    parser.add_argument("--load-batch-inflight", type=int, default=4,
                        help="BatchTransfer calls in flight at most")
    parser.add_argument("--load-wallets", type=int, default=256)
    parser.add_argument("--envelope-shares", type=int, default=2000,
                        help="hot-envelope: shares of the envelope (ledgerd is started with "
                             "--envelope-shares-max this)")
    parser.add_argument("--envelope-total-minor", type=int, default=200_000,
                        help="hot-envelope: what the envelope holds (minor units)")
    parser.add_argument("--envelope-receivers", type=int, default=1800,
                        help="hot-envelope: distinct grabbers, fewer than the shares")
    parser.add_argument("--envelope-expiry-s", type=float, default=180.0,
                        help="hot-envelope: the envelope's expiry; long enough to outlast "
                             "both faults and their heals (a region's Cassandra restart "
                             "takes minutes on a loaded machine)")
    args = parser.parse_args(argv)
    scenarios = args.scenarios or list(SCENARIOS)
    if args.envelope_receivers >= args.envelope_shares:
        parser.error("--envelope-receivers must be fewer than --envelope-shares: the "
                     "envelope must not sell out")
    for name in scenarios:
        if name not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(ALL_SCENARIOS)}")
    cql, storage = _ports(args.cassandra_ports, (19042, 17000))
    etcd_client, etcd_peer = _ports(args.etcd_ports, (12379, 12380))
    regions = [r for r in args.regions.split(",") if r]
    temporary = args.run_dir is None
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="ledger-chaos-"))
    if not temporary and (run_dir / STATE_FILE).exists():
        cluster = LocalCluster.from_run_dir(run_dir)
        if cluster.regions != regions:
            parser.error(f"the cluster in {run_dir} has regions {cluster.regions}")
    else:
        # One etcd member per region: kill-region takes the region's member with it.
        cluster = LocalCluster(run_dir, regions=regions, cql_port=cql, storage_port=storage,
                               etcd_client_port=etcd_client, etcd_peer_port=etcd_peer,
                               heap_mb=args.heap_mb, etcd_per_region=True)
    config = DrillConfig(out_dir=Path(args.out), seconds=args.seconds, seed=args.seed,
                         nodes_per_region=args.nodes_per_region,
                         coordinators=args.coordinators, shards=args.shards,
                         lease_ttl_s=args.lease_ttl_s,
                         takeover_grace_s=args.takeover_grace_s,
                         catch_up_wait_s=args.catch_up_wait_s,
                         keep_data=args.keep_data, load_rate=args.load,
                         load_single_share=args.load_single_share,
                         load_single_concurrency=args.load_singles,
                         load_batch=args.load_batch,
                         load_batch_inflight=args.load_batch_inflight,
                         load_wallets=args.load_wallets,
                         envelope_shares=args.envelope_shares,
                         envelope_total_minor=args.envelope_total_minor,
                         envelope_receivers=args.envelope_receivers,
                         envelope_expiry_s=args.envelope_expiry_s)
    print(f"cluster in {run_dir}: starting (or reusing)", file=sys.stderr, flush=True)
    run: RunReport | None = None
    try:
        cluster.start()
        run = asyncio.run(run_drills(cluster, scenarios, config))
    finally:
        if not args.keep_cluster:
            cluster.stop()
            if temporary:
                shutil.rmtree(run_dir, ignore_errors=True)
    print(f"report: {run.report_path}\npicture: {run.html_path}")
    print("PASS" if run.passed else "FAIL")
    return 0 if run.passed else 1

