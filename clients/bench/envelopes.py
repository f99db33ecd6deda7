"""The red-envelope workloads of the bench, through the ledger's ``RedEnvelopeService``.

* hot-envelope:       ONE LUCKY envelope of ``--envelope-receivers`` shares (10,000), grabbed
                      by as many distinct receivers "at once": GrabEnvelopes calls of
                      ``--grab-batch`` items (500), ``--batches-in-flight`` calls in flight,
                      like a gateway batching its users' taps.
* hot-envelope-unary: the same on a second envelope of ``--unary-receivers`` shares, one
                      GrabEnvelope call per receiver from ``--clients`` concurrent clients.
* nye:                New Year's Eve: ``--nye-envelopes`` senders each create one envelope of
                      ``--nye-shares`` shares (LUCKY and FIXED in turn; the envelopes hash to
                      shards all over the ring) while receivers grab them: GrabEnvelopes calls
                      mixing all envelopes created so far.

Every grab's answer is kept. A workload ends when every receiver is credited: ``credited_s``
is the time from the first grab sent until then. It is found without polling every grab
(``credit_probes``): the credits of one shard to another are applied, and acknowledged (which
is what ``GetTransfer(...).credited`` reports), in the order of the debit shard's journal, and
an envelope's positions follow its shard's journal, so per (envelope, receiver shard) polling
the grab with the highest position is enough, and exact. The receivers' shards come from the
operator CLI (``ledgerctl shard-of --shards N``, once, at setup: ``--shards`` must be the
ledger's); if it cannot answer, every grab is polled (``credit_check`` says which). The hot
envelope needs at most one poll per receiver shard (256); nye's grabs are spread over
(envelope, receiver shard) pairs about one grab each, so it polls about every grab, and its
``credited_s`` includes that polling (``credit_wait_s`` and ``credit_polls`` say how much).
Then the grabs are checked (``check_grabs``): every
one OK, one per receiver, positions 0..n-1, the amounts summing to the envelope's total, and
each envelope SOLD_OUT with nothing left (GetEnvelope). A wrong result is the row's verdict
(``correct``: false, ``check``: why) and makes the bench exit non-zero.

Setup (receivers, senders, the envelope of a hot workload, waiting until it is ACTIVE) is
done before the workload's clock and CPU probe start (``EnvelopeWorkload.prepare``). The CPU
per grab is net of the bench's credit polls (``settle`` measures what they cost the ledger).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from clients import LedgerClient, LedgerError
from clients.bench.probe import Probe, Sample
from clients.bench.workloads import CURRENCY, FUND_MINOR, SETUP_CONCURRENCY, Result
from ledgerpb import ledger_pb2 as pb

# The receivers are the bench's wallets (``bw<i>``, as the transfer workloads name them:
# created by their setup when those run, else created here without money); the senders have
# wallets of their own, funded.
RECEIVER_PREFIX = "bw"
HOT_SENDER = "env-sender"
NYE_SENDER_PREFIX = "nye-s"
# Minor units per share on average (total = shares x this): 1.00 CNY a share.
SHARE_MINOR = 100
# The ledger flags the bench's own servers start with (clients.bench.server): an envelope
# of 10,000 shares of 1.00 holds 10,000.00, past the 200.00 and 100 shares of the defaults.
ENVELOPE_TOTAL_MAX_MINOR = 10**10
# Concurrent GetTransfer calls while waiting for the credits, and the pause between rounds.
CREDIT_POLL_CONCURRENCY = 128
CREDIT_POLL_PAUSE_S = 0.02
# The longest the bench waits for every credit after the last grab answered (s): beyond it
# the row says the credits did not all land.
CREDIT_WAIT_S_MAX = 120.0
# Pause of a grab worker after an answer with transient items (resent with the same keys).
TRANSIENT_PAUSE_S = 0.01
# The longest a workload keeps resending transient items (s); then they count as refused.
TRANSIENT_RESEND_S_MAX = 60.0
# Waiting for a new envelope's funding to land before a hot workload starts (s).
ACTIVE_WAIT_S_MAX = 30.0
# ``ledgerctl shard-of`` answering for every receiver, at most (s).
SHARD_OF_TIMEOUT_S = 120
# Concurrent CreateEnvelope calls of the nye workload (its many senders).
NYE_CREATE_CONCURRENCY = 32
# Transient statuses of GrabEnvelopes items: the same item may succeed if resent.
TRANSIENT_STATUSES = frozenset({pb.RESULT_STATUS_REQUEST_IN_FLIGHT,
                                pb.RESULT_STATUS_SHARD_UNAVAILABLE,
                                pb.RESULT_STATUS_OVERLOADED})


def receivers(args) -> list[str]:
    """Every receiver wallet the envelope workloads of this run use: the hot envelope's
    ``--envelope-receivers`` (also nye's pool, which each envelope draws its receivers
    from), and the unary envelope's ``--unary-receivers`` when that runs."""
    return [f"{RECEIVER_PREFIX}{i}" for i in range(shares_max_needed(args))]


