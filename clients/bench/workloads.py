"""What the bench measures through the ledger's gRPC API, and the figures of one workload.

* batch:   BatchTransfer calls of ``--batch`` random transfers (almost all cross-shard);
           committed transfers per second and per-call latency.
* single:  ``--clients`` concurrent clients each sending one Transfer at a time.
* hot-out: BatchTransfer calls whose items all debit ONE wallet and credit ``HOT_PEERS``
           others (a red envelope handed out): every debit is decided by one shard owner.
* hot-in:  BatchTransfer calls whose items all credit ONE wallet from ``HOT_PEERS`` others
           (everyone paying one merchant): every credit lands on one shard.

Every call's finish time, latency and committed count is kept (``Result.samples``) for the
per-second series and the plot.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from clients import LedgerClient
from ledgerpb import ledger_pb2 as pb

CURRENCY = "CNY"
# Every bench wallet is funded with this much (minor units): enough never to run dry.
FUND_MINOR = 10**12
# Wallets created and funded concurrently during setup.
SETUP_CONCURRENCY = 64
# The hot-wallet workloads: one wallet pays (or is paid by) this many others.
HOT_PEERS = 1_000
# The hot wallets themselves (created beside the bench wallets).
HOT_PAYER = "hot-payer"
HOT_PAYEE = "hot-payee"


@dataclass
class Result:
    """The figures of one workload."""

    name: str
    # "transfer" or "envelope": which naive baseline the row's x_naive is against.
    family: str = "transfer"
    committed: int = 0
    refused: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    # (finished, s since the workload started; latency, ms; transfers committed) per call.
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    # Why transfers were not committed: result status (batch items) or error (single calls).
    refusals: dict[str, int] = field(default_factory=dict)
    # CPU and store-cost figures, filled by the bench around the run (``probe.costs``).
    extra: dict = field(default_factory=dict)
    # Figures of the workload's own (envelope rows: credited_s, correct, ...).
    fields: dict = field(default_factory=dict)
    # What the bench needs after the run and does not print (``envelopes.settle``).
    state: Any = None

    @property
    def per_s(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict:
        return {"workload": self.name, "family": self.family, "committed": self.committed, "refused": self.refused,
                "seconds": round(self.seconds, 2), "per_s": round(self.per_s, 1),
                "p50_ms": round(self.pct(0.50), 2), "p99_ms": round(self.pct(0.99), 2),
                "refusals": dict(self.refusals), **self.fields, **self.extra}

    def refuse(self, why: str) -> None:
        self.refused += 1
        self.refusals[why] = self.refusals.get(why, 0) + 1


async def setup_wallets(client: LedgerClient, wallets: list[str]) -> None:
    """Create and fund every wallet (idempotent: the keys derive from the wallet ids)."""
    sem = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(w: str) -> None:
        async with sem:
            await client.create_wallet(w, CURRENCY, idempotency_key="c-" + w)
            await client.deposit(w, FUND_MINOR, CURRENCY, idempotency_key="d-" + w)
    await asyncio.gather(*(one(w) for w in wallets))


def random_pair(rng: random.Random, wallets: list[str]) -> tuple[str, str]:
    """Two different wallets, drawn from ``rng``."""
    a, b = rng.sample(wallets, 2)
    return a, b


def hot_peers(wallets: list[str]) -> list[str]:
    """The wallets the hot wallet pays or is paid by: the first ``HOT_PEERS`` bench wallets."""
    return wallets[:HOT_PEERS]


async def run_batch(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """``args.batches_in_flight`` workers sending BatchTransfer calls of random pairs."""
    return await _run_batches(client, "batch", "b", lambda: random_pair(rng, wallets), args)


async def run_hot_out(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """BatchTransfer calls whose every item debits ``HOT_PAYER`` (one wallet paying many)."""
    peers = hot_peers(wallets)
    return await _run_batches(client, "hot-out", "ho",
                              lambda: (HOT_PAYER, rng.choice(peers)), args)


async def run_hot_in(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """BatchTransfer calls whose every item credits ``HOT_PAYEE`` (many paying one)."""
    peers = hot_peers(wallets)
    return await _run_batches(client, "hot-in", "hi",
                              lambda: (rng.choice(peers), HOT_PAYEE), args)


async def _run_batches(client: LedgerClient, name: str, key_prefix: str,
                       pair: Callable[[], tuple[str, str]], args) -> Result:
    """``args.batches_in_flight`` workers sending BatchTransfer calls of ``args.batch`` items
    drawn from ``pair`` for ``args.seconds``; the keys are ``<run id><key_prefix><n>``."""
    result = Result(name)
    counter = 0

    def make_batch() -> list[pb.TransferRequest]:
        nonlocal counter
        items = []
        for _ in range(args.batch):
            a, b = pair()
            counter += 1
            items.append(pb.TransferRequest(
                idempotency_key=f"{args.run_id}{key_prefix}{counter}", from_wallet_id=a,
                to_wallet_id=b, amount_minor=1, currency=CURRENCY))
        return items

    # Built before the clock starts, so the first calls do not wait for the bench.
    pool = [make_batch() for _ in range(args.batches_in_flight * 3)]
    t0 = time.monotonic()
    deadline = t0 + args.seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            items = pool.pop() if pool else make_batch()
            started = time.perf_counter()
            response = await client.batch_transfer(items)
            latency_ms = (time.perf_counter() - started) * 1000
            ok = 0
            for r in response.results:
                if r.status == pb.RESULT_STATUS_OK:
                    ok += 1
                else:
                    result.refuse(pb.ResultStatus.Name(r.status))
            result.latencies_ms.append(latency_ms)
            result.samples.append((time.monotonic() - t0, latency_ms, ok))
            result.committed += ok
    await asyncio.gather(*(worker() for _ in range(args.batches_in_flight)))
    result.seconds = time.monotonic() - t0
    return result


async def run_single(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """``args.clients`` workers each sending one Transfer at a time for ``args.seconds``."""
    result = Result(f"single x{args.clients}")
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            a, b = random_pair(rng, wallets)
            counter += 1
            started = time.perf_counter()
            ok = 0
            try:
                await client.transfer(a, b, 1, CURRENCY,
                                      idempotency_key=f"{args.run_id}s{counter}")
                ok = 1
            except Exception as exc:
                result.refuse(type(exc).__name__)
            latency_ms = (time.perf_counter() - started) * 1000
            result.committed += ok
            result.latencies_ms.append(latency_ms)
            result.samples.append((time.monotonic() - t0, latency_ms, ok))
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    result.seconds = time.monotonic() - t0
    return result


# The workloads by name, in the order a run without --workloads runs them.
WORKLOADS = {"batch": run_batch, "single": run_single, "hot-out": run_hot_out,
             "hot-in": run_hot_in}

