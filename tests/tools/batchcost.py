"""Cross-shard batch transfers inside the ledger process, without gRPC (issue 9's speed).

    python -m tests.tools.batchcost [--seconds 8] [--wallets 5000] [--batch 2000]
                                    [--in-flight 2] [--shards 256] [--rounds 3]
    python -m tests.tools.batchcost --batch 1 --in-flight 64      # single transfers
    python -m tests.tools.batchcost --calls 3 ...                  # a fixed workload
    python -m tests.tools.batchcost --switch-interval 0.001 ...    # the GIL's switch interval

Starts the embedded default in this process (``ledger.server.start_dev`` on a temporary
directory), creates and funds the wallets, then per round sends ``Coordinator.batch_transfer``
calls of ``--batch`` random pairs (almost all cross-shard), ``--in-flight`` at once, for
``--seconds``, and waits until every credit is delivered. Prints per round: committed
transfers/s, the process's CPU per transfer (the SQLite thread included) during the calls and
including the credits after them, the event loop thread's share, journal appends and store
rows per transfer.

What it leaves out is the gRPC layer and the load generator: ``ledger-bench --workloads
batch`` measures the whole path. Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time

from coordinator.coordinator import TransferItem
from ledger import metrics, server
from tests.tools.hotgrab import owed_credits

CALLER = "batchcost"
FUND_MINOR = 10**12
SETUP_CONCURRENCY = 256


async def _setup(running, wallets: list[str]) -> None:
    coordinator = running.coordinator
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def wallet(w: str) -> None:
        async with gate:
            made = await coordinator.create_wallet(CALLER, "c-" + w, w, "CNY")
            assert made.ok, made
            funded = await coordinator.deposit(CALLER, "d-" + w, w, FUND_MINOR, "CNY")
            assert funded.ok, funded
    await asyncio.gather(*(wallet(w) for w in wallets))


async def _round(running, wallets: list[str], round_no: int, args, rng) -> dict:
    coordinator = running.coordinator
    committed = 0
    counter = 0
    deadline = time.monotonic() + args.seconds

    async def sender() -> None:
        nonlocal committed, counter
        calls = 0
        while (time.monotonic() < deadline if not args.calls else calls < args.calls):
            calls += 1
            items = []
            for _ in range(args.batch):
                a, b = rng.sample(wallets, 2)
                counter += 1
                items.append(TransferItem(f"r{round_no}-{counter}", a, b, 1, "CNY"))
            outcomes = await coordinator.batch_transfer(CALLER, items)
            committed += sum(1 for o in outcomes if o.ok)

    appends0 = metrics.STORE_APPENDS._value.get()
    rows0 = metrics.STORE_ROWS_WRITTEN._value.get()
    txns0 = metrics.STORE_TRANSACTIONS._value.get()
    loop0, cpu0, t0 = time.thread_time(), time.process_time(), time.monotonic()
    await asyncio.gather(*(sender() for _ in range(args.in_flight)))
    cpu1, t1 = time.process_time(), time.monotonic()
    while owed_credits(running):  # noqa: ASYNC110 - polled: no hook in the pipeline
        await asyncio.sleep(0.005)
    loop2, cpu2, t2 = time.thread_time(), time.process_time(), time.monotonic()
    return {"round": round_no, "committed": committed,
            "per_s": round(committed / (t1 - t0)),
            "cpu_us_per_transfer_during": round((cpu1 - cpu0) / committed * 1e6),
            "cpu_us_per_transfer_with_credits": round((cpu2 - cpu0) / committed * 1e6),
            "event_loop_cpu_us_per_transfer": round((loop2 - loop0) / committed * 1e6),
            "appends_per_transfer": round(
                (metrics.STORE_APPENDS._value.get() - appends0) / committed, 3),
            "rows_per_transfer": round(
                (metrics.STORE_ROWS_WRITTEN._value.get() - rows0) / committed, 2),
            "store_transactions_per_transfer": round(
                (metrics.STORE_TRANSACTIONS._value.get() - txns0) / committed, 3),
            "credited_after_s": round(t2 - t1, 2)}


async def main(args) -> None:
    directory = tempfile.mkdtemp(prefix="batchcost-")
    running = await server.start_dev(directory, port=0, shard_count=args.shards)
    rng = random.Random(args.seed)
    try:
        wallets = [f"bc{i}" for i in range(args.wallets)]
        await _setup(running, wallets)
        for round_no in range(args.rounds):
            print(json.dumps(await _round(running, wallets, round_no, args, rng)), flush=True)
    finally:
        await running.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--wallets", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calls", type=int, default=0,
                        help="each sender sends this many calls per round (instead of "
                             "--seconds): a fixed workload, e.g. for instruction counts")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="sys.setswitchinterval for the run (s; 0: Python's default)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
