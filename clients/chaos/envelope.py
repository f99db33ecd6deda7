"""The grabbers of ``hot-envelope``: one hot red envelope grabbed through every node while
the drill kills its shard's owner and then its shard's region, every answer checked after.

* ``setup_wallets``: a funded sender and ``envelope_receivers`` receiver wallets, used for
  nothing else (so that each receiver's balance must be exactly its share).
* ``create``: ONE LUCKY envelope of ``envelope_shares`` shares (more than receivers: it
  never sells out) expiring ``envelope_expiry_s`` later. Its shard is the one its escrow
  wallet (``Envelope.escrow_wallet_id``) hashes to, as ``ledgerctl shard-of`` tells.
* ``run``: each receiver grabs once, with a key of its own, paced evenly from the start
  until ``GRAB_STOP_MARGIN_S`` before the expiry; some through GrabEnvelope, the rest in
  GrabEnvelopes batches; every call goes to the next node in turn, and a transient answer
  (or a batch item's) is resent with the SAME key, node after node, for at most
  ``GRAB_OP_DEADLINE_S``, as the client library retries. What is still unanswered then is
  *unanswered* (its outcome unknown): ``settle`` asks it again with its key after the run.
* ``wait_refunded``: after the expiry the owners' sweep must refund the rest.
* ``check``: GetEnvelope's grabs against every answer (``checks.grab_problems``), every
  receiver's balance and every grab's transfer (``checks.credit_problems``), the refund and
  the sender's balance (``checks.refund_problems``).
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc

from clients import LedgerClient, LedgerError
from clients.bank import TRANSIENT
from clients.chaos import checks
from clients.chaos.constants import (CREDIT_POLL_S, CREDIT_SETTLE_S, ENVELOPE_EVIDENCE_MAX,
                                     ENVELOPE_SETUP_CONCURRENCY, GRAB_BATCH_CALL_TIMEOUT_S,
                                     GRAB_CALL_TIMEOUT_S, GRAB_OP_DEADLINE_S,
                                     GRAB_RETRY_PAUSE_S, GRAB_RETRY_PAUSE_S_MAX,
                                     GRAB_STOP_MARGIN_S)
from clients.chaos.model import DrillConfig
from clients.load import TRANSIENT_ITEM, Pacer
from ledgerpb import ledger_pb2 as pb

CURRENCY = "CNY"
# The sender keeps this much beside the envelope's total, so its final balance says more
# than "the refund came back".
SENDER_SPARE_MINOR = 12_345
# Refusals a grab of this drill may get: one still being resent when the envelope expired.
# Any other refusal is a problem (the envelope exists, is funded, never sells out, and each
# receiver grabs once with one key).
EXPECTED_REFUSALS = frozenset({"RESULT_STATUS_ENVELOPE_EXPIRED"})


class GrabOp:
    """One receiver's grab and what the ledger answered. Times are seconds since ``t0``."""

    __slots__ = ("key", "receiver", "via", "started", "finished", "result", "status",
                 "position", "amount", "transfer_id", "replayed", "settled", "detail")

    def __init__(self, key: str, receiver: str, via: str, started: float) -> None:
        self.key, self.receiver, self.via, self.started = key, receiver, via, started
        self.finished = 0.0
        self.result = "pending"        # ok | refused | unknown
        self.status = ""               # the refusal's ResultStatus name
        self.position = -1
        self.amount = 0
        self.transfer_id = ""
        self.replayed = False
        self.settled = False           # unanswered during the run, answered by ``settle``
        self.detail = ""

    def request(self, envelope_id: str) -> pb.GrabEnvelopeRequest:
        return pb.GrabEnvelopeRequest(idempotency_key=self.key, envelope_id=envelope_id,
                                      receiver_wallet_id=self.receiver)

    def answer(self) -> dict:
        return {"position": self.position, "amount": self.amount,
                "transfer_id": self.transfer_id}


