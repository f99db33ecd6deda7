"""``ledgerctl``: operator and finance commands.

    ledgerctl reconcile [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--json]
    ledgerctl shards    --etcd HOST:PORT [--cassandra HOST:PORT --dc DC]
    ledgerctl failover  --from REGION --to REGION --etcd HOST:PORT
    ledgerctl move-shard SHARD --to REGION --etcd HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from ledger.reconcile import CHECKS, Report, reconcile


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="embedded store of `ledgerd dev` (default .ledger-dev)")
    p.add_argument("--cassandra", default=os.environ.get("LEDGER_CASSANDRA"),
                   help="a Cassandra contact point HOST:PORT (instead of --data-dir)")
    p.add_argument("--dc", default=os.environ.get("LEDGER_REGION", "r1"),
                   help="the local datacenter (region) to read from")
    p.add_argument("--keyspace", default="ledger")
    p.add_argument("--shards", type=int, default=256)


async def _open_store(args):
    if args.cassandra:
        from ledger.store.cassandra import CassandraStore
        host, _, port = args.cassandra.partition(":")
        return await CassandraStore.connect([host], int(port or 9042), local_dc=args.dc,
                                            keyspace=args.keyspace, create_schema=False)
    from ledger.store.sqlite import SqliteStore
    path = os.path.join(args.data_dir or ".ledger-dev", "ledger.sqlite3")
    if not os.path.exists(path):
        raise SystemExit(f"ledgerctl: no embedded store at {path}")
    return await SqliteStore.open(path)


def _progress(done: int, total: int) -> None:
    if not sys.stderr.isatty() and done != total:
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\rreading journals [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} shards")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _print_report(report: Report, elapsed_s: float) -> None:
    print(f"Reconciliation of {report.shards} shards: {report.batches} journal batches, "
          f"{report.wallets} wallets, {report.transfers_committed} committed and "
          f"{report.transfers_refused} refused transfers ({elapsed_s:.1f} s)")
    print()
    print(f"{'currency':<10}{'balances':>22}{'in transit':>22}{'sum':>22}")
    for currency in sorted(set(report.totals) | set(report.in_transit)):
        total, transit = report.totals.get(currency, 0), report.in_transit.get(currency, 0)
        print(f"{currency:<10}{total:>22,}{transit:>22,}{total + transit:>22,}")
    print()
    print(f"{'check':<22}{'result':<8}findings")
    for check in CHECKS:
        count = report.checks.get(check, 0)
        print(f"{check:<22}{'ok' if count == 0 else 'FAIL':<8}{count}")
    if report.findings:
        print()
        print(f"{'check':<22}{'shard':>6}  {'subject':<34}detail")
        for f in report.findings[:200]:
            shard = "-" if f.shard < 0 else str(f.shard)
            print(f"{f.check:<22}{shard:>6}  {f.subject:<34}{f.detail}")
        if len(report.findings) > 200:
            print(f"... and {len(report.findings) - 200} more (use --json for all)")
    print()
    print("RESULT: books are right" if report.clean else
          f"RESULT: {len(report.findings)} discrepancies")


async def _reconcile(args) -> int:
    store = await _open_store(args)
    try:
        started = time.monotonic()
        report = await reconcile(store, args.shards,
                                 progress=None if args.json else _progress)
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            _print_report(report, time.monotonic() - started)
        return 0 if report.clean else 1
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledgerctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconcile", help="prove the books from the store; exit 1 if not")
    _store_args(rec)
    rec.add_argument("--json", action="store_true", help="machine-readable report")
    args = parser.parse_args(argv)
    if args.command == "reconcile":
        return asyncio.run(_reconcile(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
