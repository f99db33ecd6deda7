"""SIGKILL at every failpoint of the transfer protocol, on real ``ledgerd node`` processes.

For each failpoint named in ``ledger.runtime.failpoints`` a fresh deployment (Cassandra + etcd) is set
up, a node is restarted with the failpoint armed, and the request that reaches it is sent: a
cross-shard Transfer, or a linked BatchTransfer chain whose items cross shards for the chain
failpoints. The owner failpoints run on one node owning every shard, which is restarted after
the crash; the coordinator failpoints run on two nodes, and the dead one stays dead while the
other takes its shards over. The test proves that:

* the node really died at that failpoint (SIGKILL, its own log names the failpoint) before it
  answered;
* after the restart or takeover, a retry with the SAME idempotency key gets a definitive answer, and the
  answer is the one the protocol says for that crash point (committed afresh, replayed
  commit, or the chain aborted by the participants' recovery);
* the ledger agrees with the answer: balances equal one application of what was acknowledged
  (or none of what was refused), no hold is left, GetTransfer reports each item's recorded
  state;
* reconciliation of the deployment's keyspace is clean, judged as if the recovery timeout had
  already passed (so nothing at all may still be in doubt), and it counts exactly the commits
  the answers imply (no leg decided twice).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import grpc
import pytest

from clients import LedgerClient, LedgerError
from clients.bank import MultiClient
from clients.harness import Deployment
from coordinator.coordinator import key_shard_of
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledgerpb import ledger_pb2 as pb
from ledger.reconcile import reconcile
from shard_router import shard_of

pytestmark = [pytest.mark.real, pytest.mark.timeout(180)]

SHARDS = 8
CURRENCY = "CNY"
CALLER = "crash"
FUNDS_MINOR = 1_000
# How long a retry may take to get a definitive answer after the restart (s): the lease of
# the killed node must expire (3 s), and a chain waits for CHAIN_RESOLVE_AFTER_MS (5 s).
ANSWER_DEADLINE_S = 60.0
# How long balances may take to reach the answered values (credits land asynchronously).
SETTLE_DEADLINE_S = 30.0
POLL_S = 0.1
TRANSIENT_ITEM = {pb.RESULT_STATUS_REQUEST_IN_FLIGHT, pb.RESULT_STATUS_SHARD_UNAVAILABLE,
                  pb.RESULT_STATUS_OVERLOADED, pb.RESULT_STATUS_UNSPECIFIED}


@dataclass(frozen=True)
class Case:
    failpoint: str
    chain: bool
    # What the retry must answer: "fresh" (committed by the retry itself: nothing was
    # journaled before the crash), "replayed" (committed before the crash, the retry gets the
    # record), "decided-by-race" (a chain prepared but undecided: the retry finds its items
    # pending under the same chain and commits it, unless the participants' recovery aborted
    # it first - either is right, and the ledger must agree with the answer), "committed"
    # (a chain decided before the crash: committed, answered fresh or from the record).
    expect: str
    # 1: the killed node is restarted and recovers its own shards. 2: it stays dead and the
    # second node takes its shards over (the coordinator failpoints kill the node that took
    # the API call, whichever node owns the shards).
    nodes: int
    # True: the idempotency key hashes to another shard than the debit shard, so the key is
    # first claimed there (a journal append of its own, which an owner failpoint may hit
    # first). False: the key's shard is the debit shard and no claim is made.
    claim: bool = False
    # The failpoint acts on its nth hit: the owner appends a cross-shard transfer's credit
    # reservation (on the credit shard) before its debit (on the debit shard).
    nth: int = 1

    @property
    def spec(self) -> str:
        return self.failpoint + (f"@{self.nth}" if self.nth > 1 else "")

    @property
    def id(self) -> str:
        return self.spec + ("+claim" if self.claim else "")


CASES = [
    Case("coordinator.after_reserve", False, "fresh", 2),
    Case("coordinator.after_post", False, "replayed", 2),
    Case("owner.before_append", False, "fresh", 1),
    # The credit reservation is journaled, then the owner dies: the retry reuses it and
    # commits afresh.
    Case("owner.after_append", False, "fresh", 1),
    # The reservation and the debit are journaled, then the owner dies: the retry gets the
    # record.
    Case("owner.after_append", False, "replayed", 1, nth=2),
    # The claim is journaled, then the owner dies before the transfer is: nothing moved, the
    # retry's claim matches and the transfer commits afresh.
    Case("owner.after_append", False, "fresh", 1, claim=True),
    Case("owner.before_append", False, "fresh", 1, claim=True),
    Case("owner.after_deliver", False, "replayed", 1),
    Case("coordinator.after_prepare", True, "decided-by-race", 2),
    Case("coordinator.after_decide", True, "committed", 2),
]


# A node that exits while starting is started again this many times at most: ledgerd exits
# when Cassandra does not accept its connection within the driver's connect timeout (5 s),
# which happens on a loaded machine; a supervisor would start it again.
NODE_START_ATTEMPTS_MAX = 5


def start_node(node, failpoint: str | None = None) -> int:
    """Start ``node`` (blocking until it serves); returns how many starts failed first."""
    for attempt in range(1, NODE_START_ATTEMPTS_MAX + 1):
        try:
            node.start(failpoint=failpoint)
            return attempt - 1
        except RuntimeError:
            if attempt == NODE_START_ATTEMPTS_MAX:
                raise
    raise AssertionError("unreachable")


def start_deployment(deployment: Deployment) -> None:
    """``Deployment.start`` with each node started by ``start_node``: the first node creates
    the keyspace and the shard map, then the others join."""
    for node in deployment.nodes:
        start_node(node)


def wallets_on_distinct_shards(prefix: str, count: int) -> list[str]:
    """``count`` wallet ids, each on its own shard."""
    chosen: list[str] = []
    seen: set[int] = set()
    for i in range(10_000):
        wallet = f"{prefix}-{i}"
        shard = shard_of(wallet, SHARDS)
        if shard not in seen:
            seen.add(shard)
            chosen.append(wallet)
            if len(chosen) == count:
                return chosen
    raise AssertionError("not enough shards for distinct wallets")


def item(key: str, src: str, dst: str, amount: int, linked: bool = False) -> pb.TransferRequest:
    return pb.TransferRequest(idempotency_key=key, from_wallet_id=src, to_wallet_id=dst,
                              amount_minor=amount, currency=CURRENCY, linked=linked)


async def send_chain_until_definitive(client: MultiClient, items: list[pb.TransferRequest]
                                      ) -> list[pb.TransferResult]:
    """Send the chain (same keys) until no item's result is transient."""
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    while True:
        try:
            response = await client.call(lambda c: c.batch_transfer(items), ANSWER_DEADLINE_S)
            results = list(response.results)
            if not any(r.status in TRANSIENT_ITEM for r in results):
                return results
            last = [pb.ResultStatus.Name(r.status) for r in results]
        except TimeoutError as exc:
            last = str(exc)
        assert time.monotonic() < deadline, f"chain never answered definitively: {last}"
        await asyncio.sleep(POLL_S)