def nye_senders(args) -> list[str]:
    return [f"{NYE_SENDER_PREFIX}{i}" for i in range(args.nye_envelopes)]


def shares_max_needed(args) -> int:
    """The most shares (and receivers) an envelope of this run has."""
    unary = args.unary_receivers if "hot-envelope-unary" in args.workloads else 0
    nye = args.nye_shares if "nye" in args.workloads else 0
    return max(args.envelope_receivers, unary, nye)


def receiver_shards(wallets: list[str], shards: int) -> dict[str, int] | None:
    """The shard each wallet hashes to, from ``ledgerctl shard-of`` (the operator CLI, run
    as a subprocess: the bench uses the ledger only as a client and an operator would), or
    None (with a note) if it cannot answer."""
    command = [sys.executable, "-m", "ledger.cli.ledgerctl", "shard-of", "--shards",
               str(shards), "--json", *wallets]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=SHARD_OF_TIMEOUT_S)
        if done.returncode == 0:
            return {w: int(s) for w, s in json.loads(done.stdout).items()}
        why = f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    print(f"(ledgerctl shard-of failed, {why}: polling every grab for its credit)",
          file=sys.stderr)
    return None


async def setup_envelope_wallets(client: LedgerClient, args,
                                 created: set[str]) -> dict[str, int] | None:
    """Create the receivers not in ``created`` already (no money), and create and fund the
    senders (idempotent). Returns the receivers' shards (``receiver_shards``)."""
    sem = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(w: str, fund: bool) -> None:
        async with sem:
            await client.create_wallet(w, CURRENCY, idempotency_key="c-" + w)
            if fund:
                await client.deposit(w, FUND_MINOR, CURRENCY, idempotency_key="d-" + w)
    await asyncio.gather(*(one(w, False) for w in receivers(args) if w not in created),
                         *(one(w, True) for w in [HOT_SENDER, *(
                             nye_senders(args) if "nye" in args.workloads else [])]))
    return await asyncio.to_thread(receiver_shards, receivers(args), args.shards)


# --- what a workload keeps of its grabs --------------------------------------------------

@dataclass
class Call:
    """One grab call: when it was sent and answered (s since the workload started), and the
    grabs it got (OK items, in item order)."""

    sent: float
    answered: float
    grabs: list[pb.Grab]


@dataclass
class Grabs:
    """Everything a grab workload saw."""

    calls: list[Call] = field(default_factory=list)
    first_sent: float | None = None
    last_answered: float = 0.0
    resent: int = 0            # transient items sent again (same key)

    def add(self, call: Call) -> None:
        self.calls.append(call)
        self.first_sent = call.sent if self.first_sent is None else min(self.first_sent,
                                                                        call.sent)
        self.last_answered = max(self.last_answered, call.answered)

    @property
    def all(self) -> list[pb.Grab]:
        return [g for c in self.calls for g in c.grabs]


def credit_probes(grabs: list[pb.Grab], shards: dict[str, int] | None) -> list[pb.Grab]:
    """The grabs whose credits being acknowledged proves every grab credited: per envelope
    and receiver shard, the highest position. Credits from the envelope's shard to another
    are acknowledged in its journal's order, which is the order of the envelope's positions.
    Without ``shards`` (receiver -> shard), every grab is its own probe."""
    last: dict[tuple[str, object], pb.Grab] = {}
    for grab in grabs:
        receiver = grab.receiver_wallet_id
        pair = (grab.envelope_id, shards[receiver] if shards is not None else receiver)
        if pair not in last or grab.position > last[pair].position:
            last[pair] = grab
    return list(last.values())


