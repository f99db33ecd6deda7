"""Snapshot and takeover figures (issue 7, defect 6): what a snapshot costs, how long the event
loop is held meanwhile, and how long a takeover replays with and without one.

    python -m tests.tools.snapbench --backend sqlite --transfers 1000000
    python -m tests.tools.snapbench --backend cassandra --cassandra 127.0.0.1:29042 --dc r1 \\
        --transfers 100000

Steps, on one shard of a fresh store (a temporary SQLite file, or a keyspace of its own with
replication ``{dc: 1}``, dropped at the end unless ``--keep``):

1. journal: ``--transfers`` same-shard transfers between ``--wallets`` wallets, decided and
   evolved by the pure core exactly as an owner does, appended in group commits of
   ``--batch`` transfers (``store.append`` with their rows, or without with ``--no-rows``:
   rows are views, replay does not read them). All are within the idempotency retention, so
   every transfer is kept in the state (the worst case for a snapshot: 1 M kept transfers).
2. takeover without a snapshot: ``ShardOwner.start()`` (fence + load + replay + rows of the
   replayed batches), timed, with a 1 ms ticker task measuring the event loop's longest stall.
3. compaction: ``ledger.compaction.compact`` to the head (load, fold, encode in a worker
   thread, save in parts, truncate the journal), timed, with the ticker.
   For comparison, the pre-fix cost: ``codec.snapshot_dumps`` format 1 on the loop.
4. takeover with the snapshot (journal truncated to nothing after it), timed, with the ticker.
5. ``--tail`` more batches appended after the snapshot, then a takeover again (snapshot +
   replay of the tail).

Prints one JSON object (``--json``) or a table. Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid

from ledger import compaction
from ledger import constants as K
from ledger.compaction import compact
from ledger.core import codec
from ledger.core.model import CreateWallet, Post, settlement_wallet_id
from ledger.core.shard import ShardState
from ledger.core.step import step
from ledger.owner import ShardOwner
from ledger.runtime.tasks import spawn

SHARD = 7
CALLER = "bench"


class Ticker:
    """Measures how late a 1 ms timer fires: the longest time the event loop was held.

    ``async with Ticker() as t:`` starts ticking before the body runs, and on exit counts
    the stall still in progress (a body that holds the loop until its end)."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.max_lag_s = 0.0
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None
        self._before = 0.0

    def _record(self, lag: float) -> None:
        self.lags.append(lag)
        self.max_lag_s = max(self.max_lag_s, lag)

    async def _run(self, started: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._before = loop.time()
            started.set()
            await asyncio.sleep(self.period_s)
            self._record(loop.time() - self._before - self.period_s)

    async def __aenter__(self) -> "Ticker":
        started = asyncio.Event()
        self._task = spawn(self._run(started), "snapbench-ticker")
        await started.wait()
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._record(max(0.0, asyncio.get_running_loop().time() - self._before
                         - self.period_s))
        self._task.cancel()

    def p99_ms(self) -> float:
        if not self.lags:
            return 0.0
        ordered = sorted(self.lags)
        return ordered[int(len(ordered) * 0.99)] * 1000


class NoPeers:
    async def execute(self, shard, commands, wait_credit=False):
        raise RuntimeError("the bench shard has no cross-shard transfers")


async def open_store(args):
    if args.backend == "sqlite":
        from ledger.store.sqlite import SqliteStore
        directory = args.data_dir or tempfile.mkdtemp(prefix="snapbench-")
        return await SqliteStore.open(os.path.join(directory, "ledger.sqlite3")), directory
    from ledger.store.cassandra import CassandraStore
    host, _, port = args.cassandra.partition(":")
    keyspace = args.keyspace or f"snapbench_{uuid.uuid4().hex[:8]}"
    store = await CassandraStore.connect([host], int(port or 9042), local_dc=args.dc,
                                         keyspace=keyspace, replication={args.dc: 1},
                                         require_region_survival=False)
    return store, keyspace


async def drop(args, store, where) -> None:
    if args.keep:
        return
    if args.backend == "sqlite":
        shutil.rmtree(where, ignore_errors=True)
    else:
        await asyncio.to_thread(store._session.execute, f"DROP KEYSPACE IF EXISTS {where}",
                                timeout=120)


async def write_journal(store, args, first_seq: int, state: ShardState | None,
                        transfers: int, epoch: int, label: str) -> tuple[ShardState, dict]:
    """Append ``transfers`` transfers in batches of ``args.batch``; return the state."""
    now = time.time_ns() // 1_000_000
    seq = first_seq
    if state is None:
        state = ShardState(SHARD)
        await store.fence(SHARD, epoch)
        events: list = []
        rows: list = []
        for i in range(args.wallets):
            wallet = f"bw-{i:07d}"
            for cmd in (CreateWallet(CALLER, f"c-{wallet}", wallet, "CNY", False, now),
                        Post(CALLER, f"d-{wallet}", f"td-{wallet}", "DEPOSIT",
                             settlement_wallet_id("CNY", SHARD), wallet, 10**12, "CNY", "",
                             SHARD, now)):
                result = step(state, [cmd], rows)
                assert result.outcomes[0].ok, result.outcomes[0]
                events.extend(result.events)
        seq += 1
        await store.append(SHARD, epoch, seq, codec.dumps(events), [] if args.no_rows else rows)
        state.seq = seq
    started = time.monotonic()
    appended_bytes = 0
    done = 0
    counter = state.seq * 1_000_000
    while done < transfers:
        events, rows = [], []
        for _ in range(min(args.batch, transfers - done)):
            counter += 1
            a = counter % args.wallets
            b = (counter * 7919 + 1) % args.wallets
            if a == b:
                b = (b + 1) % args.wallets
            key = f"{uuid.UUID(int=counter)}"  # 36 characters, like a client's uuid key
            cmd = Post(CALLER, key, f"t{SHARD:04x}{counter:024x}", "TRANSFER", f"bw-{a:07d}",
                       f"bw-{b:07d}", 1 + counter % 997, "CNY", "red envelope", SHARD, now)
            result = step(state, [cmd], rows)
            assert result.outcomes[0].ok, result.outcomes[0]
            events.extend(result.events)
            done += 1
        data = codec.dumps(events)
        appended_bytes += len(data)
        seq = state.seq + 1
        await store.append(SHARD, epoch, seq, data, [] if args.no_rows else rows)
        state.seq = seq
        if args.progress:
            sys.stderr.write(f"\r{label}: {done}/{transfers} transfers, batch {seq}")
            sys.stderr.flush()
    if args.progress:
        sys.stderr.write("\n")
    await store.flush_rows(SHARD, state.seq)
    return state, {"transfers": transfers, "batches": state.seq - first_seq,
                   "journal_bytes": appended_bytes,
                   "seconds": round(time.monotonic() - started, 2)}


async def _replay_off_loop(self) -> None:
    """ShardOwner._replay with its decoding and folding in a worker thread
    (``ledger.compaction.replay``): what ``--replay-off-loop`` measures."""
    loaded = await self._store.load(self.shard)
    self.state = await compaction.replay(self._store, self.shard, loaded)
    self._delivered = {}
    self._durable_outbox = dict(self.state.outbox_last_seq)


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (compaction workers)."""
    me, children = (resource.getrusage(resource.RUSAGE_SELF),
                    resource.getrusage(resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


async def takeover(store, epoch: int, off_loop: bool = False,
                   pause_gc: bool = False) -> dict:
    gc.collect()
    owner = ShardOwner(SHARD, epoch, store, NoPeers())
    if off_loop:
        # The benchmark swaps the replay of this one owner on purpose.
        owner._replay = _replay_off_loop.__get__(owner)  # type: ignore[method-assign]
    started, cpu = time.monotonic(), cpu_s()
    try:
        async with Ticker() as ticker:
            if pause_gc:
                gc.disable()
            try:
                await owner.start()
            finally:
                gc.enable()
            took = time.monotonic() - started
    except Exception as exc:  # a measurement: say what failed, after how long
        await owner.stop("ownership lost")
        return {"error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": round(time.monotonic() - started, 2)}
    out = {"seconds": round(took, 2), "cpu_s": round(cpu_s() - cpu, 2),
           "loop_max_stall_ms": round(ticker.max_lag_s * 1000, 1),
           "replayed_to": owner.state.seq, "kept_transfers": len(owner.state.transfers)}
    await owner.stop("ownership lost")
    del owner
    gc.collect()
    return out


async def run(args) -> dict:
    store, where = await open_store(args)
    result: dict = {"backend": args.backend, "transfers": args.transfers, "batch": args.batch,
                    "wallets": args.wallets, "rows": not args.no_rows,
                    "loadavg_at_start": os.getloadavg()[0]}
    async with Ticker() as idle:
        await asyncio.sleep(2.0)  # the loop doing nothing: the machine's own noise
    result["idle_loop_max_stall_ms"] = round(idle.max_lag_s * 1000, 1)
    result["idle_loop_p99_stall_ms"] = round(idle.p99_ms(), 1)
    epochs = iter(range(2, 100))
    try:
        state, result["journal"] = await write_journal(store, args, 0, None, args.transfers,
                                                       1, "journal")
        head = state.seq
        if args.old_codec:
            started = time.monotonic()
            old = codec_v1_dumps(state)
            result["old_snapshot_on_loop"] = {"seconds": round(time.monotonic() - started, 2),
                                              "bytes": len(old)}
            del old
        del state
        gc.collect()
        async def takeovers(name: str) -> None:
            result[name] = await takeover(store, next(epochs))
            if args.replay_off_loop:
                result[name + "_off_loop"] = await takeover(store, next(epochs), True)
            if args.gc_paused:
                result[name + "_gc_paused"] = await takeover(store, next(epochs), False, True)

        if not args.skip_plain_takeover:
            await takeovers("takeover_without_snapshot")
        if args.rounds:
            store, result["compaction_rounds"] = await compaction_rounds(store, where, head,
                                                                         args.rounds)
        if args.compare_thread:
            # The build step alone (decode + fold + encode), in a thread of this process: what
            # COMPACTION_IN_PROCESS = False costs the event loop.
            base_seq, snapshot = await store.load_snapshot(SHARD)
            batches = [(b.seq, b.epoch, b.events)
                       for b in await store.read_journal(SHARD, base_seq, 1_000_000)]
            K.COMPACTION_IN_PROCESS = False
            started = time.monotonic()
            async with Ticker() as ticker:
                data = await compaction._build(SHARD, base_seq, snapshot, batches)
            result["build_in_thread"] = {
                "seconds": round(time.monotonic() - started, 2), "bytes": len(data),
                "loop_max_stall_ms": round(ticker.max_lag_s * 1000, 1),
                "loop_p99_stall_ms": round(ticker.p99_ms(), 1)}
            del snapshot, batches, data
            gc.collect()
        K.COMPACTION_IN_PROCESS = args.compaction == "process"
        cpu = cpu_s()
        async with Ticker() as ticker:
            done = await compact(store, SHARD, head)
        await asyncio.sleep(0.5)  # let the pool reap its exited worker, for its CPU time
        result["compaction"] = {
            "mode": args.compaction, "seconds": round(done.seconds, 2),
            "cpu_s": round(cpu_s() - cpu, 2), "bytes": done.size,
            "batches_folded": done.batches, "saved": done.saved,
            "loop_max_stall_ms": round(ticker.max_lag_s * 1000, 1),
            "loop_p99_stall_ms": round(ticker.p99_ms(), 1)}
        result["journal_after_truncation"] = len(await store.read_journal(SHARD, 0, 10))
        await takeovers("takeover_with_snapshot")
        if args.tail:
            loaded = await store.load(SHARD)
            tail_state = await asyncio.to_thread(codec.snapshot_loads, loaded.snapshot)
            epoch = next(epochs)
            await store.fence(SHARD, epoch)
            _, result["tail_journal"] = await write_journal(
                store, args, tail_state.seq, tail_state, args.tail, epoch, "tail")
            del tail_state, loaded
            await takeovers("takeover_with_snapshot_and_tail")
    finally:
        await drop(args, store, where)
        await store.close()
    return result


async def compaction_rounds(store, directory: str, head: int, rounds: int):
    """SQLite only: compact copies of the same journal ``rounds`` times per mode (thread,
    process); per mode the seconds and loop stalls of every round."""
    from ledger.store.sqlite import SqliteStore
    path = os.path.join(directory, "ledger.sqlite3")
    pristine = path + ".pristine"
    await store.close()
    shutil.copy(path, pristine)
    out: dict = {}
    for mode in ("thread", "process"):
        K.COMPACTION_IN_PROCESS = mode == "process"
        runs = []
        for _ in range(rounds):
            shutil.copy(pristine, path)
            store = await SqliteStore.open(path)
            gc.collect()
            async with Ticker() as ticker:
                done = await compact(store, SHARD, head)
            await store.close()
            runs.append({"seconds": round(done.seconds, 2),
                         "loop_max_stall_ms": round(ticker.max_lag_s * 1000, 1),
                         "loop_p99_stall_ms": round(ticker.p99_ms(), 1)})
        out[mode] = runs
    shutil.copy(pristine, path)
    os.remove(pristine)
    return await SqliteStore.open(path), out


def codec_v1_dumps(state: ShardState) -> bytes:
    """Format 1 (the pre-fix snapshot, on the event loop): one JSON object, type-tagged."""
    body = {
        "v": codec.FORMAT_VERSION, "shard": state.shard, "seq": state.seq,
        "wallets": list(state.wallets.values()), "transfers": list(state.transfers.values()),
        "idempotency": list(state.idempotency.values()),
        "outbox": [[d, list(i.values())] for d, i in state.outbox.items()],
        "outbox_last_seq": list(state.outbox_last_seq.items()),
        "inbox_applied": list(state.inbox_applied.items()),
        "holds": list(state.holds.values()), "claims": list(state.claims.values()),
        "chains": [[c, x, a] for c, (x, a) in state.chains.items()],
    }
    return json.dumps(body, default=codec._default, separators=(",", ":")).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "cassandra"), default="sqlite")
    parser.add_argument("--transfers", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--tail", type=int, default=0,
                        help="transfers appended after the snapshot before a last takeover")
    parser.add_argument("--no-rows", action="store_true",
                        help="append batches without their materialized rows")
    parser.add_argument("--old-codec", action="store_true",
                        help="also time the pre-fix snapshot encoding (format 1, on the loop)")
    parser.add_argument("--skip-plain-takeover", action="store_true")
    parser.add_argument("--gc-paused", action="store_true",
                        help="also time takeovers with the garbage collector off meanwhile")
    parser.add_argument("--compaction", choices=("process", "thread"), default="process",
                        help="where compaction builds the snapshot (COMPACTION_IN_PROCESS)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="SQLite: compact copies of the journal this many times per mode")
    parser.add_argument("--compare-thread", action="store_true",
                        help="also time the build step in a thread of this process")
    parser.add_argument("--replay-off-loop", action="store_true",
                        help="also time takeovers whose replay runs in a worker thread "
                             "(ledger.compaction.replay, proposed for ShardOwner._replay)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cassandra", default="127.0.0.1:29042")
    parser.add_argument("--dc", default="r1")
    parser.add_argument("--keyspace", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
