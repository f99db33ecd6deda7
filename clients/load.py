"""A transfer load for drills: concurrent ``Transfer`` and ``BatchTransfer`` traffic at a
target rate, every acknowledged transfer checked afterwards.

The bank workload (``clients.bank``) makes a dozen checked transfers a second; faults at load
are where defects show. This load runs beside it on wallets of its own (so the bank's replay
check stays exact) and is checked the same way:

* every request has its own idempotency key and is resent with that key (single calls on any
  node, batch items that answered transiently in the next batch call) until the ledger answers
  it definitively, for at most ``OP_DEADLINE_S``; what is still unanswered after the run is
  asked again (``settle``);
* afterwards (``check``) every acknowledged transfer is read back with ``GetTransfer`` and must
  be COMMITTED with its amount and wallets (one that is not is *lost*), no transfer id is
  acknowledged for two keys, and the final balances of the load's wallets must equal their
  initial balances plus the acknowledged transfers (credits land asynchronously: the check
  waits, bounded, for the balances to reach those values).

Library callers (``library_callers``): besides the load's own resending, that many callers
send single ``Transfer`` calls through the client library as an application would use it
(``LedgerClient``, one node each, its retries on: same request and key on transient answers,
with backoff, up to 8 attempts or 30 s). What reaches them after the library's retries is an
*error an application would see*, kept in ``library_errors`` with when it happened; the op
itself stays in the checks (an unknown outcome is asked again by ``settle``). A planned
handover must show them none (issue 11; ``ledger-chaos drain-region``).

Pacing: two shared pacers (one for single calls, one for batch items) hand out the target
rate; a bounded number of calls are in flight (``single_concurrency`` Transfer callers,
``batch_inflight`` BatchTransfer callers). When the ledger is slower than the target (during a
fault) the callers wait for answers and the pacers do not bank more than ``PACER_BURST_S`` of
unused rate, so the load does not burst after a fault.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc

from clients.bank import MultiClient
from redledger_client import LedgerClient, LedgerError, LedgerRefused
from ledgerpb import ledger_pb2 as pb

CURRENCY = "CNY"
# One request (or batch item) is resent for at most this long before the run counts it as
# unanswered and asks again after the run (s). The bank uses the same bound.
OP_DEADLINE_S = 30.0
# Deadline of one call to one node (s): a batch of a few hundred items answers well within.
SINGLE_CALL_TIMEOUT_S = 5.0
BATCH_CALL_TIMEOUT_S = 15.0
# Pause before the items of a batch that answered transiently are sent again (s): doubles
# from RETRY_PAUSE_S up to RETRY_PAUSE_S_MAX, with jitter, like the client library's retries,
# so that a batch waiting out a failover does not resend its items twenty times a second.
RETRY_PAUSE_S = 0.05
RETRY_PAUSE_S_MAX = 0.5
# Unused rate a pacer keeps at most (s of rate): no burst after a fault.
PACER_BURST_S = 0.5
# Item results that are not definitive: resend the item with the same key.
TRANSIENT_ITEM = frozenset({pb.RESULT_STATUS_UNSPECIFIED, pb.RESULT_STATUS_REQUEST_IN_FLIGHT,
                            pb.RESULT_STATUS_SHARD_UNAVAILABLE, pb.RESULT_STATUS_OVERLOADED})
# Reads in flight during setup and check.
CHECK_CONCURRENCY = 32
# How long the check waits for the balances to reach the acknowledged values (s).
BALANCE_SETTLE_S = 120.0
BALANCE_POLL_S = 0.2


@dataclass
class LoadConfig:
    rate: float = 1000.0            # target transfers per second, singles and batch items
    single_share: float = 0.2       # share of the rate sent as single Transfer calls
    single_concurrency: int = 32    # Transfer calls in flight at most
    batch_size: int = 200           # items per BatchTransfer call
    batch_inflight: int = 4         # BatchTransfer calls in flight at most
    wallets: int = 256
    initial_minor: int = 1_000_000_000  # never runs short: refusals are not the point here
    amount_max: int = 100
    prefix: str = "load"
    seed: int = 1
    library_callers: int = 0        # Transfer callers through LedgerClient's own retries


class LoadOp:
    """One load transfer and what the ledger answered. Times are seconds since ``t0``."""

    __slots__ = ("key", "src", "dst", "amount", "via", "started", "finished", "result",
                 "transfer_id", "detail")

    def __init__(self, key: str, src: str, dst: str, amount: int, via: str,
                 started: float) -> None:
        self.key, self.src, self.dst, self.amount = key, src, dst, amount
        self.via = via                 # "transfer" | "batch" | "library"
        self.started = started
        self.finished = 0.0
        self.result = "pending"        # ok | refused | unknown
        self.transfer_id = ""
        self.detail = ""

    def request(self) -> pb.TransferRequest:
        return pb.TransferRequest(idempotency_key=self.key, from_wallet_id=self.src,
                                  to_wallet_id=self.dst, amount_minor=self.amount,
                                  currency=CURRENCY)


class Pacer:
    """Hands out ``rate`` units per second to any number of callers."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._next = max(self._next, now - PACER_BURST_S)
        wait_s = self._next - now
        self._next += n / self.rate
        if wait_s > 0:
            await asyncio.sleep(wait_s)  # pacing the load, not waiting for a result


