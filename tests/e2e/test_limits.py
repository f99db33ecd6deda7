"""The largest allowed batch fits every message on its way: client -> public server, and
node -> node (the internal ``ShardOwnerService`` and the router's gRPC transport).

Issue 7, defect 7: the internal channel kept gRPC's default 4 MiB receive limit, so a 10,000
item batch from one hot wallet committed on its owner, but the answer never arrived and the
router resent until its deadline, answering UNAVAILABLE.
"""

from __future__ import annotations

import pytest

from clients import LedgerClient
from coordinator import Coordinator, TransferItem
from coordinator.coordinator import transfer_id_for
from ledger import constants as K
from ledger import server
from ledger.api import convert
from ledger.api.shard_service import GrpcShardTransport, _outcomes_dumps
from ledger.core import codec
from ledger.core import constants as C
from ledger.core.model import KIND_TRANSFER, Post, Transfer
from ledger.core.status import Outcome, Status
from ledgerpb import ledger_pb2 as pb
from shard_router.ownership import OwnerInfo, ShardPlacement
from shard_router.router import Router

SHARDS = 8
GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024
RECEIVERS = 32
AMOUNT = 3

# Each field at its byte maximum, made of the characters JSON (the internal codec) escapes
# most: a control character becomes 6 bytes ("\u0001"), a quote or backslash 2.
CALLER = '"' * C.CALLER_BYTES_MAX
MEMO = "\x01" * C.MEMO_BYTES_MAX


def _key(i: int, fill: str = "\\") -> str:
    return fill * (C.IDEMPOTENCY_KEY_BYTES_MAX - 6) + f"{i:06d}"


def _wallet(name: str) -> str:
    return name.ljust(C.WALLET_ID_BYTES_MAX, "-")


HOT = _wallet("hot")


class _SeenFromAnotherNode:
    """The shard map as another node sees it: every shard is served at ``address``."""

    node_id = "front"
    region = "dev"

    def __init__(self, address: str) -> None:
        self._address = address

    def owner(self, shard: int) -> OwnerInfo:
        return OwnerInfo(shard=shard, node_id="dev", region="dev", address=self._address,
                         epoch=1)

    def placements(self) -> list[ShardPlacement]:
        return [ShardPlacement(shard=s, home_region="dev") for s in range(SHARDS)]

    def home_changes(self, shard: int) -> list:
        return []  # homes never change here


