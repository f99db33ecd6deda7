"""What the bench measures through the ledger's gRPC API, and the figures of one workload.

* batch:  BatchTransfer calls of ``--batch`` random transfers (almost all cross-shard);
          committed transfers per second and per-call latency.
* single: ``--clients`` concurrent clients each sending one Transfer at a time.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from clients import LedgerClient
from ledgerpb import ledger_pb2 as pb

CURRENCY = "CNY"
# Every bench wallet is funded with this much (minor units): enough never to run dry.
FUND_MINOR = 10**12
# Wallets created and funded concurrently during setup.
SETUP_CONCURRENCY = 64


@dataclass
class Result:
    """The figures of one workload."""

    name: str
    committed: int = 0
    refused: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict:
        return {"workload": self.name, "committed": self.committed, "refused": self.refused,
                "seconds": round(self.seconds, 2), "per_s": round(self.per_s, 1),
                "p50_ms": round(self.pct(0.50), 2), "p99_ms": round(self.pct(0.99), 2)}


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


async def run_batch(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """``args.batches_in_flight`` workers sending BatchTransfer calls for ``args.seconds``."""
    result = Result("batch")
    counter = 0

    def make_batch() -> list[pb.TransferRequest]:
        nonlocal counter
        items = []
        for _ in range(args.batch):
            a, b = random_pair(rng, wallets)
            counter += 1
            items.append(pb.TransferRequest(idempotency_key=f"b{counter}", from_wallet_id=a,
                                            to_wallet_id=b, amount_minor=1, currency=CURRENCY))
        return items

    pool = [make_batch() for _ in range(args.batches_in_flight * 3)]
    deadline = time.monotonic() + args.seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            items = pool.pop() if pool else make_batch()
            started = time.perf_counter()
            response = await client.batch_transfer(items)
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            for r in response.results:
                if r.status == pb.RESULT_STATUS_OK:
                    result.committed += 1
                else:
                    result.refused += 1
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.batches_in_flight)))
    result.seconds = time.monotonic() - started
    return result


async def run_single(client: LedgerClient, wallets: list[str], args, rng) -> Result:
    """``args.clients`` workers each sending one Transfer at a time for ``args.seconds``."""
    result = Result(f"single x{args.clients}")
    deadline = time.monotonic() + args.seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            a, b = random_pair(rng, wallets)
            counter += 1
            started = time.perf_counter()
            try:
                await client.transfer(a, b, 1, CURRENCY, idempotency_key=f"s{counter}")
                result.committed += 1
            except Exception:
                result.refused += 1
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    result.seconds = time.monotonic() - started
    return result

