"""The drills' transfer load (``clients.load``) on the embedded default: it sends single
Transfer and BatchTransfer traffic, and its check holds on a correct ledger and catches an
acknowledged transfer that the ledger does not hold (lost) and the money it leaves missing.
"""

from __future__ import annotations

import asyncio
import time

from clients.load import LoadConfig, LoadOp, LoadWorkload
from ledger import server

SHARDS = 8
# Enough acknowledged transfers of each kind to mean something, and how long they may take (s).
ACKED_MIN = 100
RUN_DEADLINE_S = 60.0
POLL_S = 0.05


async def test_load_is_checked_and_a_lost_transfer_is_caught(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    load = LoadWorkload([f"127.0.0.1:{running.port}"], LoadConfig(
        rate=400, single_share=0.5, single_concurrency=8, batch_size=25, batch_inflight=2,
        wallets=16, prefix="lt", seed=3))
    try:
        await load.setup()
        stop = asyncio.Event()
        traffic = asyncio.create_task(load.run(stop))

        def acked(via: str) -> int:
            return sum(1 for op in load.ops if op.via == via and op.result == "ok")

        deadline = time.monotonic() + RUN_DEADLINE_S
        while min(acked("transfer"), acked("batch")) < ACKED_MIN:
            assert time.monotonic() < deadline, load.counts()
            await asyncio.sleep(POLL_S)
        stop.set()
        await traffic
        await load.settle()
        assert await load.check() == []
        figures = load.figures()
        assert figures["counts"]["unknown"] == 0 and figures["lost"] == 0, figures
        assert figures["transfer"]["ok"] >= ACKED_MIN and figures["batch"]["ok"] >= ACKED_MIN
        assert figures["ok_per_s"] > 0
        assert sum(load.final.values()) == 16 * load.config.initial_minor

        # An acknowledgement the ledger never made: the check names it lost, and the money
        # check sees the balances it would have moved.
        forged = LoadOp("lt-forged", load.wallets[0], load.wallets[1], 7, "transfer", 0.0)
        forged.result, forged.transfer_id = "ok", "t0001" + "0" * 24
        load.ops.append(forged)
        problems = await load.check(balance_settle_s=0.5)
        assert load.lost == ["lt-forged"]
        assert any("lt-forged" in p and "lost" in p for p in problems), problems
        assert {p.split(":")[1].split()[0] for p in problems if "money check" in p} == {
            load.wallets[0], load.wallets[1]}, problems
    finally:
        await load.close()
        await running.close(grace_s=0.5)