async def wait_balances(client: MultiClient, expected: dict[str, int]) -> dict:
    """Poll until every wallet has its expected balance and nothing held (or the deadline)."""
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while True:
        seen = {}
        for w in expected:
            wallet = await client.call(lambda c, w=w: c.get_wallet(w))
            seen[w] = (wallet.balance_minor, wallet.held_minor)
        if seen == {w: (b, 0) for w, b in expected.items()} or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(POLL_S)


def wait_dead(node, timeout_s: float = 60.0) -> int:
    return node.proc.wait(timeout=timeout_s)


def single_key(case: Case, debit_shard: int) -> str:
    """An idempotency key that is (or is not, per the case) claimed on another shard."""
    for i in range(10_000):
        key = f"single-{i}"
        if (key_shard_of(CALLER, key, SHARDS) != debit_shard) == case.claim:
            return key
    raise AssertionError("no key found")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_crash_at_failpoint(local_cluster, keyspaces, tmp_path, case: Case):
    region = local_cluster.regions[0]
    keyspace = await keyspaces.take({region: 1}, "failpoint")
    deployment = Deployment(local_cluster, regions=[region], nodes_per_region=case.nodes,
                            shards=SHARDS, log_dir=tmp_path,
                            keyspace=keyspace.name)
    store = None
    try:
        start_deployment(deployment)
        node = deployment.nodes[0]  # the one that dies
        a, b, c, d = wallets_on_distinct_shards(case.failpoint.replace(".", "-"), 4)
        async with LedgerClient(deployment.nodes[-1].address, caller=CALLER) as setup:
            for w in (a, b, c, d):
                await setup.create_wallet(w, CURRENCY, idempotency_key=f"create-{w}")
            for w in (a, c):
                await setup.deposit(w, FUNDS_MINOR, CURRENCY, idempotency_key=f"fund-{w}")
        if case.chain:
            # Items on two debit shards (primary: a's), both crediting other shards.
            request = [item("chain-1", a, b, 100, linked=True), item("chain-2", c, d, 200)]
            moves = [(a, b, 100), (c, d, 200)]
        else:
            request = None
            moves = [(a, b, 250)]
        key = single_key(case, shard_of(a, SHARDS))

        # Restart the node with the failpoint armed; a clean stop gives the shards up at once.
        node.stop()
        start_node(node, case.spec)
        async with LedgerClient(node.address, caller=CALLER, timeout_s=30.0,
                                retries=False) as first:
            if case.chain:
                send = first.batch_transfer(request)
            else:
                send = first.transfer(a, b, 250, CURRENCY, idempotency_key=key)
            with pytest.raises(LedgerError) as lost:
                await send
        assert lost.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                   grpc.StatusCode.UNKNOWN), lost.value
        assert await asyncio.to_thread(wait_dead, node) == -signal.SIGKILL
        log = (tmp_path / f"{node.node_id}.log").read_text()
        assert f"failpoint {case.failpoint}: killing process" in log

        # Recovery: restart (the old lease must expire first) or let the other node take the
        # shards over; retry with the same key(s) until a definitive answer.
        if case.nodes == 1:
            await asyncio.to_thread(start_node, node)
        else:
            assert not node.alive
        client = MultiClient(deployment.addresses, CALLER)
        try:
            if case.chain:
                results = await send_chain_until_definitive(client, request)
                statuses = [r.status for r in results]
                transfer_ids = [r.transfer.transfer_id for r in results]
                committed = statuses == [pb.RESULT_STATUS_OK] * len(results)
                if case.expect == "decided-by-race":
                    aborted = statuses == [pb.RESULT_STATUS_LINKED_ITEM_FAILED] * len(results)
                    assert committed or aborted, statuses
                    if aborted:  # the participants' recovery decided it, and recorded it
                        assert all(r.replayed for r in results)
                else:
                    assert committed, [pb.ResultStatus.Name(s) for s in statuses]
            else:
                response = await client.call(lambda c: c.transfer(
                    a, b, 250, CURRENCY, idempotency_key=key), ANSWER_DEADLINE_S)
                committed = response.transfer.state == pb.TRANSFER_STATE_COMMITTED
                assert committed
                assert response.replayed == (case.expect == "replayed")
                transfer_ids = [response.transfer.transfer_id]

            expected = {a: FUNDS_MINOR, b: 0, c: FUNDS_MINOR, d: 0}
            if committed:
                for src, dst, amount in moves:
                    expected[src] -= amount
                    expected[dst] += amount
            seen = await wait_balances(client, expected)
            assert seen == {w: (bal, 0) for w, bal in expected.items()}

            want_state = (pb.TRANSFER_STATE_COMMITTED if committed
                          else pb.TRANSFER_STATE_REFUSED)
            for tid in transfer_ids:
                transfer = await client.call(lambda cl, tid=tid: cl.get_transfer(tid))
                assert transfer.state == want_state, transfer
                if committed:
                    assert transfer.credited, transfer

            # A second retry still answers the record and moves nothing.
            if case.chain:
                again = await send_chain_until_definitive(client, request)
                assert [r.status for r in again] == [r.status for r in results]
                assert all(r.replayed for r in again)
            else:
                again = await client.call(lambda c: c.transfer(
                    a, b, 250, CURRENCY, idempotency_key=key))
                assert again.replayed and again.transfer.transfer_id == transfer_ids[0]
            assert await wait_balances(client, expected) == seen
        finally:
            await client.close()

        from ledger.store.cassandra import CassandraStore
        store = await CassandraStore.connect(**deployment.store_args(), create_schema=False)
        # Judged as if the recovery timeout had passed already: nothing may be in doubt now.
        report = await reconcile(store, SHARDS,
                                 now_ms=time.time_ns() // 1_000_000 + RECOVERY_TIMEOUT_MS + 1)
        assert report.clean, report.findings
        # Two deposits, plus every item the answers say committed, each decided once.
        assert report.transfers_committed == 2 + (len(moves) if committed else 0)
        assert report.in_transit.get(CURRENCY, 0) == 0
    finally:
        if store is not None:
            await store.close()
        await asyncio.to_thread(deployment.stop)
        await keyspaces.give_back(keyspace)
