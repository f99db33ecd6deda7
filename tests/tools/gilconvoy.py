"""How much a busy Python thread slows SQLite commits in another thread (the GIL convoy).

    python -m tests.tools.gilconvoy [--seconds 2] [--switch-interval 0.005]

One thread commits a one-row transaction in a loop (WAL, ``synchronous=FULL``, as the
embedded store's writer thread does), first alone, then while another thread spins in pure
Python (as the event loop does under load). The ``sqlite3`` module lets go of the GIL around
every statement and must take it back after: beside a busy thread each statement can wait a
whole switch interval. Prints commits/s alone and beside the spinning thread, and bare
``fsync`` calls/s on the same directory for scale. Nothing is asserted: a measurement
(README, "Where the time goes").
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time


def _commits_per_s(db: sqlite3.Connection, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (done % 1000, b"x" * 100))
        db.execute("COMMIT")
        done += 1
    return done / (time.perf_counter() - started)


def _fsyncs_per_s(path: str, seconds: float) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        os.close(fd)


def main(seconds: float, switch_interval: float) -> dict:
    sys.setswitchinterval(switch_interval)
    with tempfile.TemporaryDirectory(prefix="gilconvoy-") as directory:
        db = sqlite3.connect(os.path.join(directory, "t.db"), isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        alone = _commits_per_s(db, seconds)
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                pass
        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            beside = _commits_per_s(db, seconds)
        finally:
            stop.set()
            spinner.join()
        db.close()
        fsyncs = _fsyncs_per_s(os.path.join(directory, "fsync"), seconds)
    return {"switch_interval_s": switch_interval, "commits_per_s_alone": round(alone),
            "commits_per_s_beside_busy_thread": round(beside), "fsyncs_per_s": round(fsyncs)}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--switch-interval", type=float, default=0.005)
    args = parser.parse_args()
    print(json.dumps(main(args.seconds, args.switch_interval)))


if __name__ == "__main__":
    cli()