async def wait_credited(client: LedgerClient, probes: list[pb.Grab], t0: float
                        ) -> tuple[float | None, int]:
    """Poll ``GetTransfer`` of each probe until all say credited: (the time that was seen,
    s since ``t0`` on the monotonic clock, or None if not within ``CREDIT_WAIT_S_MAX``;
    the number of polls)."""
    sem = asyncio.Semaphore(CREDIT_POLL_CONCURRENCY)
    waiting = {g.transfer_id for g in probes}
    polls = 0
    give_up = time.monotonic() + CREDIT_WAIT_S_MAX
    seen_at = time.monotonic()

    async def poll(transfer_id: str) -> None:
        nonlocal polls, seen_at
        async with sem:
            polls += 1
            transfer = await client.get_transfer(transfer_id)
            if transfer.credited:
                waiting.discard(transfer_id)
                seen_at = max(seen_at, time.monotonic())
    while waiting:
        if time.monotonic() > give_up:
            return None, polls
        await asyncio.gather(*(poll(t) for t in list(waiting)))
        if waiting:
            await asyncio.sleep(CREDIT_POLL_PAUSE_S)
    return seen_at - t0, polls


def check_grabs(envelopes: dict[str, pb.Envelope], grabs: list[pb.Grab],
                refused: dict[str, int], final: dict[str, pb.Envelope] | None = None
                ) -> tuple[bool, str]:
    """The verdict on a workload's grabs: (correct, what was checked or what is wrong).

    Every receiver's grab answered OK (``refused`` empty), one grab per receiver and per
    position of each envelope, positions 0..shares-1, the amounts (each at least 1) summing
    to the envelope's total; ``final`` (GetEnvelope after the run, if read): SOLD_OUT with
    nothing left.
    """
    problems: list[str] = []
    if refused:
        problems.append("not OK: " + ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))
    by_envelope: dict[str, list[pb.Grab]] = collections.defaultdict(list)
    for g in grabs:
        by_envelope[g.envelope_id].append(g)
    unknown = set(by_envelope) - set(envelopes)
    if unknown:
        problems.append(f"grabs of {len(unknown)} unknown envelopes")
    for envelope_id, envelope in envelopes.items():
        mine = by_envelope.get(envelope_id, [])
        positions = sorted(g.position for g in mine)
        receivers_seen = {g.receiver_wallet_id for g in mine}
        total = sum(g.amount_minor for g in mine)
        short = envelope_id[:9]
        if len(receivers_seen) != len(mine):
            problems.append(f"{short}: {len(mine) - len(receivers_seen)} duplicate receivers")
        if positions != list(range(envelope.shares)):
            dup = len(positions) - len(set(positions))
            problems.append(f"{short}: {len(mine)} grabs of {envelope.shares} shares"
                            + (f", {dup} duplicate positions" if dup else ""))
        if total != envelope.total_minor:
            problems.append(f"{short}: amounts sum to {total}, total {envelope.total_minor}")
        if any(g.amount_minor < 1 for g in mine):
            problems.append(f"{short}: a share below 1")
        if final is not None:
            seen = final.get(envelope_id)
            if seen is None or seen.state != pb.ENVELOPE_STATE_SOLD_OUT \
                    or seen.amount_left_minor != 0 or seen.shares_left != 0:
                problems.append(f"{short}: GetEnvelope says "
                                f"{pb.EnvelopeState.Name(seen.state) if seen else 'nothing'}")
    if problems:
        shown = problems[:5] + ([f"... {len(problems) - 5} more"] if len(problems) > 5 else [])
        return False, "; ".join(shown)
    return True, (f"{len(grabs)} grabs OK, one per receiver, positions 0..n-1, sums = totals"
                  f"{', SOLD_OUT' if final is not None else ''}, {len(envelopes)} envelope"
                  f"{'s' if len(envelopes) != 1 else ''}")


# --- running grabs ---------------------------------------------------------------------------