class HotEnvelope:
    """One hot envelope, its grabbers and what they were answered."""

    def __init__(self, targets: list[str], config: DrillConfig, prefix: str, seed: int,
                 caller: str = "chaos-envelope") -> None:
        self.config = config
        self.prefix = prefix
        self.singles = [LedgerClient(t, caller=caller, timeout_s=GRAB_CALL_TIMEOUT_S,
                                     retries=False) for t in targets]
        self.batches = [LedgerClient(t, caller=caller, timeout_s=GRAB_BATCH_CALL_TIMEOUT_S,
                                     retries=False) for t in targets]
        self.sender = f"{prefix}-sender"
        self.receivers = [f"{prefix}-r{i}" for i in range(config.envelope_receivers)]
        self.sender_initial = config.envelope_total_minor + SENDER_SPARE_MINOR
        self.rng = random.Random(seed)
        self._jitter = random.Random(seed + 1)  # retry pauses only
        self.ops: list[GrabOp] = []
        self.t0 = time.monotonic()
        self.envelope_id = ""
        self.escrow_wallet_id = ""
        self.shard = -1
        self.created_at_ms = 0
        self.expires_at_ms = 0
        self.grab_until = 0.0           # monotonic: grabbing stops then
        self.refunded_at_s: float | None = None  # since t0: first seen REFUNDED
        self.run_s = 0.0
        self._turn = 0
        self.problems: list[str] = []
        self.evidence: dict = {}

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, clients: list[LedgerClient], fn, deadline_s: float):
        """``fn(client)`` on the next node in turn, then node after node on transient
        answers (the same request, so the same key), until a definitive answer or the
        deadline (``TimeoutError``). A refusal raises its ``LedgerError``."""
        deadline = time.monotonic() + deadline_s
        self._turn += 1
        i = self._turn
        pause_s = GRAB_RETRY_PAUSE_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return await fn(clients[i % len(clients)])
            except LedgerError as exc:
                if exc.code not in TRANSIENT:
                    raise
                last = exc
            except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                last = exc
            i += 1
            await asyncio.sleep(pause_s * self._jitter.uniform(0.5, 1.0))  # backoff
            pause_s = min(GRAB_RETRY_PAUSE_S_MAX, pause_s * 2)
        raise TimeoutError(f"no definitive answer in {deadline_s:.0f} s: {last}")

    async def _gathered(self, coros) -> list:
        gate = asyncio.Semaphore(ENVELOPE_SETUP_CONCURRENCY)

        async def one(coro):
            async with gate:
                return await coro

        return await asyncio.gather(*(one(c) for c in coros))

    # -- setup -------------------------------------------------------------------------------

    async def setup_wallets(self) -> None:
        """The sender (funded) and the receivers (empty). Idempotent: keys of their own."""
        p = self.prefix
        await self._call(self.singles, lambda c: c.create_wallet(
            self.sender, CURRENCY, idempotency_key=f"{p}-create-{self.sender}"), 60.0)
        await self._call(self.singles, lambda c: c.deposit(
            self.sender, self.sender_initial, CURRENCY, idempotency_key=f"{p}-fund-sender"),
            60.0)
        await self._gathered(self._call(self.singles, lambda c, w=w: c.create_wallet(
            w, CURRENCY, idempotency_key=f"{p}-create-{w}"), 60.0) for w in self.receivers)

    async def create(self) -> None:
        """Create and fund the envelope; wait until it is ACTIVE."""
        c = self.config
        response = await self._call(self.singles, lambda cl: cl.create_envelope(
            self.sender, c.envelope_total_minor, c.envelope_shares, "LUCKY", CURRENCY,
            expiry_ms=int(c.envelope_expiry_s * 1000), memo="hot-envelope drill",
            idempotency_key=f"{self.prefix}-envelope"), 60.0)
        now_wall, now = time.time(), time.monotonic()
        e = response.envelope
        self.envelope_id, self.escrow_wallet_id = e.envelope_id, e.escrow_wallet_id
        self.created_at_ms, self.expires_at_ms = e.created_at_ms, e.expires_at_ms
        self.grab_until = now + (e.expires_at_ms / 1000 - now_wall) - GRAB_STOP_MARGIN_S
        deadline = now + 60.0
        while e.state == pb.ENVELOPE_STATE_FUNDING and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the funding credit lands asynchronously
            e = (await self._call(self.singles, lambda cl: cl.get_envelope(
                self.envelope_id, page_size=1), 30.0)).envelope
        if e.state != pb.ENVELOPE_STATE_ACTIVE:
            raise RuntimeError(f"envelope {self.envelope_id} is "
                               f"{pb.EnvelopeState.Name(e.state)} after its creation")

    # -- grabbing ----------------------------------------------------------------------------

    def _new_op(self, receiver: str, via: str) -> GrabOp:
        op = GrabOp(f"grab-{receiver}", receiver, via, time.monotonic() - self.t0)
        self.ops.append(op)
        return op

    def _done(self, op: GrabOp, result: str, grab: pb.Grab | None = None,
              status: str = "", detail: str = "", replayed: bool = False) -> None:
        op.result, op.status, op.detail, op.replayed = result, status, detail, replayed
        if grab is not None and result == "ok":
            op.position, op.amount, op.transfer_id = grab.position, grab.amount_minor, \
                grab.transfer_id
        op.finished = time.monotonic() - self.t0

    async def _single(self, op: GrabOp, deadline_s: float = GRAB_OP_DEADLINE_S) -> None:
        try:
            response = await self._call(self.singles, lambda c: c.grab_envelope(
                self.envelope_id, op.receiver, idempotency_key=op.key), deadline_s)
            self._done(op, "ok", response.grab, replayed=response.replayed)
        except LedgerError as exc:
            self._done(op, "refused", status=exc.status or exc.code.name, detail=exc.message)
        except TimeoutError as exc:
            self._done(op, "unknown", detail=str(exc))

    async def _batch(self, ops: list[GrabOp], deadline_s: float = GRAB_OP_DEADLINE_S) -> None:
        """Send ``ops`` in one GrabEnvelopes call; resend the items that answered
        transiently (same keys) until each has a definitive answer or the deadline."""
        deadline = time.monotonic() + deadline_s
        pending, last = ops, ""
        pause_s = GRAB_RETRY_PAUSE_S
        while pending and time.monotonic() < deadline:
            items = [op.request(self.envelope_id) for op in pending]
            try:
                response = await self._call(self.batches, lambda c, items=items:
                                            c.grab_envelopes(items),
                                            max(0.1, deadline - time.monotonic()))
            except TimeoutError as exc:
                last = str(exc)
                break
            except LedgerError as exc:  # the whole call refused: definitive for every item
                for op in pending:
                    self._done(op, "refused", status=exc.status or exc.code.name,
                               detail=exc.message)
                return
            again = []
            for op, result in zip(pending, response.results):
                if result.status == pb.RESULT_STATUS_OK:
                    self._done(op, "ok", result.grab, replayed=result.replayed)
                elif result.status in TRANSIENT_ITEM:
                    again.append(op)
                    last = pb.ResultStatus.Name(result.status)
                else:
                    self._done(op, "refused", status=pb.ResultStatus.Name(result.status),
                               detail=result.detail)
            pending = again
            if pending:
                await asyncio.sleep(pause_s * self._jitter.uniform(0.5, 1.0))  # backoff
                pause_s = min(GRAB_RETRY_PAUSE_S_MAX, pause_s * 2)
        for op in pending:
            self._done(op, "unknown", detail=f"no definitive answer in {deadline_s:.0f} s: "
                                             f"{last}")

    def _go_on(self, stop: asyncio.Event) -> bool:
        return not stop.is_set() and time.monotonic() < self.grab_until

    async def _single_caller(self, stop: asyncio.Event, pacer: Pacer, pool: list[str]) -> None:
        while self._go_on(stop) and pool:
            await pacer.take(1)
            if not (self._go_on(stop) and pool):
                return
            await self._single(self._new_op(pool.pop(), "grab"))

    async def _batch_caller(self, stop: asyncio.Event, pacer: Pacer, pool: list[str]) -> None:
        size = self.config.envelope_batch
        while self._go_on(stop) and pool:
            await pacer.take(size)
            if not (self._go_on(stop) and pool):
                return
            take = [pool.pop() for _ in range(min(size, len(pool)))]
            await self._batch([self._new_op(r, "batch") for r in take])

    async def run(self, stop: asyncio.Event) -> None:
        """Grab until ``stop``, the grab deadline (shortly before the expiry) or the last
        receiver; returns when every call in flight answered."""
        c = self.config
        order = list(self.receivers)
        self.rng.shuffle(order)
        cut = round(len(order) * c.envelope_single_share)
        singles, batched = order[:cut], order[cut:]
        # pop() takes from the end: reverse, so the shuffled order is kept.
        singles.reverse()
        batched.reverse()
        window_s = max(1.0, self.grab_until - time.monotonic())
        tasks = []
        if singles:
            pacer = Pacer(len(singles) / window_s)
            tasks += [asyncio.create_task(self._single_caller(stop, pacer, singles))
                      for _ in range(max(1, c.envelope_singles))]
        if batched:
            pacer = Pacer(len(batched) / window_s)
            tasks += [asyncio.create_task(self._batch_caller(stop, pacer, batched))
                      for _ in range(max(1, c.envelope_batches_inflight))]
        started = time.monotonic()
        await asyncio.gather(*tasks)
        self.run_s = time.monotonic() - started

    # -- after the run -----------------------------------------------------------------------

    async def _read(self) -> tuple[pb.Envelope, list[pb.Grab]]:
        """The envelope and all its grabs, page after page."""
        grabs: list[pb.Grab] = []
        token = ""
        while True:
            page = await self._call(self.singles, lambda c, t=token: c.get_envelope(
                self.envelope_id, page_size=1000, page_token=t), 60.0)
            grabs.extend(page.grabs)
            token = page.next_page_token
            if not token:
                return page.envelope, grabs

    async def wait_refunded(self, timeout_s: float) -> bool:
        """Wait (bounded) until the envelope is past its expiry and REFUNDED."""
        remaining = self.expires_at_ms / 1000 - time.time()
        if remaining > 0:
            await asyncio.sleep(remaining)  # the expiry is a time, nothing to poll before it
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                page = await self._call(self.singles, lambda c: c.get_envelope(
                    self.envelope_id, page_size=1), 10.0)
                if page.envelope.state == pb.ENVELOPE_STATE_REFUNDED:
                    self.refunded_at_s = time.monotonic() - self.t0
                    return True
            except (LedgerError, TimeoutError):
                pass  # a read during a failover: ask again
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(CREDIT_POLL_S)

    async def settle(self, timeout_s: float) -> None:
        """Ask every unanswered grab again with its key (GrabEnvelope answers a grab made
        before from its record, even past the expiry) until it is answered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            unknown = [op for op in self.ops if op.result == "unknown"]
            if not unknown:
                return
            remaining = max(0.1, min(GRAB_OP_DEADLINE_S, deadline - time.monotonic()))
            await self._gathered(self._single(op, remaining) for op in unknown)
            for op in unknown:
                op.settled = op.result != "unknown"

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "refused": 0, "unknown": 0}
        for op in self.ops:
            out[op.result] = out.get(op.result, 0) + 1
        return out

    async def _balances(self, wallets: list[str]) -> dict[str, int]:
        values = await self._gathered(self._call(self.singles, lambda c, w=w: c.get_wallet(w),
                                                 60.0) for w in wallets)
        return {w: v.balance_minor for w, v in zip(wallets, values)}

    async def _transfer(self, transfer_id: str) -> dict | None:
        try:
            t = await self._call(self.singles, lambda c: c.get_transfer(transfer_id), 60.0)
        except LedgerError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return {"state": pb.TransferState.Name(t.state), "credited": t.credited,
                "amount": t.amount_minor, "to": t.to_wallet_id,
                "kind": pb.TransferKind.Name(t.kind)}

    async def check(self, credit_settle_s: float = CREDIT_SETTLE_S) -> list[str]:
        """The checks of the drill (after ``settle`` and ``wait_refunded``); returns the
        problems (kept in ``problems``) and keeps the figures in ``evidence``."""
        problems: list[str] = []
        ev: dict = {"envelope_id": self.envelope_id, "shard": self.shard,
                    "counts": self.counts()}
        refusals = [op for op in self.ops if op.result == "refused"]
        unexpected = [f"{op.receiver}: {op.status} {op.detail}" for op in refusals
                      if op.status not in EXPECTED_REFUSALS]
        ev["refusals"] = {s: sum(1 for op in refusals if op.status == s)
                          for s in sorted({op.status for op in refusals})}
        if unexpected:
            problems.append(f"{len(unexpected)} grabs refused although the envelope is "
                            f"open and never sells out: {unexpected[:ENVELOPE_EVIDENCE_MAX]}")
        still = [op.receiver for op in self.ops if op.result == "unknown"]
        if still:
            problems.append(f"{len(still)} grabs never answered definitively, even after the "
                            f"run: {still[:ENVELOPE_EVIDENCE_MAX]}")
        envelope, grabs = await self._read()
        ledger: list[dict] = [{"position": g.position, "receiver": g.receiver_wallet_id,
                               "amount": g.amount_minor, "transfer_id": g.transfer_id}
                              for g in grabs]
        acked = {op.receiver: op.answer() for op in self.ops
                 if op.result == "ok" and not op.settled}
        settled = {op.receiver: op.answer() for op in self.ops
                   if op.result == "ok" and op.settled}
        unanswered = {op.receiver for op in self.ops if op.settled or op.result == "unknown"}
        found, ev["grabs"] = checks.grab_problems(ledger, acked, unanswered, settled,
                                                  set(self.receivers), ENVELOPE_EVIDENCE_MAX)
        problems += found
        grabbed = ev["grabs"]["grabbed_minor"]
        # Credits land asynchronously: wait (bounded) until every receiver holds its share
        # and the sender its refund, then read every grab's transfer.
        share = {g["receiver"]: g["amount"] for g in ledger}
        e = {"state": pb.EnvelopeState.Name(envelope.state),
             "total_minor": envelope.total_minor, "refunded_minor": envelope.refunded_minor,
             "amount_left_minor": envelope.amount_left_minor}
        sender_expected = self.sender_initial - envelope.total_minor + envelope.refunded_minor
        deadline = time.monotonic() + credit_settle_s
        while True:
            balances = await self._balances([self.sender, *self.receivers])
            sender_balance = balances.pop(self.sender)
            if ((sender_balance == sender_expected
                 and all(b == share.get(r, 0) for r, b in balances.items()))
                    or time.monotonic() > deadline):
                break
            await asyncio.sleep(CREDIT_POLL_S)  # credits land asynchronously: poll, bounded
        tids = [g["transfer_id"] for g in ledger]
        transfers = dict(zip(tids, await self._gathered(self._transfer(t) for t in tids)))
        found, ev["credits"] = checks.credit_problems(ledger, balances, transfers,
                                                      ENVELOPE_EVIDENCE_MAX)
        problems += found
        refund = (await self._transfer(envelope.refund_transfer_id)
                  if envelope.refund_transfer_id else None)
        found, ev["refund"] = checks.refund_problems(e, grabbed, self.sender_initial,
                                                     sender_balance, refund)
        problems += found
        ev["refund"].update({
            "refund_transfer_id": envelope.refund_transfer_id,
            "closed_at_ms": envelope.closed_at_ms, "expires_at_ms": envelope.expires_at_ms,
            "refunded_after_expiry_s": (round((envelope.closed_at_ms
                                               - envelope.expires_at_ms) / 1000, 3)
                                        if envelope.closed_at_ms else None),
            "seen_refunded_at_s": (round(self.refunded_at_s, 3)
                                   if self.refunded_at_s is not None else None)})
        ev["shares"] = {"shares": envelope.shares, "shares_left": envelope.shares_left,
                        "sold_out": envelope.state == pb.ENVELOPE_STATE_SOLD_OUT}
        self.problems, self.evidence = problems, ev
        return problems

    def expected_commits(self) -> int:
        """Committed transfers of this drill's envelope in the journals: the sender's deposit,
        the funding, one per grab, and the refund when something was left."""
        grabs = self.evidence.get("grabs", {}).get("grabs_in_ledger", 0)
        refunded = self.evidence.get("refund", {}).get("refunded_minor", 0)
        return 2 + grabs + (1 if refunded else 0)

    def figures(self) -> dict:
        """What the grabbers did: counts, rates, latencies per call kind, the envelope."""
        counts = self.counts()
        c = self.config
        out: dict = {
            "config": {"shares": c.envelope_shares, "total_minor": c.envelope_total_minor,
                       "receivers": c.envelope_receivers, "expiry_s": c.envelope_expiry_s,
                       "single_share": c.envelope_single_share, "batch": c.envelope_batch},
            "envelope_id": self.envelope_id, "escrow_wallet_id": self.escrow_wallet_id,
            "shard": self.shard, "expires_at_s": self.expires_at_s(),
            "grab_until_s": round(self.grab_until - self.t0, 3),
            "refunded_seen_at_s": (round(self.refunded_at_s, 3)
                                   if self.refunded_at_s is not None else None),
            "counts": counts, "run_s": round(self.run_s, 3),
            "ok_per_s": round(counts["ok"] / self.run_s, 1) if self.run_s else None,
            "replayed": sum(1 for op in self.ops if op.replayed),
            "settled_after_run": sum(1 for op in self.ops if op.settled)}
        for via in ("grab", "batch"):
            lat = sorted((op.finished - op.started) * 1000 for op in self.ops
                         if op.via == via and op.result != "unknown" and op.finished > 0)
            out[via] = {"ok": sum(1 for op in self.ops if op.via == via and op.result == "ok"),
                        "p50_ms": round(checks.pct(lat, 0.5), 1) if lat else None,
                        "p99_ms": round(checks.pct(lat, 0.99), 1) if lat else None}
        return out

    def expires_at_s(self) -> float:
        """The expiry in seconds since ``t0`` (the drill's clock)."""
        return round(self.expires_at_ms / 1000 - time.time() + time.monotonic() - self.t0, 3)

    async def close(self) -> None:
        for client in (*self.singles, *self.batches):
            await client.close()


__all__ = ["GrabOp", "HotEnvelope"]
