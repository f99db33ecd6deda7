"""A hot red envelope grabbed inside the ledger process, without gRPC (issue 10's speed).

    python -m tests.tools.hotgrab [--rounds 3] [--receivers 10000] [--grab-batch 500]
                                  [--in-flight 2] [--shards 256]

Starts the embedded default in this process (``ledger.server.start_dev`` on a temporary
directory), creates the receivers, then per round: one LUCKY envelope of ``--receivers``
shares, grabbed by every receiver through ``Envelopes.grab_many`` (``--grab-batch`` grabs per
call, ``--in-flight`` calls at once, as ``ledger-bench``'s gateway does over gRPC), until every
credit is delivered. Prints per round: grabs/s over the grab window, the process's CPU per
grab during the grabs and including the credits after them (the SQLite thread included), the
event loop thread's share, journal appends per grab, and the time until every receiver is
credited (every outbox empty) against the grab window.

What it leaves out is the gRPC layer and the load generator's process: ``ledger-bench
--workloads hot-envelope`` measures the whole path. Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from coordinator.envelopes import EnvelopeRules, GrabItem
from ledger import metrics, server

CALLER = "hotgrab"
FUND_MINOR = 10**12
SHARE_MINOR = 100
SETUP_CONCURRENCY = 256


async def _setup(running, receivers: list[str]) -> None:
    coordinator = running.coordinator
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def wallet(w: str, fund: bool) -> None:
        async with gate:
            made = await coordinator.create_wallet(CALLER, "c-" + w, w, "CNY")
            assert made.ok, made
            if fund:
                funded = await coordinator.deposit(CALLER, "d-" + w, w, FUND_MINOR, "CNY")
                assert funded.ok, funded
    await asyncio.gather(*(wallet(w, False) for w in receivers), wallet("sender", True))


def owed_credits(running) -> int:
    """Credits still owed by every owner of ``running`` (their outboxes, polled: a
    measurement must not add a hook to the crediting pipeline)."""
    return sum(len(items) for owner in running.node.owners.values()
               for items in owner.state.outbox.values())


async def _round(running, receivers: list[str], round_no: int, args) -> dict:
    envelopes = running.envelopes
    made = await envelopes.create(CALLER, f"e{round_no}", "sender",
                                  len(receivers) * SHARE_MINOR, len(receivers), "LUCKY", "CNY")
    assert made.ok, made
    envelope_id = made.value[0].envelope_id
    # Polled as a client would (the funding's credit lands on the envelope's shard later).
    while not (await envelopes.get(envelope_id, page_size=1)).value.envelope.funded_at_ms:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    pending = [GrabItem(f"g{round_no}-{i}", envelope_id, w) for i, w in enumerate(receivers)]
    pending.reverse()
    granted = 0

    async def gateway() -> None:
        nonlocal granted
        while pending:
            batch = pending[-args.grab_batch:]
            del pending[-args.grab_batch:]
            for item, outcome in zip(batch, await envelopes.grab_many(CALLER, batch)):
                if outcome.ok:
                    granted += 1
                else:  # transient (headroom being granted): sent again
                    pending.append(item)

    appends0 = metrics.STORE_APPENDS._value.get()
    loop0, cpu0, t0 = time.thread_time(), time.process_time(), time.monotonic()
    await asyncio.gather(*(gateway() for _ in range(args.in_flight)))
    cpu1, t1 = time.process_time(), time.monotonic()
    # The owners' outboxes, polled: the measurement must not add a hook to the pipeline.
    while owed_credits(running):  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    loop2, cpu2, t2 = time.thread_time(), time.process_time(), time.monotonic()
    appends = metrics.STORE_APPENDS._value.get() - appends0
    return {"round": round_no, "grabs": granted, "grabs_per_s": round(granted / (t1 - t0)),
            "cpu_us_per_grab_during": round((cpu1 - cpu0) / granted * 1e6),
            "cpu_us_per_grab_with_credits": round((cpu2 - cpu0) / granted * 1e6),
            "event_loop_cpu_us_per_grab": round((loop2 - loop0) / granted * 1e6),
            "appends_per_grab": round(appends / granted, 3),
            "grab_window_s": round(t1 - t0, 2), "credited_s": round(t2 - t0, 2)}


async def main(args) -> None:
    directory = tempfile.mkdtemp(prefix="hotgrab-")
    running = await server.start_dev(
        directory, port=0, shard_count=args.shards,
        envelope_rules=EnvelopeRules(total_minor_max=10**10, shares_max=args.receivers))
    try:
        receivers = [f"hg{i}" for i in range(args.receivers)]
        await _setup(running, receivers)
        for round_no in range(args.rounds):
            print(json.dumps(await _round(running, receivers, round_no, args)), flush=True)
            await asyncio.sleep(1.0)  # the acknowledgements of the last credits
    finally:
        await running.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--receivers", type=int, default=10_000)
    parser.add_argument("--grab-batch", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--shards", type=int, default=256)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
