"""``python -m clients.localcluster start|stop|status|env|fetch`` (and ``make services``)."""

from __future__ import annotations

import argparse
import sys

from clients.localcluster.cluster import LocalCluster
from clients.localcluster.fetch import ensure_cassandra, ensure_etcd
from clients.localcluster.process import LocalClusterError


def _print_status(st: dict[str, dict]) -> None:
    rows = [("PROCESS", "ADDRESS", "PID", "RUNNING", "RSS MB")]
    for name, s in st.items():
        rows.append((name, s["address"], str(s["pid"] or "-"), "yes" if s["running"] else "no",
                     f"{s['rss_mb']:.0f}" if s["rss_mb"] else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 on success (``status``: 3 if something is not running)."""
    p = argparse.ArgumentParser(prog="python -m clients.localcluster",
                                description="Real Cassandra 5.0 + etcd on loopback for redledger.")
    p.add_argument("command", choices=["start", "stop", "status", "env", "fetch"])
    p.add_argument("--run-dir", default=None, help="default ${LEDGER_RUN_DIR:-~/.cache/redledger/run}")
    p.add_argument("--regions", default=None, help="comma-separated, e.g. r1,r2,r3 (start only)")
    p.add_argument("--heap-mb", type=int, default=None)
    p.add_argument("--one-etcd", action="store_true",
                   help="start: one etcd member for all regions (default: one per region, on "
                        "the region's address, so that losing a region loses its member)")
    a = p.parse_args(argv)
    if a.command == "fetch":
        ensure_etcd()
        print(ensure_cassandra())
        return 0
    regions = [r.strip() for r in a.regions.split(",") if r.strip()] if a.regions else None
    if a.command == "start":
        per_region = not a.one_etcd
        cl = LocalCluster.from_run_dir(a.run_dir, heap_mb=a.heap_mb)
        if (regions and regions != cl.regions) or cl.etcd_per_region != (
                per_region and len(regions or cl.regions) > 1):
            running = [n for n, s in cl.status().items() if s["running"]]
            if running:
                print(f"error: {running} already run with regions {cl.regions}; stop first", file=sys.stderr)
                return 2
            cl = LocalCluster.from_run_dir(a.run_dir, regions=regions, heap_mb=a.heap_mb,
                                           etcd_per_region=per_region)
        try:
            cl.start()
        except LocalClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_status(cl.status())
        return 0
    cl = LocalCluster.from_run_dir(a.run_dir)
    if a.command == "stop":
        cl.stop()
        _print_status(cl.status())
    elif a.command == "status":
        st = cl.status()
        _print_status(st)
        return 0 if all(s["running"] for s in st.values()) else 3
    elif a.command == "env":
        for k, v in cl.env().items():
            print(f"export {k}={v}")
    return 0
