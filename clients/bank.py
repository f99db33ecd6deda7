"""The bank workload (Jepsen's "bank" test, for this ledger), used by crash tests and drills.

Wallets start with known balances; workers move random amounts between them through gRPC
while readers read every balance; faults happen meanwhile. Every request has its own
idempotency key and is retried with that key, on any node, until the ledger answers it
definitively; an answer that never came is asked again after the run (the ledger then answers
from its record). Afterwards the replay check must hold exactly: each final balance equals
its initial balance plus the acknowledged transfers into it minus those out of it, and every
acknowledged transfer is COMMITTED exactly once while every refused one moved nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc

from redledger_client import LedgerClient, LedgerError
from ledgerpb import ledger_pb2 as pb

CURRENCY = "CNY"
# One request keeps being retried (on every node in turn) for this long before the run
# counts it as unanswered and asks again after the run (s).
OP_DEADLINE_S = 30.0
# Deadline of one call to one node (s).
CALL_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.05
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class BankConfig:
    wallets: int = 16
    initial_minor: int = 10_000
    workers: int = 8
    readers: int = 1
    amount_max: int = 50
    prefix: str = "bank"
    seed: int = 1


@dataclass
class Op:
    key: str
    src: str
    dst: str
    amount: int
    started: float
    finished: float = 0.0
    result: str = "pending"  # ok | refused | unknown
    transfer_id: str = ""
    detail: str = ""


@dataclass
class BankResult:
    ops: list[Op] = field(default_factory=list)
    reads: list[tuple[float, int, int]] = field(default_factory=list)  # (t, total, negatives)
    final: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # acknowledged, not COMMITTED as answered

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "refused": 0, "unknown": 0}
        for op in self.ops:
            out[op.result] = out.get(op.result, 0) + 1
        return out


class MultiClient:
    """Clients for every node; a request goes to the next node when one cannot answer."""

    def __init__(self, targets: list[str], caller: str,
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.clients = [LedgerClient(t, caller=caller, timeout_s=call_timeout_s, retries=False)
                        for t in targets]
        self._next = 0

    async def close(self) -> None:
        for c in self.clients:
            await c.close()

    async def call(self, fn, deadline_s: float = OP_DEADLINE_S):
        """``fn(client)`` on node after node until a definitive answer or the deadline."""
        deadline = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = self.clients[self._next % len(self.clients)]
            try:
                return await fn(client)
            except LedgerError as exc:
                if exc.code not in TRANSIENT:
                    raise
                last = exc
            except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                last = exc
            self._next += 1
            await asyncio.sleep(RETRY_PAUSE_S)
        raise TimeoutError(f"no definitive answer in {deadline_s} s: {last}")


class BankWorkload:
    def __init__(self, targets: list[str], config: BankConfig | None = None,
                 caller: str = "bank") -> None:
        self.config = config or BankConfig()
        self.client = MultiClient(targets, caller)
        self.wallets = [f"{self.config.prefix}-{i}" for i in range(self.config.wallets)]
        self.rng = random.Random(self.config.seed)
        self.result = BankResult()
        self.t0 = time.monotonic()
        self._counter = 0

    async def setup(self) -> None:
        for w in self.wallets:
            await self.client.call(lambda c, w=w: c.create_wallet(
                w, CURRENCY, idempotency_key=f"{self.config.prefix}-create-{w}"))
            await self.client.call(lambda c, w=w: c.deposit(
                w, self.config.initial_minor, CURRENCY,
                idempotency_key=f"{self.config.prefix}-fund-{w}"))
        self.t0 = time.monotonic()

    async def _transfer(self, op: Op, deadline_s: float = OP_DEADLINE_S) -> None:
        try:
            response = await self.client.call(lambda c: c.transfer(
                op.src, op.dst, op.amount, CURRENCY, idempotency_key=op.key), deadline_s)
            op.result, op.transfer_id = "ok", response.transfer.transfer_id
        except LedgerError as exc:
            op.result, op.detail = "refused", exc.status
        except TimeoutError as exc:
            op.result, op.detail = "unknown", str(exc)
        op.finished = time.monotonic() - self.t0

    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            src, dst = self.rng.sample(self.wallets, 2)
            self._counter += 1
            op = Op(f"{self.config.prefix}-t{self._counter}", src, dst,
                    self.rng.randint(1, self.config.amount_max), time.monotonic() - self.t0)
            self.result.ops.append(op)
            await self._transfer(op)

    async def _reader(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                balances = [(await self.client.call(lambda c, w=w: c.get_wallet(w), 5.0))
                            .balance_minor for w in self.wallets]
            except (TimeoutError, LedgerError):
                await asyncio.sleep(0.1)
                continue
            self.result.reads.append((time.monotonic() - self.t0, sum(balances),
                                      sum(1 for b in balances if b < 0)))
            await asyncio.sleep(0.05)

    async def run(self, stop: asyncio.Event) -> None:
        """Run workers and readers until ``stop`` is set."""
        tasks = ([asyncio.create_task(self._worker(stop)) for _ in range(self.config.workers)]
                 + [asyncio.create_task(self._reader(stop)) for _ in range(self.config.readers)])
        await stop.wait()
        await asyncio.gather(*tasks)

    async def settle(self, timeout_s: float = 120.0) -> None:
        """Ask again every unanswered request (same key) until the ledger answers it."""
        deadline = time.monotonic() + timeout_s
        for op in self.result.ops:
            while op.result == "unknown" and time.monotonic() < deadline:
                await self._transfer(op, deadline_s=min(OP_DEADLINE_S,
                                                        deadline - time.monotonic()))

    async def check(self, settle_timeout_s: float = 120.0) -> list[str]:
        """The replay check and the per-transfer checks; returns the problems found."""
        problems = self.result.problems
        expected = {w: self.config.initial_minor for w in self.wallets}
        for op in self.result.ops:
            if op.result == "ok":
                expected[op.src] -= op.amount
                expected[op.dst] += op.amount
            elif op.result == "unknown":
                problems.append(f"{op.key}: never answered definitively")
        # Credits of committed cross-shard transfers land shortly after: wait (bounded)
        # for balances to reach the replayed values rather than sleeping.
        deadline = time.monotonic() + settle_timeout_s
        while True:
            # Reads get the whole settle window: after a storm of restarts a shard may still
            # be changing hands, and this is a check of balances, not of availability.
            final = {w: (await self.client.call(lambda c, w=w: c.get_wallet(w),
                                                max(settle_timeout_s, OP_DEADLINE_S)))
                     .balance_minor for w in self.wallets}
            if final == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.result.final = final
        for w in self.wallets:
            if final[w] != expected[w]:
                problems.append(f"replay check: {w} has {final[w]}, acknowledged transfers "
                                f"say {expected[w]}")
            if final[w] < 0:
                problems.append(f"{w} is negative: {final[w]}")
        for t, _total, negatives in self.result.reads:
            if negatives:
                problems.append(f"read at {t:.1f} s saw {negatives} negative balances")
        for op in self.result.ops:
            if op.result == "ok":
                try:
                    transfer = await self.client.call(lambda c, op=op: c.get_transfer(op.transfer_id))
                except LedgerError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    self.result.lost.append(op.key)
                    problems.append(f"{op.key}: acknowledged as {op.transfer_id}, which the "
                                    f"ledger does not know (lost)")
                    continue
                if (transfer.state != pb.TRANSFER_STATE_COMMITTED or transfer.amount_minor
                        != op.amount or transfer.from_wallet_id != op.src
                        or transfer.to_wallet_id != op.dst):
                    self.result.lost.append(op.key)
                    problems.append(f"{op.key}: acknowledged but recorded as {transfer}")
            elif op.result == "refused" and op.detail == "RESULT_STATUS_INSUFFICIENT_FUNDS":
                # The recorded refusal is what a retry returns: never a second execution.
                try:
                    await self.client.call(lambda c, op=op: c.transfer(
                        op.src, op.dst, op.amount, CURRENCY, idempotency_key=op.key))
                    problems.append(f"{op.key}: refused, but a retry committed it")
                except LedgerError:
                    pass
        if sum(final.values()) != self.config.initial_minor * len(self.wallets):
            problems.append(f"total {sum(final.values())} != "
                            f"{self.config.initial_minor * len(self.wallets)}")
        return problems

    async def close(self) -> None:
        await self.client.close()