async def grab_in_batches(client: LedgerClient, pending: list[pb.GrabEnvelopeRequest],
                          args, result: Result, grabs: Grabs, t0: float,
                          more: Callable[[], bool] = lambda: False,
                          shuffle: random.Random | None = None) -> None:
    """``args.batches_in_flight`` workers sending GrabEnvelopes calls of up to
    ``args.grab_batch`` items taken from ``pending`` until it is empty and ``more()`` says
    no more items will come. Transient items go back to ``pending`` (same key); other
    refusals are counted in ``result``. ``shuffle`` mixes ``pending`` before each call."""
    in_flight = 0
    give_up = time.monotonic() + TRANSIENT_RESEND_S_MAX

    async def worker() -> None:
        nonlocal in_flight
        while pending or in_flight or more():
            if not pending:
                await asyncio.sleep(0.002)
                continue
            if shuffle is not None:
                shuffle.shuffle(pending)
            items = pending[-args.grab_batch:]
            del pending[-args.grab_batch:]
            in_flight += 1
            sent = time.monotonic() - t0
            started = time.perf_counter()
            try:
                response = await client.grab_envelopes(items)
            finally:
                in_flight -= 1
            latency_ms = (time.perf_counter() - started) * 1000
            answered = time.monotonic() - t0
            ok: list[pb.Grab] = []
            resend = []
            for item, r in zip(items, response.results):
                if r.status == pb.RESULT_STATUS_OK:
                    ok.append(r.grab)
                elif r.status in TRANSIENT_STATUSES and time.monotonic() < give_up:
                    resend.append(item)
                else:
                    result.refuse(pb.ResultStatus.Name(r.status))
            grabs.add(Call(sent, answered, ok))
            result.committed += len(ok)
            result.latencies_ms.append(latency_ms)
            result.samples.append((answered, latency_ms, len(ok)))
            if resend:
                grabs.resent += len(resend)
                pending.extend(resend)
                await asyncio.sleep(TRANSIENT_PAUSE_S)
    await asyncio.gather(*(worker() for _ in range(args.batches_in_flight)))


async def grab_unary(client: LedgerClient, pending: list[pb.GrabEnvelopeRequest], args,
                     result: Result, grabs: Grabs, t0: float) -> None:
    """``args.clients`` workers each sending one GrabEnvelope at a time (the client resends
    transient answers with the same key)."""

    async def worker() -> None:
        while pending:
            item = pending.pop()
            sent = time.monotonic() - t0
            started = time.perf_counter()
            ok: list[pb.Grab] = []
            try:
                response = await client.grab_envelope(item.envelope_id,
                                                      item.receiver_wallet_id,
                                                      idempotency_key=item.idempotency_key)
                ok.append(response.grab)
            except LedgerError as exc:
                result.refuse(exc.status or exc.code.name)
            latency_ms = (time.perf_counter() - started) * 1000
            answered = time.monotonic() - t0
            grabs.add(Call(sent, answered, ok))
            result.committed += len(ok)
            result.latencies_ms.append(latency_ms)
            result.samples.append((answered, latency_ms, len(ok)))
    await asyncio.gather(*(worker() for _ in range(args.clients)))


@dataclass
class GrabRun:
    """What ``settle`` needs of a finished grab workload (kept on ``Result.state``)."""

    envelopes: dict[str, pb.Envelope]
    grabs: Grabs
    probes: list[pb.Grab]
    credited: bool


async def finish(client: LedgerClient, result: Result, grabs: Grabs,
                 envelopes: dict[str, pb.Envelope], shards: dict[str, int] | None,
                 t0: float) -> None:
    """Wait until every receiver is credited (the end of the measured run) and fill the
    timing fields of ``result``; ``settle`` checks the grabs afterwards."""
    first = grabs.first_sent or 0.0
    result.seconds = grabs.last_answered - first
    probes = credit_probes(grabs.all, shards)
    credited_at, polls = await wait_credited(client, probes, t0)
    credited_s = credited_at - first if credited_at is not None else None
    result.state = GrabRun(envelopes, grabs, probes, credited_at is not None)
    result.fields.update({
        "envelopes": len(envelopes), "grabs": result.committed,
        "credited_s": round(credited_s, 3) if credited_s is not None else None,
        "credits_per_s": round(result.committed / credited_s, 1) if credited_s else None,
        # From the last grab answered until every credit was seen: the crediting's tail
        # plus the polling (credit_polls GetTransfer calls, CREDIT_POLL_CONCURRENCY at once).
        "credit_wait_s": round(credited_at - grabs.last_answered, 3)
        if credited_at is not None else None,
        "credit_polls": polls, "credit_probes": len(probes),
        "credit_check": ("last grab per (envelope, receiver shard)" if shards is not None
                         else "every grab"),
        "resent": grabs.resent})


