"""Idempotency under a storm of concurrent duplicates, on real ``ledgerd node`` processes.

Deposits, same-shard transfers, cross-shard transfers and linked chains across shards are
each sent 1-5 times AT ONCE (chains 2-5 times; then more chains as two simultaneous copies,
one per node), the copies spread over two nodes (so duplicates race both inside
one coordinator and between coordinators, meeting on the debit shard's owner). Some keys are
also sent, concurrently, with a different payload (another amount, destination or memo).

Proves that nothing executes twice and every answer tells the truth:

* per key exactly one answer (over the storm and one resolving retry) reports a fresh
  execution; every other copy of the winning payload gets the replayed record or ABORTED
  REQUEST_IN_FLIGHT; a copy with a different payload gets ALREADY_EXISTS naming the field that
  differs (or REQUEST_IN_FLIGHT), never an execution; no item of a chain is reported OK unless
  the chain committed (copies of a chain racing on two coordinators can each prepare part of
  it; either may then decide it, and the primary keeps the first decision);
* balances equal one application per distinct key (and each chain's items all or none), with
  nothing held; GetTransfer of each id is COMMITTED with the winning payload;
* sending everything again moves nothing; reconciliation of the keyspace is clean and counts
  exactly one commit per distinct key (legs_once counts commits per transfer id).

`test_key_reused_with_debit_wallet_on_another_shard` reproduces a bug found while writing this
file, now fixed: a key reused with a payload whose DEBIT wallet is on another shard is refused
as well (the key is claimed on its own shard before anything executes).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc
import pytest

from clients import LedgerClient, LedgerError
from redledger_client import TRANSIENT_CODES
from clients.bank import MultiClient
from clients.harness import Deployment
from coordinator.coordinator import transfer_id_for
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledgerpb import ledger_pb2 as pb
from ledger.reconcile import reconcile
from shard_router import shard_of
from tests.crash.test_failpoints import start_deployment

SHARDS = 16
NODES = 2
CURRENCY = "CNY"
CALLER = "storm"
SEED = 99
FUNDS_MINOR = 10_000
WALLET_SHARDS = 4      # wallets on this many shards, WALLETS_PER_SHARD on each
WALLETS_PER_SHARD = 2
DEPOSITS = 6
SAME_SHARD = 8
CROSS_SHARD = 10
COPIES_MAX = 5
CHAINS = 4
# Chains sent as exactly two simultaneous copies, one to each node, after the storm: the race
# in which each coordinator may prepare a part of the chain.
DUELS = 6
CALL_TIMEOUT_S = 30.0
ANSWER_DEADLINE_S = 60.0
SETTLE_DEADLINE_S = 30.0
POLL_S = 0.1


@dataclass(frozen=True)
class Payload:
    src: str        # empty for a deposit
    dst: str
    amount: int
    memo: str = ""


@dataclass
class Answer:
    ok: bool
    replayed: bool = False
    transfer: pb.Transfer | None = None
    code: grpc.StatusCode | None = None
    status: str = ""
    field: str = ""


@dataclass
class Request:
    key: str
    kind: str                      # deposit | transfer
    payloads: list[Payload]        # [original] or [original, variant]
    differs: str = ""              # the field in which the variant differs
    copies: list[int] = field(default_factory=list)   # payload index of each copy
    answers: list[tuple[int, Answer]] = field(default_factory=list)

    @property
    def debit_shard(self) -> int:
        original = self.payloads[0]
        return shard_of(original.dst if self.kind == "deposit" else original.src, SHARDS)

    @property
    def transfer_id(self) -> str:
        return transfer_id_for(self.debit_shard, CALLER, self.key)


def wallet_layout() -> list[list[str]]:
    """WALLET_SHARDS groups of WALLETS_PER_SHARD wallet ids, each group on its own shard."""
    groups: dict[int, list[str]] = {}
    for i in range(10_000):
        wallet = f"st-{i}"
        group = groups.setdefault(shard_of(wallet, SHARDS), [])
        if len(group) < WALLETS_PER_SHARD:
            group.append(wallet)
        full = [g for g in groups.values() if len(g) == WALLETS_PER_SHARD]
        if len(full) == WALLET_SHARDS:
            return full
    raise AssertionError("no layout found")


def plan(rng: random.Random, groups: list[list[str]]) -> list[Request]:
    wallets = [w for g in groups for w in g]
    requests: list[Request] = []
    for i in range(DEPOSITS):
        requests.append(Request(f"dep-{i}", "deposit",
                                [Payload("", rng.choice(wallets), rng.randint(1, 50))]))
    for i in range(SAME_SHARD):
        src, dst = rng.sample(rng.choice(groups), 2)
        requests.append(Request(f"same-{i}", "transfer", [Payload(src, dst, rng.randint(1, 50))]))
    for i in range(CROSS_SHARD):
        g1, g2 = rng.sample(groups, 2)
        requests.append(Request(f"cross-{i}", "transfer",
                                [Payload(rng.choice(g1), rng.choice(g2), rng.randint(1, 50))]))
    # Variants: the same key with one field changed (the debit wallet never changes: see the
    # last test of this file).
    variants = [(requests[0], "amount_minor"), (requests[DEPOSITS], "amount_minor"),
                (requests[DEPOSITS + 1], "memo"), (requests[DEPOSITS + SAME_SHARD], "amount_minor"),
                (requests[DEPOSITS + SAME_SHARD + 1], "to_wallet_id"),
                (requests[DEPOSITS + SAME_SHARD + 2], "memo")]
    for request, differs in variants:
        p = request.payloads[0]
        if differs == "amount_minor":
            variant = Payload(p.src, p.dst, p.amount + 1, p.memo)
        elif differs == "memo":
            variant = Payload(p.src, p.dst, p.amount, "other memo")
        else:
            variant = Payload(p.src, next(w for w in wallets if w not in (p.src, p.dst)),
                              p.amount, p.memo)
        request.payloads.append(variant)
        request.differs = differs
    for request in requests:
        request.copies = [0] * rng.randint(1, COPIES_MAX)
        if len(request.payloads) == 2:
            request.copies += [1] * rng.randint(1, 2)
            rng.shuffle(request.copies)
    return requests


async def send(client: LedgerClient, request: Request, payload: Payload) -> Answer:
    try:
        if request.kind == "deposit":
            response = await client.deposit(payload.dst, payload.amount, CURRENCY, payload.memo,
                                            idempotency_key=request.key)
        else:
            response = await client.transfer(payload.src, payload.dst, payload.amount, CURRENCY,
                                             payload.memo, idempotency_key=request.key)
        return Answer(True, response.replayed, response.transfer)
    except LedgerError as exc:
        return Answer(False, code=exc.code, status=exc.status, field=exc.field)


def chain_items(groups: list[list[str]], number: int) -> list[pb.TransferRequest]:
    """A linked chain of three cross-shard items with debit wallets on three shards."""
    moves = [(groups[0][0], groups[1][1], 70 + number), (groups[1][0], groups[2][1], 80),
             (groups[2][0], groups[3][1], 90)]
    return [pb.TransferRequest(idempotency_key=f"chain{number}-{i}", from_wallet_id=s,
                               to_wallet_id=d, amount_minor=a, currency=CURRENCY,
                               linked=i < len(moves) - 1)
            for i, (s, d, a) in enumerate(moves)]


def in_flight(answer: Answer) -> bool:
    return (answer.code == grpc.StatusCode.ABORTED
            and answer.status == "RESULT_STATUS_REQUEST_IN_FLIGHT")


def check_copy(request: Request, index: int, answer: Answer, winner: int) -> list[str]:
    """What is wrong with one copy's answer, given the payload the ledger recorded."""
    what = f"{request.key} copy of payload {index}"
    if in_flight(answer):
        return []
    if index == winner:
        if not answer.ok:
            return [f"{what}: {answer.code} {answer.status} {answer.field}"]
        t = answer.transfer
        payload = request.payloads[winner]
        if (t.transfer_id, t.state, t.amount_minor, t.memo) != (
                request.transfer_id, pb.TRANSFER_STATE_COMMITTED, payload.amount, payload.memo):
            return [f"{what}: answered {t}"]
        return []
    if answer.ok:
        return [f"{what}: EXECUTED although payload {winner} holds the key: {answer.transfer}"]
    if (answer.code, answer.status, answer.field) != (
            grpc.StatusCode.ALREADY_EXISTS, "RESULT_STATUS_IDEMPOTENCY_KEY_REUSED",
            request.differs):
        return [f"{what}: {answer.code} {answer.status} field {answer.field!r}, expected "
                f"ALREADY_EXISTS naming {request.differs}"]
    return []


