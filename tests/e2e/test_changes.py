"""What downstream systems read from a running ledger (embedded default, through gRPC):

* ``WatchChanges``: every committed journal batch, in order per shard, equal to the journal;
  live as new batches commit; resumed from a per-shard token without a gap or a duplicate;
  followed through an owner that stops on a store fault and is replaced under a new epoch;
* ``GetBalanceAt``: a wallet's balance after one of its entries or as of a time, and clear
  refusals (which field, why) for what cannot be answered.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from ledger import server
from ledger.runtime import failpoints
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc
from shard_router import shard_of

SHARDS = 4
TIMEOUT_S = 10.0


@pytest.fixture
async def ledger(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, pb_grpc.LedgerServiceStub(channel)
    finally:
        await channel.close()
        await running.close()


async def wallets(stub, *names: str, balance: int = 1_000) -> None:
    for name in names:
        await stub.CreateWallet(pb.CreateWalletRequest(
            idempotency_key="w-" + name, wallet_id=name, currency="CNY"), timeout=TIMEOUT_S)
        await stub.Deposit(pb.DepositRequest(idempotency_key="d-" + name, wallet_id=name,
                                             amount_minor=balance, currency="CNY"),
                           timeout=TIMEOUT_S)


async def journal(running, shard: int) -> list[tuple[int, int, list[str]]]:
    from ledger.core import codec
    batches = await running.store.read_journal(shard, 0, 100_000)
    return [(b.seq, b.epoch, [type(e).__name__ for e in codec.loads(b.events)])
            for b in batches]


async def journals_agree(running, got: dict, before: dict) -> None:
    """What a stream gave holds every batch journaled before it began, and is a prefix of
    the journal as it is now."""
    for shard in range(SHARDS):
        mine, now = got.get(shard, []), await journal(running, shard)
        assert mine[:len(before[shard])] == before[shard], shard
        assert mine == now[:len(mine)], shard


def as_rows(batches) -> dict[int, list[tuple[int, int, list[str]]]]:
    out: dict[int, list] = {}
    for b in batches:
        out.setdefault(b.shard, []).append((b.seq, b.epoch, [e.type for e in b.events]))
    return out


async def test_the_stream_is_the_journal_then_follows_and_resumes(ledger):
    running, stub = ledger
    await wallets(stub, "ca", "cb", "cc")
    for i in range(6):
        await stub.Transfer(pb.TransferRequest(
            idempotency_key=f"t{i}", from_wallet_id="ca", to_wallet_id=("cb", "cc")[i % 2],
            amount_minor=10 + i, currency="CNY"), timeout=TIMEOUT_S)
    # Not following: everything committed so far, then the stream ends. (Acknowledgements
    # may still be journaled while it runs: the journal is read before and after it.)
    before = {s: await journal(running, s) for s in range(SHARDS)}
    history = [b async for b in stub.WatchChanges(pb.WatchChangesRequest(), timeout=TIMEOUT_S)]
    got = as_rows(history)
    await journals_agree(running, got, before)
    # Events carry their fields as JSON: the transfers are there, amounts exact.
    decided = [json.loads(e.json)["transfer"] for b in history for e in b.events
               if e.type == "TransferDecided"]
    assert sorted(t["amount_minor"] for t in decided
                  if t["from_wallet_id"] == "ca") == [10, 11, 12, 13, 14, 15]

    # Following one shard from its last position: a new transfer arrives, nothing before it.
    shard = shard_of("ca", SHARDS)
    last = max(b.seq for b in history if b.shard == shard)
    stream = stub.WatchChanges(pb.WatchChangesRequest(
        shards=[shard], positions=[pb.ShardPosition(shard=shard, after_seq=last)],
        follow=True), timeout=TIMEOUT_S)
    await stub.Transfer(pb.TransferRequest(
        idempotency_key="live", from_wallet_id="ca", to_wallet_id="cb", amount_minor=7,
        currency="CNY"), timeout=TIMEOUT_S)
    seen = []
    async for batch in stream:
        assert batch.shard == shard and batch.seq == last + 1 + len(seen)
        seen.append(batch)
        amounts = [json.loads(e.json)["transfer"]["amount_minor"] for e in batch.events
                   if e.type == "TransferDecided"]
        if 7 in amounts:
            break
    stream.cancel()
    # Resumed from the middle: the rest, no gap, no duplicate.
    middle = seen[0].seq
    resumed = [b async for b in stub.WatchChanges(pb.WatchChangesRequest(
        shards=[shard], positions=[pb.ShardPosition(shard=shard, after_seq=middle)]),
        timeout=TIMEOUT_S)]
    assert [b.seq for b in resumed] == list(range(middle + 1, middle + 1 + len(resumed)))
    assert [b.seq for b in resumed][:len(seen) - 1] == [b.seq for b in seen[1:]]


async def test_the_stream_follows_an_owner_replaced_after_a_fault(ledger):
    running, stub = ledger
    await wallets(stub, "fa", "fb")
    collected: list = []
    stream = stub.WatchChanges(pb.WatchChangesRequest(follow=True))

    async def follow() -> None:
        async for batch in stream:
            collected.append(batch)

    follower = asyncio.create_task(follow())
    epochs_before = {s: o.epoch for s, o in running.node.owners.items()}
    # The next append (of whichever shard comes first) is written but reported as an
    # unknown outcome: that owner stops, the shard is granted again with a higher epoch,
    # and the new owner replays the journal.
    failpoints.arm("owner.append_unknown")
    try:
        for i in range(5):
            try:
                await stub.Transfer(pb.TransferRequest(
                    idempotency_key=f"k{i}", from_wallet_id="fa", to_wallet_id="fb",
                    amount_minor=1, currency="CNY"), timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:  # the fault's call may answer UNAVAILABLE
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        failpoints.disarm()
    loop = asyncio.get_running_loop()
    give_up = loop.time() + TIMEOUT_S

    def replaced() -> list[int]:
        return [s for s, o in running.node.owners.items()
                if o.serving and o.epoch != epochs_before[s]]

    while not replaced():
        assert loop.time() < give_up, "no shard was served again"
        await asyncio.sleep(0.05)
    shard = replaced()[0]
    # A batch under the new epoch: a wallet created on that shard.
    name = next(f"nw{i}" for i in range(10_000) if shard_of(f"nw{i}", SHARDS) == shard)
    await wallets(stub, name)
    head = running.node.owners[shard].durable_seq
    while max((b.seq for b in collected if b.shard == shard), default=0) < head:
        assert loop.time() < give_up, "the stream did not reach the journal head"
        await asyncio.sleep(0.05)
    stream.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    mine = as_rows(collected)
    for s in range(SHARDS):
        expected = await journal(running, s)
        assert mine.get(s, []) == expected[:len(mine.get(s, []))]
    rows = mine[shard]
    assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1))  # no gap, no repeat
    epochs = [epoch for _, epoch, _ in rows]
    assert epochs == sorted(epochs) and epochs[-1] > epochs_before[shard]


async def test_a_balance_after_an_entry_or_as_of_a_time(ledger):
    running, stub = ledger
    await wallets(stub, "ba", balance=100)
    await stub.Deposit(pb.DepositRequest(idempotency_key="d2", wallet_id="ba",
                                         amount_minor=200, currency="CNY"), timeout=TIMEOUT_S)
    await stub.Withdraw(pb.WithdrawRequest(idempotency_key="w1", wallet_id="ba",
                                           amount_minor=50, currency="CNY"), timeout=TIMEOUT_S)
    entries = (await stub.ListWalletEntries(pb.ListWalletEntriesRequest(wallet_id="ba"),
                                            timeout=TIMEOUT_S)).entries
    assert [e.balance_after_minor for e in entries] == [100, 300, 250]
    for e in entries:
        at = await stub.GetBalanceAt(pb.GetBalanceAtRequest(wallet_id="ba", version=e.version),
                                     timeout=TIMEOUT_S)
        assert (at.balance_minor, at.version, at.at_ms, at.currency) == (
            e.balance_after_minor, e.version, e.at_ms, "CNY")
        by_time = await stub.GetBalanceAt(pb.GetBalanceAtRequest(wallet_id="ba",
                                                                 at_ms=e.at_ms),
                                          timeout=TIMEOUT_S)
        # The longest prefix of entries at or before the time: entries of the same
        # millisecond are in it together.
        last = max(x.version for x in entries if all(y.at_ms <= e.at_ms for y in entries
                                                     if y.version <= x.version))
        assert by_time.version == last
        assert by_time.balance_minor == entries[last - 1].balance_after_minor
    wallet = (await stub.GetWallet(pb.GetWalletRequest(wallet_id="ba"))).wallet
    before_first = await stub.GetBalanceAt(pb.GetBalanceAtRequest(
        wallet_id="ba", at_ms=wallet.created_at_ms), timeout=TIMEOUT_S)
    if entries[0].at_ms > wallet.created_at_ms:
        assert (before_first.balance_minor, before_first.version) == (0, 0)

    async def refused(request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetBalanceAt(request, timeout=TIMEOUT_S)
        trailers = dict(err.value.trailing_metadata() or ())
        return err.value.code(), trailers.get("ledger-field", "")

    assert await refused(pb.GetBalanceAtRequest(wallet_id="ba")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "version")
    assert await refused(pb.GetBalanceAtRequest(wallet_id="ba", version=1, at_ms=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "at_ms")
    assert await refused(pb.GetBalanceAtRequest(wallet_id="ba", version=4)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "version")
    assert await refused(pb.GetBalanceAtRequest(wallet_id="ba", at_ms=1)) == (
        grpc.StatusCode.NOT_FOUND, "at_ms")
    assert (await refused(pb.GetBalanceAtRequest(wallet_id="nobody", version=1)))[0] is \
        grpc.StatusCode.NOT_FOUND


async def test_a_bad_shard_is_refused_naming_the_field(ledger):
    _, stub = ledger
    for request, field in ((pb.WatchChangesRequest(shards=[SHARDS]), "shards"),
                           (pb.WatchChangesRequest(positions=[pb.ShardPosition(
                               shard=SHARDS + 3, after_seq=1)]), "positions")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchChanges(request, timeout=TIMEOUT_S):
                pass
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata() or ()).get("ledger-field") == field


async def ledgerctl(*args: str) -> tuple[int, str, str]:
    import sys
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli.ledgerctl", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_ledgerctl_tail_prints_the_journal(ledger):
    running, stub = ledger
    await wallets(stub, "ta", "tb")
    await stub.Transfer(pb.TransferRequest(idempotency_key="tt", from_wallet_id="ta",
                                           to_wallet_id="tb", amount_minor=42, currency="CNY"),
                        timeout=TIMEOUT_S)
    target = f"127.0.0.1:{running.port}"
    before = {s: await journal(running, s) for s in range(SHARDS)}
    code, out, err = await ledgerctl("tail", "--target", target, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    got: dict[int, list] = {}
    for line in lines:
        got.setdefault(line["shard"], []).append(
            (line["seq"], line["epoch"], [e["type"] for e in line["events"]]))
    await journals_agree(running, got, before)
    assert any(e.get("transfer", {}).get("amount_minor") == 42
               for line in lines for e in line["events"])
    shard = shard_of("ta", SHARDS)
    code, out, _ = await ledgerctl("tail", "--target", target, "--shard", str(shard),
                                   "--after", f"{shard}:1")
    assert code == 0 and out and all(line.split()[0] == str(shard) for line in out.splitlines())
    assert all(int(line.split()[1]) > 1 for line in out.splitlines())
    code, _, err = await ledgerctl("tail", "--target", target, "--after", "x")
    assert code == 2 and "SHARD:SEQ" in err


async def test_a_page_token_of_non_ascii_digits_is_refused_naming_it(ledger):
    """Found by the fuzz run: "²" is a digit to ``str.isdigit`` but not to ``int``, so a
    page token of it answered INTERNAL (a crash in the coordinator) instead of a refusal."""
    running, stub = ledger
    await wallets(stub, "pt")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        envelopes = pb_grpc.RedEnvelopeServiceStub(ch)
        calls = [
            (stub.ListWalletEntries, pb.ListWalletEntriesRequest(wallet_id="pt",
                                                                 page_token="²")),
            (envelopes.GetEnvelope, pb.GetEnvelopeRequest(
                envelope_id="e" + "0" * 24, page_token="²")),
            (envelopes.ListEnvelopes, pb.ListEnvelopesRequest(
                wallet_id="pt", role=pb.ENVELOPE_ROLE_SENT, page_token="²." + "e" + "0" * 24)),
        ]
        for call, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request, timeout=TIMEOUT_S)
            assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.NOT_FOUND), (request, err.value)
            if err.value.code() is grpc.StatusCode.INVALID_ARGUMENT:
                assert dict(err.value.trailing_metadata() or ()).get(
                    "ledger-field") == "page_token"