async def settle(client: LedgerClient, probe: Probe, result: Result, before: Sample,
                 after: Sample) -> Sample:
    """After a grab workload's closing sample: take the CPU of the bench's own credit polls
    out of it, and check the grabs (``check_grabs``, with GetEnvelope of each envelope).

    The polls' CPU is measured by polling every probe once more (all credited now: one
    GetTransfer each, as the polls that saw them credited) and scaled to ``credit_polls``;
    the row's CPU figures are net of it and ``poll_cpu_us_per_grab`` says how much it was.
    Returns ``after`` less that CPU (never below ``before``: the clock ticks are coarse).
    """
    run: GrabRun = result.state
    polls = result.fields["credit_polls"]
    if run.probes and polls:
        start = probe.sample()
        await wait_credited(client, run.probes, time.monotonic())
        again = probe.sample()
        scale = polls / len(run.probes)
        ledger = min((again.ledger_cpu_s - start.ledger_cpu_s) * scale,
                     after.ledger_cpu_s - before.ledger_cpu_s)
        store = min((again.store_cpu_s - start.store_cpu_s) * scale,
                    after.store_cpu_s - before.store_cpu_s)
        bench = min((again.bench_cpu_s - start.bench_cpu_s) * scale,
                    after.bench_cpu_s - before.bench_cpu_s)
        if probe.has_ledger_cpu and result.committed:
            result.fields["poll_cpu_us_per_grab"] = round(ledger * 1e6 / result.committed, 1)
        after = dataclasses.replace(after, ledger_cpu_s=after.ledger_cpu_s - ledger,
                                    store_cpu_s=after.store_cpu_s - store,
                                    bench_cpu_s=after.bench_cpu_s - bench)
    final = {}
    for envelope_id in run.envelopes:
        final[envelope_id] = (await client.get_envelope(envelope_id, page_size=1)).envelope
    correct, check = check_grabs(run.envelopes, run.grabs.all, result.refusals, final)
    if not run.credited:
        correct, check = False, (f"credits not all acknowledged within "
                                 f"{CREDIT_WAIT_S_MAX:.0f} s; {check}")
    result.fields.update(correct=correct, check=check)
    return after


async def create_envelope(client: LedgerClient, sender: str, shares: int, kind: str,
                          key: str) -> pb.Envelope:
    response = await client.create_envelope(sender, shares * SHARE_MINOR, shares, kind,
                                            CURRENCY, memo="ledger-bench",
                                            idempotency_key=key)
    return response.envelope


async def wait_active(client: LedgerClient, envelope: pb.Envelope) -> pb.Envelope:
    """The envelope once its funding landed (ACTIVE), so a hot workload's grabs all count."""
    give_up = time.monotonic() + ACTIVE_WAIT_S_MAX
    while envelope.state == pb.ENVELOPE_STATE_FUNDING:
        if time.monotonic() > give_up:
            raise SystemExit(f"envelope {envelope.envelope_id} not funded within "
                             f"{ACTIVE_WAIT_S_MAX:.0f} s")
        await asyncio.sleep(0.05)
        envelope = (await client.get_envelope(envelope.envelope_id, page_size=1)).envelope
    if envelope.state != pb.ENVELOPE_STATE_ACTIVE:
        raise SystemExit(f"envelope {envelope.envelope_id} is "
                         f"{pb.EnvelopeState.Name(envelope.state)}, not ACTIVE")
    return envelope


# --- the workloads ---------------------------------------------------------------------------

@dataclass
class Plan:
    """What a workload's ``prepare`` hands to its ``run``: the receivers' shards (None:
    unknown, poll every grab)."""

    shards: dict[str, int] | None


@dataclass
class HotPlan(Plan):
    envelope: pb.Envelope
    items: list[pb.GrabEnvelopeRequest]


async def _prepare_hot(client: LedgerClient, args, shards: dict[str, int] | None, count: int,
                       tag: str) -> HotPlan:
    envelope = await create_envelope(client, HOT_SENDER, count, "LUCKY",
                                     f"{args.run_id}{tag}")
    envelope = await wait_active(client, envelope)
    items = [pb.GrabEnvelopeRequest(idempotency_key=f"{args.run_id}{tag}{i}",
                                    envelope_id=envelope.envelope_id, receiver_wallet_id=w)
             for i, w in enumerate(receivers(args)[:count])]
    items.reverse()  # workers take from the end: receivers in order
    return HotPlan(shards, envelope, items)


async def prepare_hot(client: LedgerClient, args, rng: random.Random,
                      shards: dict[str, int] | None) -> HotPlan:
    return await _prepare_hot(client, args, shards, args.envelope_receivers, "hot")