async def resolve(clients: list[LedgerClient], request: Request) -> Answer:
    """The original payload, sent until the answer is definitive (not transient)."""
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    for attempt in range(10_000):
        answer = await send(clients[attempt % len(clients)], request, request.payloads[0])
        if answer.ok or answer.code not in TRANSIENT_CODES:
            return answer
        assert time.monotonic() < deadline, (request.key, answer)
        await asyncio.sleep(POLL_S)
    raise AssertionError("unreachable")


async def chain_until_definitive(client: MultiClient, items: list[pb.TransferRequest]
                                 ) -> list[pb.TransferResult]:
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    transient = {pb.RESULT_STATUS_REQUEST_IN_FLIGHT, pb.RESULT_STATUS_SHARD_UNAVAILABLE,
                 pb.RESULT_STATUS_OVERLOADED}
    while True:
        results = list((await client.call(lambda c: c.batch_transfer(items))).results)
        if not any(r.status in transient for r in results):
            return results
        assert time.monotonic() < deadline, [pb.ResultStatus.Name(r.status) for r in results]
        await asyncio.sleep(POLL_S)


@pytest.mark.real
@pytest.mark.timeout(300)
async def test_concurrent_duplicates_execute_once(local_cluster, keyspaces):
    region = local_cluster.regions[0]
    keyspace = await keyspaces.take({region: 1}, "storm")
    deployment = Deployment(local_cluster, regions=[region], nodes_per_region=NODES,
                            shards=SHARDS,
                            keyspace=keyspace.name)
    rng = random.Random(SEED)
    groups = wallet_layout()
    wallets = [w for g in groups for w in g]
    requests = plan(rng, groups)
    chains = [chain_items(groups, number) for number in range(CHAINS + DUELS)]
    chain_copies = [rng.randint(2, COPIES_MAX) for _ in chains]
    clients: list[LedgerClient] = []
    multi = None
    store = None
    try:
        start_deployment(deployment)
        clients = [LedgerClient(a, caller=CALLER, timeout_s=CALL_TIMEOUT_S, retries=False)
                   for a in deployment.addresses]
        multi = MultiClient(deployment.addresses, CALLER)
        for w in wallets:
            await multi.call(lambda c, w=w: c.create_wallet(w, CURRENCY,
                                                            idempotency_key=f"create-{w}"))
            await multi.call(lambda c, w=w: c.deposit(w, FUNDS_MINOR, CURRENCY,
                                                      idempotency_key=f"fund-{w}"))

        # The storm: every copy of every request at once, copies alternating between nodes.
        async def one(request: Request, n: int, index: int) -> None:
            answer = await send(clients[n % NODES], request, request.payloads[index])
            request.answers.append((index, answer))

        chain_answers: list[list[list[pb.TransferResult]]] = [[] for _ in chains]

        async def one_chain(number: int, n: int) -> None:
            response = await clients[n % NODES].batch_transfer(chains[number])
            chain_answers[number].append(list(response.results))

        storm = [one(r, n, index) for r in requests for n, index in enumerate(r.copies)]
        storm += [one_chain(number, n) for number, copies in enumerate(chain_copies)
                  for n in range(copies)]
        rng.shuffle(storm)
        await asyncio.gather(*storm)
        await asyncio.gather(*(one_chain(number, n) for number in range(CHAINS, CHAINS + DUELS)
                               for n in range(NODES)))

        # Resolve: the original payload once more (retried until definitive), then read what
        # the ledger recorded under each key.
        problems: list[str] = []
        winners: dict[str, int] = {}
        for request in requests:
            request.answers.append((0, await resolve(clients, request)))
            recorded = await multi.call(lambda c, r=request: c.get_transfer(r.transfer_id))
            matches = [i for i, p in enumerate(request.payloads)
                       if (recorded.amount_minor, recorded.to_wallet_id, recorded.memo)
                       == (p.amount, p.dst, p.memo)]
            assert recorded.state == pb.TRANSFER_STATE_COMMITTED and len(matches) == 1, (
                request.key, recorded)
            winners[request.key] = winner = matches[0]
            for index, answer in request.answers:
                problems += check_copy(request, index, answer, winner)
            fresh = sum(1 for _, a in request.answers if a.ok and not a.replayed)
            if fresh != 1:
                problems.append(f"{request.key}: {fresh} answers report a fresh execution")
        committed: list[bool] = []
        for chain, answers in zip(chains, chain_answers):
            final = await chain_until_definitive(multi, chain)
            done = [r.status for r in final] == [pb.RESULT_STATUS_OK] * len(chain)
            committed.append(done)
            if not done and [r.status for r in final] != (
                    [pb.RESULT_STATUS_LINKED_ITEM_FAILED] * len(chain)):
                problems.append(f"chain ended neither committed nor aborted: {final}")
            for results in answers:
                for item, result in zip(chain, results):
                    if result.status == pb.RESULT_STATUS_OK and (
                            not done or result.transfer.state != pb.TRANSFER_STATE_COMMITTED):
                        problems.append(
                            f"{item.idempotency_key}: answered OK with state "
                            f"{pb.TransferState.Name(result.transfer.state)}; the chain "
                            f"{'committed' if done else 'aborted'}")
            for i, item in enumerate(chain):
                fresh = sum(1 for results in answers + [final]
                            if results[i].status == pb.RESULT_STATUS_OK
                            and not results[i].replayed)
                if fresh > 1:
                    problems.append(f"{item.idempotency_key}: {fresh} fresh executions")
        assert problems == [], problems
        storm_answers = [a for r in requests for _, a in r.answers[:-1]]
        stats = {"copies": len(storm_answers),
                 "replayed": sum(1 for a in storm_answers if a.ok and a.replayed),
                 "in_flight": sum(1 for a in storm_answers if in_flight(a)),
                 "key_reused": sum(1 for a in storm_answers
                                   if a.status == "RESULT_STATUS_IDEMPOTENCY_KEY_REUSED"),
                 "variant_won": sum(1 for w in winners.values() if w == 1),
                 "chains_committed": sum(committed),
                 "chains_split": sum(1 for answers in chain_answers if any(
                     len({r.status for r in results}) > 1 for results in answers)),
                 "chain_answers": [[[pb.ResultStatus.Name(r.status)[14:] for r in results]
                                    for results in answers] for answers in chain_answers]}
        print(f"storm: {stats}")
        # The storm really raced duplicates: some were answered from the record, and some
        # differing payloads were refused.
        assert stats["replayed"] + stats["in_flight"] > 0 and stats["key_reused"] > 0, stats

        # Balances: one application per distinct key (the winner's payload), chain all or none.
        expected = {w: FUNDS_MINOR for w in wallets}
        for request in requests:
            payload = request.payloads[winners[request.key]]
            if payload.src:
                expected[payload.src] -= payload.amount
            expected[payload.dst] += payload.amount
        for chain, done in zip(chains, committed):
            for item in chain if done else []:
                expected[item.from_wallet_id] -= item.amount_minor
                expected[item.to_wallet_id] += item.amount_minor
        want = {w: (b, 0) for w, b in expected.items()}

        async def balances() -> dict:
            deadline = time.monotonic() + SETTLE_DEADLINE_S
            while True:
                seen = {}
                for w in wallets:
                    wallet = await multi.call(lambda c, w=w: c.get_wallet(w))
                    seen[w] = (wallet.balance_minor, wallet.held_minor)
                if seen == want or time.monotonic() > deadline:
                    return seen
                await asyncio.sleep(POLL_S)

        assert await balances() == want

        # Everything again, at once: only records come back, nothing moves.
        again = [send(clients[n % NODES], r, r.payloads[index])
                 for r in requests for n, index in enumerate(r.copies)]
        answers = await asyncio.gather(*again)
        pairs = [(r, index) for r in requests for index in r.copies]
        for (request, index), answer in zip(pairs, answers):
            if index == winners[request.key] and not in_flight(answer):
                assert answer.ok and answer.replayed, (request.key, answer)
            problems += check_copy(request, index, answer, winners[request.key])
        assert problems == [], problems
        for chain in chains:
            assert all(r.replayed for r in await chain_until_definitive(multi, chain))
        assert await balances() == want

        from ledger.store.cassandra import CassandraStore
        store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
        report = await reconcile(store, SHARDS,
                                 now_ms=time.time_ns() // 1_000_000 + RECOVERY_TIMEOUT_MS + 1)
        assert report.clean, report.findings
        assert report.transfers_committed == (
            len(wallets) + len(requests)
            + sum(len(chain) for chain, done in zip(chains, committed) if done))
    finally:
        for client in clients:
            await client.close()
        if multi is not None:
            await multi.close()
        if store is not None:
            await store.close()
        await asyncio.to_thread(deployment.stop)
        await keyspaces.give_back(keyspace)


async def test_key_reused_with_debit_wallet_on_another_shard(tmp_path):
    """A key is claimed on its own shard before anything executes, so a reuse whose debit
    wallet lives on another shard is refused too (found by this test; fixed by ClaimKey)."""
    from ledger import server

    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        async with LedgerClient(f"127.0.0.1:{running.port}", caller=CALLER,
                                retries=False) as client:
            a, b, dst = "alice", "bob", "carol"
            assert len({shard_of(w, SHARDS) for w in (a, b, dst)}) == 3
            for w in (a, b, dst):
                await client.create_wallet(w, CURRENCY)
                await client.deposit(w, 1_000, CURRENCY)
            await client.transfer(a, dst, 100, CURRENCY, idempotency_key="reused")
            with pytest.raises(LedgerError) as reused:
                await client.transfer(b, dst, 100, CURRENCY, idempotency_key="reused")
            assert (reused.value.code, reused.value.field) == (grpc.StatusCode.ALREADY_EXISTS,
                                                               "from_wallet_id")
            with pytest.raises(LedgerError) as reused:
                await client.deposit(dst, 5, CURRENCY, idempotency_key="reused")
            assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS
            again = await client.transfer(a, dst, 100, CURRENCY, idempotency_key="reused")
            assert again.replayed
            balances = {w: (await client.get_wallet(w)).balance_minor for w in (a, b, dst)}
            assert balances == {a: 900, b: 1_000, dst: 1_100}
    finally:
        await running.close(grace_s=0.1)


class _DelayPrepares:
    """A ``ShardExecutor`` that holds back PrepareLinked commands to some shards (an injected
    network delay), so that two coordinators each prepare a different part of a chain."""

    def __init__(self, inner, shards: set[int], delay_s: float) -> None:
        self._inner = inner
        self._shards = shards
        self._delay_s = delay_s

    async def execute(self, shard: int, commands: list, wait_credit: bool = False,
                      deadline: float | None = None):
        from ledger.core.model import PrepareLinked

        if shard in self._shards and any(type(c) is PrepareLinked for c in commands):
            await asyncio.sleep(self._delay_s)
        return await self._inner.execute(shard, commands, wait_credit, deadline)


async def test_chain_retried_on_two_live_coordinators_still_commits(tmp_path):
    """Found by this file, now fixed: two coordinators running the same chain each prepare
    part of it; a prepare answered "pending under the same chain" lets either one decide, so
    the valid chain commits instead of being aborted by the participants."""
    from coordinator.coordinator import Coordinator, TransferItem
    from ledger import server

    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        router = running.node.router
        groups = wallet_layout()
        wallets = [w for g in groups for w in g]
        for w in wallets:
            assert (await running.coordinator.create_wallet(CALLER, f"c-{w}", w, CURRENCY)).ok
            assert (await running.coordinator.deposit(CALLER, f"f-{w}", w, 1_000, CURRENCY)).ok
        items = [TransferItem(f"duel-{i}", src, dst, 10, CURRENCY, linked=i < 2)
                 for i, (src, dst) in enumerate([(groups[0][0], groups[1][1]),
                                                 (groups[1][0], groups[2][1]),
                                                 (groups[2][0], groups[3][1])])]
        debit = [shard_of(item.from_wallet_id, SHARDS) for item in items]
        first = Coordinator(_DelayPrepares(router, {debit[1]}, 0.3), running.store, SHARDS)
        second = Coordinator(_DelayPrepares(router, {debit[0], debit[2]}, 0.3), running.store,
                             SHARDS)
        answers = await asyncio.gather(first.batch_transfer(CALLER, items),
                                       second.batch_transfer(CALLER, items))
        # Both attempts are alive and answered; the caller retries until a definitive answer.
        deadline = time.monotonic() + ANSWER_DEADLINE_S
        while True:
            final = await running.coordinator.batch_transfer(CALLER, items)
            if not any(o.status.transient() for o in final):
                break
            assert time.monotonic() < deadline, final
            await asyncio.sleep(POLL_S)
        assert [o.ok for o in final] == [True] * len(items), (answers, final)
    finally:
        await running.close(grace_s=0.1)