class LoadWorkload:
    def __init__(self, targets: list[str], config: LoadConfig | None = None,
                 caller: str = "load") -> None:
        self.config = config or LoadConfig()
        self.singles = MultiClient(targets, caller, call_timeout_s=SINGLE_CALL_TIMEOUT_S)
        # One library client per caller, the callers spread over the nodes in turn.
        self.library = [LedgerClient(targets[i % len(targets)], caller,
                                     timeout_s=SINGLE_CALL_TIMEOUT_S)
                        for i in range(self.config.library_callers)]
        # Errors that reached a library caller: (seconds since t0, error class, status).
        self.library_errors: list[tuple[float, str, str]] = []
        self.batches = MultiClient(targets, caller, call_timeout_s=BATCH_CALL_TIMEOUT_S)
        self.wallets = [f"{self.config.prefix}-w{i}" for i in range(self.config.wallets)]
        self.rng = random.Random(self.config.seed)
        self._jitter = random.Random(self.config.seed + 1)  # retry pauses only
        self.ops: list[LoadOp] = []
        self.lost: list[str] = []            # acknowledged keys not COMMITTED in the ledger
        self.final: dict[str, int] = {}
        self.problems: list[str] = []
        self.t0 = time.monotonic()
        self.run_s = 0.0                      # how long ``run`` sent load
        self.settled = 0                      # unanswered after the run, answered by settle
        self._counter = 0

    # -- setup -------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create and fund the load's wallets (idempotent: safe to call again)."""
        gate = asyncio.Semaphore(CHECK_CONCURRENCY)
        prefix = self.config.prefix

        async def one(w: str) -> None:
            async with gate:
                await self.singles.call(lambda c: c.create_wallet(
                    w, CURRENCY, idempotency_key=f"{prefix}-create-{w}"))
                await self.singles.call(lambda c: c.deposit(
                    w, self.config.initial_minor, CURRENCY,
                    idempotency_key=f"{prefix}-fund-{w}"))

        await asyncio.gather(*(one(w) for w in self.wallets))
        self.t0 = time.monotonic()

    # -- traffic -----------------------------------------------------------------------------

    def _new_op(self, via: str) -> LoadOp:
        self._counter += 1
        src, dst = self.rng.sample(self.wallets, 2)
        op = LoadOp(f"{self.config.prefix}-{via[0]}{self._counter}", src, dst,
                    self.rng.randint(1, self.config.amount_max), via,
                    time.monotonic() - self.t0)
        self.ops.append(op)
        return op

    def _done(self, op: LoadOp, result: str, transfer_id: str = "", detail: str = "") -> None:
        op.result, op.transfer_id, op.detail = result, transfer_id, detail
        op.finished = time.monotonic() - self.t0

    async def _single(self, op: LoadOp, deadline_s: float = OP_DEADLINE_S) -> None:
        try:
            response = await self.singles.call(lambda c: c.transfer(
                op.src, op.dst, op.amount, CURRENCY, idempotency_key=op.key), deadline_s)
            self._done(op, "ok", response.transfer.transfer_id)
        except LedgerError as exc:
            self._done(op, "refused", detail=exc.status or exc.code.name)
        except TimeoutError as exc:
            self._done(op, "unknown", detail=str(exc))

    async def _library(self, client: LedgerClient, op: LoadOp) -> None:
        """One Transfer through the client library with its retries, as an application
        sends it. An error is recorded as one that reached the application; a refusal is
        definitive, anything else leaves the op unknown for ``settle``."""
        try:
            response = await client.transfer(op.src, op.dst, op.amount, CURRENCY,
                                             idempotency_key=op.key)
            self._done(op, "ok", response.transfer.transfer_id)
        except LedgerError as exc:
            status = exc.status or exc.code.name
            self.library_errors.append((round(time.monotonic() - self.t0, 3),
                                        type(exc).__name__, status))
            self._done(op, "refused" if isinstance(exc, LedgerRefused) else "unknown",
                       detail=f"{type(exc).__name__} {status}")

    async def _batch(self, ops: list[LoadOp], deadline_s: float = OP_DEADLINE_S) -> None:
        """Send ``ops`` in one BatchTransfer; resend the items that answered transiently
        (same keys) until each has a definitive answer or the deadline passes."""
        deadline = time.monotonic() + deadline_s
        pending = ops
        last = ""
        pause_s = RETRY_PAUSE_S
        while pending and time.monotonic() < deadline:
            items = [op.request() for op in pending]
            try:
                response = await self.batches.call(
                    lambda c, items=items: c.batch_transfer(items), max(0.1, deadline - time.monotonic()))
            except TimeoutError as exc:
                last = str(exc)
                break
            except LedgerError as exc:  # the whole call refused (not transient): definitive
                for op in pending:
                    self._done(op, "refused", detail=exc.status or exc.code.name)
                return
            again = []
            for op, result in zip(pending, response.results):
                if result.status == pb.RESULT_STATUS_OK:
                    self._done(op, "ok", result.transfer.transfer_id)
                elif result.status in TRANSIENT_ITEM:
                    again.append(op)
                    last = pb.ResultStatus.Name(result.status)
                else:
                    self._done(op, "refused", detail=pb.ResultStatus.Name(result.status))
            pending = again
            if pending:
                await asyncio.sleep(pause_s * self._jitter.uniform(0.5, 1.0))  # backoff
                pause_s = min(RETRY_PAUSE_S_MAX, pause_s * 2)
        for op in pending:
            self._done(op, "unknown", detail=f"no definitive answer in {deadline_s:.0f} s: "
                                             f"{last}")

    async def _single_caller(self, stop: asyncio.Event, pacer: Pacer) -> None:
        while not stop.is_set():
            await pacer.take(1)
            if stop.is_set():
                return
            await self._single(self._new_op("transfer"))

    async def _library_caller(self, client: LedgerClient, stop: asyncio.Event,
                              pacer: Pacer) -> None:
        while not stop.is_set():
            await pacer.take(1)
            if stop.is_set():
                return
            await self._library(client, self._new_op("library"))

    async def _batch_caller(self, stop: asyncio.Event, pacer: Pacer) -> None:
        size = self.config.batch_size
        while not stop.is_set():
            await pacer.take(size)
            if stop.is_set():
                return
            await self._batch([self._new_op("batch") for _ in range(size)])

    async def run(self, stop: asyncio.Event) -> None:
        """Send load until ``stop`` is set; returns when every call in flight answered."""
        c = self.config
        single_rate = c.rate * c.single_share
        batch_rate = c.rate - single_rate
        tasks = []
        if single_rate > 0 and c.single_concurrency > 0:
            pacer = Pacer(single_rate)
            tasks += [asyncio.create_task(self._single_caller(stop, pacer))
                      for _ in range(c.single_concurrency)]
            # The library callers share the single calls' rate.
            tasks += [asyncio.create_task(self._library_caller(client, stop, pacer))
                      for client in self.library]
        if batch_rate > 0 and c.batch_inflight > 0:
            pacer = Pacer(batch_rate)
            tasks += [asyncio.create_task(self._batch_caller(stop, pacer))
                      for _ in range(c.batch_inflight)]
        started = time.monotonic()
        await stop.wait()
        self.run_s = time.monotonic() - started
        await asyncio.gather(*tasks)

    # -- after the run -----------------------------------------------------------------------

    async def settle(self, timeout_s: float = 120.0) -> None:
        """Ask again every unanswered request (same key, same call) until it is answered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            unknown = [op for op in self.ops if op.result == "unknown"]
            if not unknown:
                return
            remaining = max(0.1, min(OP_DEADLINE_S, deadline - time.monotonic()))
            # A library op unanswered is asked again like a single call (same key).
            singles = [op for op in unknown if op.via in ("transfer", "library")]
            batched = [op for op in unknown if op.via == "batch"]
            chunks = [batched[i:i + self.config.batch_size]
                      for i in range(0, len(batched), self.config.batch_size)]
            gate = asyncio.Semaphore(CHECK_CONCURRENCY)

            async def guarded(coro, gate=gate):
                async with gate:
                    await coro

            await asyncio.gather(*(guarded(self._single(op, remaining)) for op in singles),
                                 *(guarded(self._batch(chunk, remaining)) for chunk in chunks))
            self.settled += sum(1 for op in unknown if op.result != "unknown")

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "refused": 0, "unknown": 0}
        for op in self.ops:
            out[op.result] = out.get(op.result, 0) + 1
        return out

    def expected_balances(self) -> dict[str, int]:
        expected = {w: self.config.initial_minor for w in self.wallets}
        for op in self.ops:
            if op.result == "ok":
                expected[op.src] -= op.amount
                expected[op.dst] += op.amount
        return expected

    async def _balances(self, deadline_s: float) -> dict[str, int]:
        gate = asyncio.Semaphore(CHECK_CONCURRENCY)

        async def one(w: str) -> int:
            async with gate:
                wallet = await self.singles.call(lambda c: c.get_wallet(w), deadline_s)
                return wallet.balance_minor

        values = await asyncio.gather(*(one(w) for w in self.wallets))
        return dict(zip(self.wallets, values))

    async def check(self, balance_settle_s: float = BALANCE_SETTLE_S) -> list[str]:
        """Every acknowledged transfer committed exactly once, and the money check; returns
        the problems found (also kept in ``problems``; lost keys in ``lost``).

        Args:
            balance_settle_s: How long to wait for the balances to reach the acknowledged
                values (credits land asynchronously) before reporting the difference.
        """
        problems = self.problems = []
        self.lost = []
        for op in self.ops:
            if op.result == "unknown":
                problems.append(f"load {op.key}: never answered definitively ({op.detail})")
        acknowledged = [op for op in self.ops if op.result == "ok"]
        owners: dict[str, str] = {}
        for op in acknowledged:
            other = owners.setdefault(op.transfer_id, op.key)
            if other != op.key:
                problems.append(f"load {op.key}: transfer id {op.transfer_id} was also "
                                f"acknowledged for {other}")
        gate = asyncio.Semaphore(CHECK_CONCURRENCY)

        async def read_back(op: LoadOp) -> None:
            async with gate:
                try:
                    t = await self.singles.call(lambda c: c.get_transfer(op.transfer_id),
                                                OP_DEADLINE_S)
                except (LedgerError, TimeoutError) as exc:
                    if isinstance(exc, LedgerError) and exc.code != grpc.StatusCode.NOT_FOUND:
                        problems.append(f"load {op.key}: GetTransfer {op.transfer_id} "
                                        f"failed: {exc}")
                        return
                    if isinstance(exc, TimeoutError):
                        problems.append(f"load {op.key}: GetTransfer {op.transfer_id} never "
                                        f"answered: {exc}")
                        return
                    self.lost.append(op.key)
                    problems.append(f"load {op.key}: acknowledged as {op.transfer_id}, which "
                                    f"the ledger does not know (lost)")
                    return
            if (t.state != pb.TRANSFER_STATE_COMMITTED or t.amount_minor != op.amount
                    or t.from_wallet_id != op.src or t.to_wallet_id != op.dst
                    or t.idempotency_key != op.key):
                self.lost.append(op.key)
                problems.append(f"load {op.key}: acknowledged, but the ledger records "
                                f"{pb.TransferState.Name(t.state)} {t.from_wallet_id}->"
                                f"{t.to_wallet_id} {t.amount_minor} key {t.idempotency_key!r}")

        await asyncio.gather(*(read_back(op) for op in acknowledged))

        expected = self.expected_balances()
        deadline = time.monotonic() + balance_settle_s
        while True:
            final = await self._balances(max(balance_settle_s, OP_DEADLINE_S))
            if final == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(BALANCE_POLL_S)  # credits land asynchronously: poll, bounded
        self.final = final
        for w in self.wallets:
            if final[w] != expected[w]:
                problems.append(f"load money check: {w} has {final[w]}, acknowledged "
                                f"transfers say {expected[w]} ({final[w] - expected[w]:+d})")
        total = self.config.initial_minor * len(self.wallets)
        if sum(final.values()) != total:
            problems.append(f"load total {sum(final.values())} != {total}")
        return problems

    def figures(self) -> dict:
        """What the load did: counts, acknowledged throughput, latency per call kind."""
        counts = self.counts()
        out: dict = {"config": {k: getattr(self.config, k) for k in (
            "rate", "single_share", "single_concurrency", "batch_size", "batch_inflight",
            "wallets")}, "counts": counts, "run_s": round(self.run_s, 3),
            "ok_per_s": round(counts["ok"] / self.run_s, 1) if self.run_s else None,
            "settled_after_run": self.settled, "lost": len(self.lost),
            "lost_keys": self.lost[:20], "library_callers": len(self.library),
            "library_errors": len(self.library_errors),
            "library_errors_first": [list(e) for e in self.library_errors[:20]]}
        for via in ("transfer", "batch", "library"):
            lat = sorted((op.finished - op.started) * 1000 for op in self.ops
                         if op.via == via and op.result != "unknown" and op.finished > 0)
            n_ok = sum(1 for op in self.ops if op.via == via and op.result == "ok")
            out[via] = {"ok": n_ok,
                        "p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
                        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)
                        if lat else None}
        return out

    async def close(self) -> None:
        await self.singles.close()
        await self.batches.close()
        for client in self.library:
            await client.close()


__all__ = ["LoadConfig", "LoadOp", "LoadWorkload", "Pacer"]