def test_worst_case_batch_fits_the_message_limit():
    """Build the largest valid batch with every field at its worst and encode it as each hop
    does: the internal request (Posts), the internal answer (outcomes) and the public answer
    must all be below the one limit."""
    n = C.BATCH_TRANSFERS_MAX
    detail = "x" * 80  # longer than any refusal detail the core writes
    posts, outcomes = [], []
    for i in range(n):
        key, to = _key(i), _wallet(f"{i:06d}")
        tid = transfer_id_for(0xFFFF, CALLER, key)
        refusal = (int(Status.INSUFFICIENT_FUNDS), "idempotency_key", detail)
        posts.append(Post(CALLER, key, tid, KIND_TRANSFER, HOT, to, C.AMOUNT_MINOR_MAX, "CNY",
                          MEMO, 0xFFFF, 2**53, refusal))
        transfer = Transfer(tid, KIND_TRANSFER, HOT, to, C.AMOUNT_MINOR_MAX, "CNY", MEMO,
                            CALLER, key, 2**53, "COMMITTED", 99, "idempotency_key", detail,
                            True)
        outcomes.append(Outcome(Status.INSUFFICIENT_FUNDS, "idempotency_key", detail,
                                transfer, True))
    internal_request = len(codec.dumps(posts))
    internal_answer = len(_outcomes_dumps(outcomes))
    public_answer = pb.BatchTransferResponse(results=[
        pb.TransferResult(status=int(o.status), field=o.field, detail=o.detail, replayed=True,
                          transfer=convert.transfer_to_proto(o.value)) for o in outcomes
    ]).ByteSize()
    public_request = pb.BatchTransferRequest(transfers=[
        pb.TransferRequest(idempotency_key=_key(i), from_wallet_id=HOT,
                           to_wallet_id=_wallet(f"{i:06d}"), amount_minor=C.AMOUNT_MINOR_MAX,
                           currency="CNY", memo="\u07ff" * (C.MEMO_BYTES_MAX // 2),
                           linked=True) for i in range(n)
    ]).ByteSize()
    assert internal_answer > 16 * 1024 * 1024  # the worst case is real: 16 MiB was too little
    for size in (internal_request, internal_answer, public_request, public_answer):
        assert size < K.GRPC_MESSAGE_BYTES_MAX


# plain: printable fields at their maxima (the answer is about 7 MiB, the request fits 16);
# escaped: the worst case for the JSON codec (answer and request above 20 MiB).
@pytest.mark.timeout(300)
@pytest.mark.parametrize("caller,memo,key_fill", [
    ("c" * C.CALLER_BYTES_MAX, "m" * C.MEMO_BYTES_MAX, "k"),
    (CALLER, MEMO, "\\"),
], ids=["plain", "escaped"])
async def test_largest_batch_from_one_hot_wallet_answers_across_nodes(tmp_path, caller, memo,
                                                                       key_fill):
    """10,000 items from one wallet, sent by another node's router over the internal gRPC
    transport: every item's outcome arrives (none UNAVAILABLE), though the owner's answer is
    far above gRPC's default 4 MiB."""
    owner_node = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    transport = GrpcShardTransport()
    try:
        router = Router("front", {}, _SeenFromAnotherNode(f"127.0.0.1:{owner_node.port}"),
                        transport)
        front = Coordinator(router, owner_node.store, SHARDS)
        receivers = [_wallet(f"r{i}") for i in range(RECEIVERS)]
        for n, wallet in enumerate([HOT, *receivers]):
            created = await front.create_wallet(caller, f"cw-{n}", wallet, "CNY")
            assert created.ok, created
        funded = await front.deposit(caller, "fund", HOT, AMOUNT * C.BATCH_TRANSFERS_MAX,
                                     "CNY")
        assert funded.ok, funded

        items = [TransferItem(_key(i, key_fill), HOT, receivers[i % RECEIVERS], AMOUNT, "CNY",
                              memo) for i in range(C.BATCH_TRANSFERS_MAX)]
        outcomes = await front.batch_transfer(caller, items)

        statuses = {o.status for o in outcomes}
        assert statuses == {Status.OK}, statuses
        assert len(outcomes) == C.BATCH_TRANSFERS_MAX
        assert [o.value.idempotency_key for o in outcomes] == [i.idempotency_key for i in items]
        # All items debit one shard: this is that owner's answer, as it crossed the wire.
        assert len(_outcomes_dumps(outcomes)) > GRPC_DEFAULT_RECEIVE_BYTES
        hot = await front.get_wallet(HOT)
        assert hot.ok and hot.value.balance_minor == 0
    finally:
        await transport.close()
        await owner_node.close(grace_s=0.5)


@pytest.mark.timeout(300)
async def test_largest_batch_through_the_public_api(tmp_path):
    """The same batch through the client library and the public server."""
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        async with LedgerClient(f"127.0.0.1:{running.port}", caller=CALLER, retries=False,
                                timeout_s=120) as client:
            receivers = [_wallet(f"r{i}") for i in range(RECEIVERS)]
            for wallet in [HOT, *receivers]:
                await client.create_wallet(wallet, "CNY")
            await client.deposit(HOT, AMOUNT * C.BATCH_TRANSFERS_MAX, "CNY")
            items = [pb.TransferRequest(idempotency_key=_key(i), from_wallet_id=HOT,
                                        to_wallet_id=receivers[i % RECEIVERS],
                                        amount_minor=AMOUNT, currency="CNY", memo=MEMO)
                     for i in range(C.BATCH_TRANSFERS_MAX)]
            results = (await client.batch_transfer(items)).results
            assert len(results) == C.BATCH_TRANSFERS_MAX
            assert {r.status for r in results} == {pb.RESULT_STATUS_OK}
            assert (await client.get_wallet(HOT)).balance_minor == 0
    finally:
        await running.close(grace_s=0.5)