async def prepare_hot_unary(client: LedgerClient, args, rng: random.Random,
                            shards: dict[str, int] | None) -> HotPlan:
    return await _prepare_hot(client, args, shards, args.unary_receivers, "hotu")


async def run_hot(client: LedgerClient, plan: HotPlan, args, rng: random.Random) -> Result:
    """Every receiver grabs the one envelope: GrabEnvelopes batches, then every credit."""
    result = Result("hot-envelope", family="envelope")
    grabs = Grabs()
    t0 = time.monotonic()
    await grab_in_batches(client, plan.items, args, result, grabs, t0)
    await finish(client, result, grabs, {plan.envelope.envelope_id: plan.envelope},
                 plan.shards, t0)
    result.fields.update(receivers=args.envelope_receivers, grab_batch=args.grab_batch,
                         batches_in_flight=args.batches_in_flight)
    return result


async def run_hot_unary(client: LedgerClient, plan: HotPlan, args,
                        rng: random.Random) -> Result:
    """Every receiver grabs the second envelope with its own GrabEnvelope call."""
    result = Result("hot-envelope-unary", family="envelope")
    grabs = Grabs()
    t0 = time.monotonic()
    await grab_unary(client, plan.items, args, result, grabs, t0)
    await finish(client, result, grabs, {plan.envelope.envelope_id: plan.envelope},
                 plan.shards, t0)
    result.fields.update(receivers=args.unary_receivers, clients=args.clients)
    return result


async def prepare_nye(client: LedgerClient, args, rng: random.Random,
                      shards: dict[str, int] | None) -> Plan:
    return Plan(shards)


async def run_nye(client: LedgerClient, plan: Plan, args, rng: random.Random) -> Result:
    """Senders create envelopes (``NYE_CREATE_CONCURRENCY`` at a time) while receivers grab
    every envelope already created, in GrabEnvelopes calls mixing envelopes."""
    result = Result("nye", family="envelope")
    grabs = Grabs()
    pool = receivers(args)[:max(args.envelope_receivers, args.nye_shares)]
    envelopes: dict[str, pb.Envelope] = {}
    pending: list[pb.GrabEnvelopeRequest] = []
    creating = len(nye_senders(args))
    created_at = 0.0
    sem = asyncio.Semaphore(NYE_CREATE_CONCURRENCY)
    t0 = time.monotonic()

    async def create(i: int, sender: str) -> None:
        nonlocal creating, created_at
        try:
            async with sem:
                kind = "LUCKY" if i % 2 == 0 else "FIXED"
                envelope = await create_envelope(client, sender, args.nye_shares, kind,
                                                 f"{args.run_id}nye{i}")
            envelopes[envelope.envelope_id] = envelope
            created_at = max(created_at, time.monotonic() - t0)
            for j, w in enumerate(rng.sample(pool, args.nye_shares)):
                pending.append(pb.GrabEnvelopeRequest(
                    idempotency_key=f"{args.run_id}nye{i}g{j}",
                    envelope_id=envelope.envelope_id, receiver_wallet_id=w))
        finally:
            creating -= 1
    await asyncio.gather(
        *(create(i, s) for i, s in enumerate(nye_senders(args))),
        grab_in_batches(client, pending, args, result, grabs, t0, more=lambda: creating > 0,
                        shuffle=rng))
    await finish(client, result, grabs, envelopes, plan.shards, t0)
    result.fields["receivers"] = len({g.receiver_wallet_id for g in grabs.all})
    result.fields["created_s"] = round(created_at, 3)
    result.fields["created_per_s"] = round(len(envelopes) / created_at, 1) if created_at \
        else None
    return result


@dataclass(frozen=True)
class EnvelopeWorkload:
    """``prepare`` runs before the clock and the CPU probe; ``run`` is measured."""

    prepare: Callable[[LedgerClient, Any, random.Random, dict[str, int] | None],
                      Awaitable[Any]]
    run: Callable[[LedgerClient, Any, Any, random.Random], Awaitable[Result]]


# The envelope workloads by name (opt-in: ``--workloads``). The naive
# baseline ``naive-envelope`` runs in the bench process (``clients.bench.naive``).
ENVELOPE_WORKLOADS = {
    "hot-envelope": EnvelopeWorkload(prepare_hot, run_hot),
    "hot-envelope-unary": EnvelopeWorkload(prepare_hot_unary, run_hot_unary),
    "nye": EnvelopeWorkload(prepare_nye, run_nye),
}
NAIVE_ENVELOPE = "naive-envelope"
