"""``ledger.v1.RedEnvelopeService`` end to end, on the embedded default and on Cassandra + etcd.

Proves: a LUCKY envelope of 1000 in 5 shares, grabbed by 6 wallets, pays 5 shares summing to
1000 and answers the sixth ENVELOPE_SOLD_OUT (FAILED_PRECONDITION, trailers
``ledger-status``/``ledger-field``); a retry of a grab is answered with the grab, a second
grab by the same wallet is ENVELOPE_ALREADY_GRABBED; the money lands (sender down by the
total, each receiver up by its share); GetEnvelope shows the grabs in order and the luckiest;
EXCLUSIVE envelopes are for their receiver only; every kind of bad input answers the right
code, names the field and changes nothing; GrabEnvelopes answers one result per item;
ListEnvelopes pages a wallet's sent envelopes and received grabs; an expired envelope gives
what is left back to its sender (the owner's sweep); ``ledgerd``'s envelope flags reach the
rules, and bad ones refuse the start; the README's grpcurl walk-through works as written.

Reads past the owners' memory (ListEnvelopes, GetEnvelope of an envelope the owner forgot or
never had) come from the store's envelope views.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import grpc
import pytest

from clients import LedgerClient, LedgerError, LedgerRefused
from coordinator.envelopes import EnvelopeRules
from ledger import server
from ledger.core.model import ExpireIdempotency
from ledgerpb import ledger_pb2 as pb
from tests.e2e.conftest import SHARDS, _start_cassandra_backend, close_server


@pytest.fixture(scope="module")
async def ledger_server(request, tmp_path_factory):
    """One server per backend for this module (conftest's is one per test): a Cassandra
    keyspace costs 15-25 s to create on the three-region test cluster, and every test here
    uses wallets and keys of its own (a prefix per test), so they share it."""
    if request.param == "embedded":
        running = await server.start_dev(tmp_path_factory.mktemp("envelopes"), port=0,
                                         shard_count=SHARDS)
    else:
        running = await _start_cassandra_backend(request)
    try:
        yield running
    finally:
        await close_server(request, running)

# The longest any poll below waits (s): credits, views and the owner's sweep (every 1 s)
# land within a fraction of that even on a loaded machine.
POLL_S = 30.0
POLL_EVERY_S = 0.02
ROOT = Path(__file__).resolve().parents[2]


async def until(probe, what: str, timeout_s: float = POLL_S):
    """Call ``probe()`` (async) until it returns something true; return that (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        assert loop.time() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(POLL_EVERY_S)


async def credited(client, transfer_id: str) -> pb.Transfer:
    async def probe():
        transfer = await client.get_transfer(transfer_id)
        return transfer if transfer.credited else None
    return await until(probe, f"credit of {transfer_id}")


async def active(client, envelope_id: str) -> pb.Envelope:
    """The envelope once its money reached its escrow (at once, or when the funding transfer's
    credit lands on the envelope's shard)."""
    async def probe():
        envelope = (await client.get_envelope(envelope_id)).envelope
        return envelope if envelope.state != pb.ENVELOPE_STATE_FUNDING else None
    return await until(probe, f"funding of {envelope_id}")


async def balances(client, *wallet_ids) -> dict[str, int]:
    return {w: (await client.get_wallet(w)).balance_minor for w in wallet_ids}


async def wallets(client, *wallet_ids, deposit: int = 0) -> None:
    for w in wallet_ids:
        await client.create_wallet(w, "CNY", idempotency_key="w-" + w)
        if deposit:
            await client.deposit(w, deposit, "CNY", idempotency_key="d-" + w)


async def refused(call) -> LedgerError:
    with pytest.raises(LedgerRefused) as err:
        await call
    return err.value


def luckiest_of(grabs) -> pb.Grab:
    """The largest share; ties go to the earliest grab."""
    return max(grabs, key=lambda g: (g.amount_minor, -g.position))


async def create(client, sender: str, total: int, shares: int, kind: str, key: str,
                 **fields) -> pb.CreateEnvelopeResponse:
    response = await client.create_envelope(sender, total, shares, kind, "CNY",
                                            idempotency_key=key, **fields)
    await active(client, response.envelope.envelope_id)
    return response


# --- the lucky envelope, five shares, six grabbers -------------------------------------------

async def test_lucky_envelope_five_shares_six_grabbers(client):
    sender = "lk-alice"
    receivers = [f"lk-r{i}" for i in range(6)]
    await wallets(client, sender, deposit=5_000)
    await wallets(client, *receivers)

    created = await client.create_envelope(sender, 1_000, 5, "LUCKY", "CNY",
                                           memo="happy new year", idempotency_key="env-lucky")
    envelope = created.envelope
    eid = envelope.envelope_id
    assert not created.replayed
    assert (envelope.kind, envelope.total_minor, envelope.shares, envelope.sender_wallet_id,
            envelope.currency, envelope.memo) == (pb.ENVELOPE_KIND_LUCKY, 1_000, 5, sender,
                                                  "CNY", "happy new year")
    assert envelope.state in (pb.ENVELOPE_STATE_FUNDING, pb.ENVELOPE_STATE_ACTIVE)
    assert envelope.escrow_wallet_id == "~envelope:" + eid
    assert envelope.expires_at_ms - envelope.created_at_ms == 24 * 3600 * 1000  # 0: longest
    funding = created.funding
    assert (funding.kind, funding.from_wallet_id, funding.to_wallet_id, funding.amount_minor,
            funding.state) == (pb.TRANSFER_KIND_ENVELOPE_FUND, sender, envelope.escrow_wallet_id,
                               1_000, pb.TRANSFER_STATE_COMMITTED)
    assert envelope.funding_transfer_id == funding.transfer_id
    assert (await client.get_wallet(sender)).balance_minor == 4_000
    envelope = await active(client, eid)
    assert (envelope.state, envelope.shares_left, envelope.amount_left_minor) == (
        pb.ENVELOPE_STATE_ACTIVE, 5, 1_000)

    grabs = []
    for i, receiver in enumerate(receivers[:5]):
        answer = await client.grab_envelope(eid, receiver, idempotency_key=f"g-{i}")
        assert not answer.replayed
        assert (answer.grab.envelope_id, answer.grab.position,
                answer.grab.receiver_wallet_id) == (eid, i, receiver)
        assert answer.grab.amount_minor >= 1
        grabs.append(answer.grab)
    assert sum(g.amount_minor for g in grabs) == 1_000

    sold_out = await refused(client.grab_envelope(eid, receivers[5], idempotency_key="g-5"))
    assert sold_out.code is grpc.StatusCode.FAILED_PRECONDITION
    assert (sold_out.status, sold_out.field) == ("RESULT_STATUS_ENVELOPE_SOLD_OUT",
                                                 "envelope_id")
    assert sold_out.message.startswith("envelope_id:")

    # A retry with its key: the same grab, not a second one.
    again = await client.grab_envelope(eid, receivers[2], idempotency_key="g-2")
    assert again.replayed and again.grab == grabs[2]
    # The same receiver with another key: it grabbed before, and the message says how much.
    twice = await refused(client.grab_envelope(eid, receivers[2], idempotency_key="g-2-again"))
    assert twice.code is grpc.StatusCode.ALREADY_EXISTS
    assert (twice.status, twice.field) == ("RESULT_STATUS_ENVELOPE_ALREADY_GRABBED",
                                           "receiver_wallet_id")
    assert str(grabs[2].amount_minor) in twice.message

    for g in grabs:
        transfer = await credited(client, g.transfer_id)
        assert (transfer.kind, transfer.from_wallet_id, transfer.to_wallet_id,
                transfer.amount_minor) == (pb.TRANSFER_KIND_ENVELOPE_GRAB,
                                           envelope.escrow_wallet_id, g.receiver_wallet_id,
                                           g.amount_minor)
    assert await balances(client, sender, *receivers) == {
        sender: 4_000, **{g.receiver_wallet_id: g.amount_minor for g in grabs},
        receivers[5]: 0}
    history = await client.all_entries(receivers[0])
    assert [(e.kind, e.amount_minor, e.counterparty_wallet_id) for e in history] == [
        (pb.TRANSFER_KIND_ENVELOPE_GRAB, grabs[0].amount_minor, envelope.escrow_wallet_id)]

    view = await client.get_envelope(eid)
    assert (view.envelope.state, view.envelope.shares_left, view.envelope.amount_left_minor) == (
        pb.ENVELOPE_STATE_SOLD_OUT, 0, 0)
    assert view.envelope.closed_at_ms >= view.envelope.funded_at_ms > 0
    assert list(view.grabs) == grabs and view.next_page_token == ""
    assert view.HasField("luckiest") and view.luckiest == luckiest_of(grabs)

    # Pages of grabs, in grab order; the luckiest is of the whole envelope on every page.
    paged, token = [], ""
    while True:
        page = await client.get_envelope(eid, page_size=2, page_token=token)
        assert len(page.grabs) <= 2 and page.luckiest == view.luckiest
        paged.extend(page.grabs)
        token = page.next_page_token
        if not token:
            break
    assert paged == grabs


async def test_create_is_idempotent_and_moves_the_money_once(client):
    await wallets(client, "ci-alice", deposit=5_000)
    first = await create(client, "ci-alice", 1_000, 4, "FIXED", "env-once")
    again = await client.create_envelope("ci-alice", 1_000, 4, "FIXED", "CNY",
                                         idempotency_key="env-once")
    assert again.replayed and again.envelope.envelope_id == first.envelope.envelope_id
    assert again.funding.transfer_id == first.funding.transfer_id
    reused = await refused(client.create_envelope("ci-alice", 1_001, 4, "FIXED", "CNY",
                                                  idempotency_key="env-once"))
    assert (reused.code, reused.status) == (grpc.StatusCode.ALREADY_EXISTS,
                                            "RESULT_STATUS_IDEMPOTENCY_KEY_REUSED")
    assert reused.field == "total_minor"
    assert (await client.get_wallet("ci-alice")).balance_minor == 4_000


async def test_grabs_of_a_fixed_envelope_and_a_grab_key_is_scoped_to_its_envelope(client):
    await wallets(client, "fx-alice", deposit=5_000)
    await wallets(client, "fx-bob")
    one = (await create(client, "fx-alice", 1_000, 3, "FIXED", "env-fx-1")).envelope
    two = (await create(client, "fx-alice", 500, 2, "FIXED", "env-fx-2")).envelope
    first = await client.grab_envelope(one.envelope_id, "fx-bob", idempotency_key="tap")
    other = await client.grab_envelope(two.envelope_id, "fx-bob", idempotency_key="tap")
    assert not other.replayed
    assert (first.grab.amount_minor, other.grab.amount_minor) == (334, 250)
    await credited(client, first.grab.transfer_id)
    await credited(client, other.grab.transfer_id)
    assert (await client.get_wallet("fx-bob")).balance_minor == 584


# --- EXCLUSIVE ---------------------------------------------------------------------------------

async def test_exclusive_envelope_is_for_its_receiver_only(client):
    await wallets(client, "ex-alice", deposit=5_000)
    await wallets(client, "ex-bob", "ex-carol")
    created = await create(client, "ex-alice", 888, 0, "EXCLUSIVE", "env-ex",
                           receiver_wallet_id="ex-bob")
    eid = created.envelope.envelope_id
    assert (created.envelope.kind, created.envelope.shares,
            created.envelope.receiver_wallet_id) == (pb.ENVELOPE_KIND_EXCLUSIVE, 1, "ex-bob")
    not_for_you = await refused(client.grab_envelope(eid, "ex-carol"))
    assert (not_for_you.code, not_for_you.status, not_for_you.field) == (
        grpc.StatusCode.FAILED_PRECONDITION, "RESULT_STATUS_ENVELOPE_NOT_ELIGIBLE",
        "receiver_wallet_id")
    grabbed = await client.grab_envelope(eid, "ex-bob")
    assert grabbed.grab.amount_minor == 888
    await credited(client, grabbed.grab.transfer_id)
    assert await balances(client, "ex-alice", "ex-bob", "ex-carol") == {
        "ex-alice": 4_112, "ex-bob": 888, "ex-carol": 0}
    view = await client.get_envelope(eid)
    assert view.envelope.state == pb.ENVELOPE_STATE_SOLD_OUT
    assert list(view.grabs) == [grabbed.grab]


# --- bad input -----------------------------------------------------------------------------------

BAD_CREATES = [
    # (name, request fields, gRPC code, field)
    ("total over the max", dict(total_minor=20_001), grpc.StatusCode.INVALID_ARGUMENT,
     "total_minor"),
    ("total zero", dict(total_minor=0), grpc.StatusCode.INVALID_ARGUMENT, "total_minor"),
    ("less than a unit per share", dict(total_minor=4), grpc.StatusCode.INVALID_ARGUMENT,
     "total_minor"),
    ("shares 0", dict(shares=0), grpc.StatusCode.INVALID_ARGUMENT, "shares"),
    ("shares 101", dict(shares=101), grpc.StatusCode.INVALID_ARGUMENT, "shares"),
    ("kind unspecified", dict(kind=pb.ENVELOPE_KIND_UNSPECIFIED),
     grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    ("kind unknown to the server", dict(kind=9), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    ("expiry over 24 h", dict(expiry_ms=24 * 3600 * 1000 + 1),
     grpc.StatusCode.INVALID_ARGUMENT, "expiry_ms"),
    ("negative expiry", dict(expiry_ms=-1), grpc.StatusCode.INVALID_ARGUMENT, "expiry_ms"),
    ("bad currency", dict(currency="yuan"), grpc.StatusCode.INVALID_ARGUMENT, "currency"),
    ("missing key", dict(idempotency_key=""), grpc.StatusCode.INVALID_ARGUMENT,
     "idempotency_key"),
    ("malformed sender", dict(sender_wallet_id="a/b"), grpc.StatusCode.INVALID_ARGUMENT,
     "sender_wallet_id"),
    ("receiver on a lucky envelope", dict(receiver_wallet_id="be-bob"),
     grpc.StatusCode.INVALID_ARGUMENT, "receiver_wallet_id"),
    ("exclusive without receiver", dict(kind=pb.ENVELOPE_KIND_EXCLUSIVE, shares=1),
     grpc.StatusCode.INVALID_ARGUMENT, "receiver_wallet_id"),
    ("exclusive in 5 shares", dict(kind=pb.ENVELOPE_KIND_EXCLUSIVE,
                                   receiver_wallet_id="be-bob"),
     grpc.StatusCode.INVALID_ARGUMENT, "shares"),
    ("exclusive to the sender", dict(kind=pb.ENVELOPE_KIND_EXCLUSIVE, shares=1,
                                     receiver_wallet_id="be-alice"),
     grpc.StatusCode.INVALID_ARGUMENT, "receiver_wallet_id"),
]


@pytest.mark.parametrize("name,fields,code,field", BAD_CREATES, ids=[b[0] for b in BAD_CREATES])
async def test_bad_create_is_refused_names_the_field_and_changes_nothing(client, name, fields,
                                                                         code, field):
    # A sender and a key per case: the module's server is shared by every case.
    case = BAD_CREATES.index(next(b for b in BAD_CREATES if b[0] == name))
    sender, key = f"be{case}-alice", f"bad-env-{case}"
    await wallets(client, sender, deposit=5_000)
    await wallets(client, "be-bob")
    before = await client.get_wallet(sender)
    request = dict(idempotency_key=key, sender_wallet_id=sender, total_minor=1_000,
                   shares=5, kind=pb.ENVELOPE_KIND_LUCKY, currency="CNY")
    request.update({k: sender if v == "be-alice" else v for k, v in fields.items()})
    error = await refused(client._call(client._envelopes.CreateEnvelope,
                                       pb.CreateEnvelopeRequest(**request), retry=False))
    assert (error.code, error.field) == (code, field), error
    assert error.message.startswith(field + ":")
    after = await client.get_wallet(sender)
    assert (after.balance_minor, after.version) == (before.balance_minor, before.version)
    # Nothing was created under the key: a good request with it creates the envelope.
    good = await client.create_envelope(sender, 1_000, 5, "LUCKY", "CNY",
                                        idempotency_key=key)
    assert not good.replayed


async def test_an_unfunded_create_is_refused_and_moves_nothing(client):
    await wallets(client, "uf-alice", deposit=500)
    error = await refused(client.create_envelope("uf-alice", 1_000, 5, "LUCKY", "CNY",
                                                 idempotency_key="env-uf"))
    assert (error.code, error.status) == (grpc.StatusCode.FAILED_PRECONDITION,
                                          "RESULT_STATUS_INSUFFICIENT_FUNDS")
    # The refusal names this request's field, not the funding transfer's.
    assert error.field == "total_minor"
    missing = await refused(client.create_envelope("uf-nobody", 1_000, 5, "LUCKY", "CNY",
                                                   idempotency_key="env-uf-2"))
    assert (missing.status, missing.field) == ("RESULT_STATUS_WALLET_NOT_FOUND",
                                               "sender_wallet_id")
    assert (await client.get_wallet("uf-alice")).balance_minor == 500
    # A state refusal is recorded under the key: the retry gets it again.
    again = await refused(client.create_envelope("uf-alice", 1_000, 5, "LUCKY", "CNY",
                                                 idempotency_key="env-uf"))
    assert again.status == "RESULT_STATUS_INSUFFICIENT_FUNDS"


# --- risk control: a frozen wallet (on both stores, on this module's servers) -----------------

async def test_a_frozen_sender_cannot_fund_and_a_frozen_receiver_still_gets_credits(client):
    await wallets(client, "fz-alice", "fz-bob", "fz-carol", deposit=2_000)
    frozen = await client.set_wallet_frozen("fz-alice", True, "card reported stolen")
    assert frozen.frozen and (await client.get_wallet("fz-alice")).frozen
    error = await refused(client.create_envelope("fz-alice", 1_000, 2, "FIXED", "CNY",
                                                 idempotency_key="env-fz"))
    assert (error.code, error.status, error.field) == (
        grpc.StatusCode.FAILED_PRECONDITION, "RESULT_STATUS_WALLET_FROZEN", "sender_wallet_id")
    transfer = await refused(client.transfer("fz-alice", "fz-bob", 10, "CNY"))
    assert transfer.status == "RESULT_STATUS_WALLET_FROZEN"
    assert (await client.get_wallet("fz-alice")).balance_minor == 2_000
    # A frozen receiver grabs, and the credit lands.
    await client.set_wallet_frozen("fz-carol", True)
    eid = (await create(client, "fz-bob", 600, 2, "FIXED", "env-fz-bob")).envelope.envelope_id
    grab = await client.grab_envelope(eid, "fz-carol", idempotency_key="g-fz-carol")
    await until(lambda: _credited(client, "fz-carol", 2_000 + grab.grab.amount_minor),
                "the frozen receiver's credit")
    # Unfrozen, the sender funds again (a new key: the refusal is recorded under the old).
    await client.set_wallet_frozen("fz-alice", False)
    assert (await create(client, "fz-alice", 1_000, 2, "FIXED", "env-fz-2")).envelope.shares == 2


async def _credited(client, wallet_id: str, balance: int) -> bool:
    return (await client.get_wallet(wallet_id)).balance_minor == balance


async def test_unknown_and_malformed_envelope_ids(client):
    await wallets(client, "id-bob")
    unknown = "e" + "0" * 24
    for call in (client.grab_envelope(unknown, "id-bob"), client.get_envelope(unknown)):
        error = await refused(call)
        assert (error.code, error.status, error.field) == (
            grpc.StatusCode.NOT_FOUND, "RESULT_STATUS_ENVELOPE_NOT_FOUND", "envelope_id")
    for call in (client.grab_envelope("not-an-envelope", "id-bob"),
                 client.get_envelope("not-an-envelope")):
        error = await refused(call)
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "envelope_id")
    assert (await client.get_wallet("id-bob")).balance_minor == 0


async def test_bad_grabs_name_the_field_and_change_nothing(client):
    await wallets(client, "bg-alice", deposit=5_000)
    await wallets(client, "bg-bob")
    await client.create_wallet("bg-usd", "USD")
    eid = (await create(client, "bg-alice", 100, 2, "LUCKY", "env-bg")).envelope.envelope_id
    cases = [
        (dict(receiver_wallet_id="ghost"), grpc.StatusCode.NOT_FOUND, "receiver_wallet_id"),
        (dict(receiver_wallet_id="bg-usd"), grpc.StatusCode.FAILED_PRECONDITION,
         "receiver_wallet_id"),
        (dict(receiver_wallet_id="~envelope:" + eid), grpc.StatusCode.INVALID_ARGUMENT,
         "receiver_wallet_id"),
        (dict(idempotency_key=""), grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
    ]
    for fields, code, field in cases:
        request = dict(idempotency_key="bg-key", envelope_id=eid,
                       receiver_wallet_id="bg-bob")
        request.update(fields)
        error = await refused(client._call(client._envelopes.GrabEnvelope,
                                           pb.GrabEnvelopeRequest(**request), retry=False))
        assert (error.code, error.field) == (code, field), (fields, error)
    view = await client.get_envelope(eid)
    assert (view.envelope.shares_left, view.envelope.amount_left_minor, len(view.grabs)) == (
        2, 100, 0)
    # The key was not consumed by a refusal.
    assert not (await client.grab_envelope(eid, "bg-bob", idempotency_key="bg-key")).replayed


# --- GrabEnvelopes ------------------------------------------------------------------------------

async def test_grab_envelopes_one_result_per_item(client):
    receivers = [f"gb-r{i}" for i in range(4)]
    await wallets(client, "gb-alice", deposit=5_000)
    await wallets(client, *receivers)
    eid = (await create(client, "gb-alice", 1_000, 3, "FIXED", "env-gb")).envelope.envelope_id

    def items():
        return [pb.GrabEnvelopeRequest(idempotency_key=f"gb-{i}", envelope_id=eid,
                                       receiver_wallet_id=r) for i, r in enumerate(receivers)] + [
            pb.GrabEnvelopeRequest(idempotency_key="gb-twice", envelope_id=eid,
                                   receiver_wallet_id=receivers[0]),
            pb.GrabEnvelopeRequest(idempotency_key="gb-bad", envelope_id="not-an-envelope",
                                   receiver_wallet_id=receivers[0]),
            pb.GrabEnvelopeRequest(idempotency_key="gb-unknown", envelope_id="e" + "0" * 24,
                                   receiver_wallet_id=receivers[0]),
        ]
    response = await client.grab_envelopes(items())
    results = list(response.results)
    assert [r.status for r in results] == [
        pb.RESULT_STATUS_OK, pb.RESULT_STATUS_OK, pb.RESULT_STATUS_OK,
        pb.RESULT_STATUS_ENVELOPE_SOLD_OUT, pb.RESULT_STATUS_ENVELOPE_ALREADY_GRABBED,
        pb.RESULT_STATUS_INVALID_ARGUMENT, pb.RESULT_STATUS_ENVELOPE_NOT_FOUND]
    assert [r.grab.amount_minor for r in results[:3]] == [334, 333, 333]
    assert [r.grab.position for r in results[:3]] == [0, 1, 2]
    assert not results[3].HasField("grab") and results[3].field == "envelope_id"
    # ALREADY_GRABBED carries the earlier grab.
    assert results[4].grab == results[0].grab and results[4].field == "receiver_wallet_id"
    assert results[5].field == "envelope_id" and not results[5].HasField("grab")
    assert results[6].field == "envelope_id"
    assert not any(r.replayed for r in results)

    again = list((await client.grab_envelopes(items())).results)
    assert [r.replayed for r in again[:3]] == [True] * 3
    assert [r.grab for r in again[:3]] == [r.grab for r in results[:3]]
    for r in results[:3]:
        await credited(client, r.grab.transfer_id)
    assert await balances(client, "gb-alice", *receivers) == {
        "gb-alice": 4_000, "gb-r0": 334, "gb-r1": 333, "gb-r2": 333, "gb-r3": 0}


async def test_oversized_grab_batch_is_refused_whole(client):
    items = [pb.GrabEnvelopeRequest(idempotency_key=f"o-{i}", envelope_id="e" + "0" * 24,
                                    receiver_wallet_id="nobody") for i in range(10_001)]
    error = await refused(client.grab_envelopes(items))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "grabs")


# --- ListEnvelopes and reads from the views ----------------------------------------------------

async def test_list_envelopes_sent_and_received_in_pages(client):
    await wallets(client, "ls-alice", deposit=5_000)
    await wallets(client, "ls-bob")
    sent, grabbed = [], []
    for i in range(3):
        envelope = (await create(client, "ls-alice", 30 + i, 3, "FIXED", f"env-ls-{i}")).envelope
        sent.append(envelope.envelope_id)
        grabbed.append((await client.grab_envelope(envelope.envelope_id, "ls-bob")).grab)

    async def all_pages(role: str, field: str) -> list:
        out, token = [], ""
        while True:
            page = await client.list_envelopes("ls-alice" if role == "SENT" else "ls-bob", role,
                                               page_size=2, page_token=token)
            items = list(getattr(page, field))
            assert len(items) <= 2 and not (page.envelopes and page.grabs)
            out.extend(items)
            token = page.next_page_token
            if not token:
                return out

    # The views follow the journal by a short delay.
    envelopes = await until(lambda: _complete(all_pages("SENT", "envelopes"), 3),
                            "the sent envelopes in the views")
    assert [e.envelope_id for e in envelopes] == sent
    assert [e.total_minor for e in envelopes] == [30, 31, 32]
    assert all(e.shares_left == 2 and e.state == pb.ENVELOPE_STATE_ACTIVE for e in envelopes)
    received = await until(lambda: _complete(all_pages("RECEIVED", "grabs"), 3),
                           "the received grabs in the views")
    assert received == grabbed
    assert len((await client.list_envelopes("ls-carol", "SENT")).envelopes) == 0

    for fields, field in ((dict(role=pb.ENVELOPE_ROLE_UNSPECIFIED), "role"),
                          (dict(wallet_id=""), "wallet_id"),
                          (dict(page_token="garbage"), "page_token")):
        request = dict(wallet_id="ls-alice", role=pb.ENVELOPE_ROLE_SENT)
        request.update(fields)
        error = await refused(client._call(client._envelopes.ListEnvelopes,
                                           pb.ListEnvelopesRequest(**request), retry=False))
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)


async def _complete(pages, count: int):
    items = await pages
    return items if len(items) == count else None


async def test_get_envelope_after_its_owner_forgot_it(client, ledger_server):
    await wallets(client, "fg-alice", deposit=5_000)
    await wallets(client, "fg-bob", "fg-carol")
    eid = (await create(client, "fg-alice", 100, 2, "LUCKY", "env-fg")).envelope.envelope_id
    grabs = [(await client.grab_envelope(eid, r)).grab for r in ("fg-bob", "fg-carol")]
    before = await client.get_envelope(eid)
    assert before.envelope.state == pb.ENVELOPE_STATE_SOLD_OUT
    # The owner forgets a closed envelope with the keys of its time (the retention window).
    shard = ledger_server.envelopes.shard_of_envelope(eid)
    owner = ledger_server.node.owners[shard]
    assert (await owner.submit(ExpireIdempotency(before.envelope.closed_at_ms + 1))).ok
    assert eid not in owner.state.envelopes

    async def from_views():
        try:
            view = await client.get_envelope(eid)
        except LedgerRefused as exc:
            assert exc.status == "RESULT_STATUS_ENVELOPE_NOT_FOUND"  # the views lag
            return None
        return view if view.envelope == before.envelope else None
    after = await until(from_views, "the envelope, as its owner last had it, in the views")
    assert list(after.grabs) == grabs and after.luckiest == luckiest_of(grabs)


# --- expiry ------------------------------------------------------------------------------------

async def test_an_expired_envelope_refunds_what_is_left_to_its_sender(client):
    await wallets(client, "xp-alice", deposit=5_000)
    await wallets(client, "xp-bob", "xp-carol")
    created = await create(client, "xp-alice", 1_000, 5, "LUCKY", "env-xp", expiry_ms=1_500)
    eid = created.envelope.envelope_id
    assert created.envelope.expires_at_ms - created.envelope.created_at_ms == 1_500
    grab = (await client.grab_envelope(eid, "xp-bob")).grab

    async def refunded():
        envelope = (await client.get_envelope(eid)).envelope
        return envelope if envelope.state == pb.ENVELOPE_STATE_REFUNDED else None
    envelope = await until(refunded, "the refund (the owner's sweep runs every second)")
    assert envelope.refunded_minor == 1_000 - grab.amount_minor
    assert (envelope.shares_left, envelope.amount_left_minor) == (4, 0)
    assert envelope.closed_at_ms >= envelope.expires_at_ms
    refund = await credited(client, envelope.refund_transfer_id)
    assert (refund.kind, refund.from_wallet_id, refund.to_wallet_id, refund.amount_minor) == (
        pb.TRANSFER_KIND_ENVELOPE_REFUND, envelope.escrow_wallet_id, "xp-alice",
        envelope.refunded_minor)
    await credited(client, grab.transfer_id)
    assert await balances(client, "xp-alice", "xp-bob") == {
        "xp-alice": 5_000 - grab.amount_minor, "xp-bob": grab.amount_minor}
    late = await refused(client.grab_envelope(eid, "xp-carol"))
    assert (late.code, late.status, late.field) == (
        grpc.StatusCode.FAILED_PRECONDITION, "RESULT_STATUS_ENVELOPE_EXPIRED", "envelope_id")


# --- the deployment's rules --------------------------------------------------------------------

async def test_a_server_enforces_its_own_envelope_rules(tmp_path):
    rules = EnvelopeRules(total_minor_max=500, shares_max=3, share_minor_min=10,
                          expiry_ms_max=60_000)
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS, envelope_rules=rules)
    try:
        assert running.envelopes.rules == rules
        async with LedgerClient(f"127.0.0.1:{running.port}", caller="tests",
                                retries=False) as client:
            await wallets(client, "ru-alice", deposit=5_000)
            for args, field, words in (((501, 3), "total_minor", "500"),
                                       ((500, 4), "shares", "1..3"),
                                       ((29, 3), "total_minor", "10 per share")):
                error = await refused(client.create_envelope("ru-alice", *args, "LUCKY", "CNY"))
                assert error.field == field and words in error.message, error
            error = await refused(client.create_envelope("ru-alice", 30, 3, "FIXED", "CNY",
                                                         expiry_ms=60_001))
            assert error.field == "expiry_ms"
            created = await client.create_envelope("ru-alice", 500, 3, "FIXED", "CNY")
            # No expiry given: the longest the rules allow.
            assert created.envelope.expires_at_ms - created.envelope.created_at_ms == 60_000
            assert created.envelope.min_share_minor == 10
    finally:
        await running.close(grace_s=0.5)


def _ledgerd_dev(data_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", "0", "--shards", "4",
            "--data-dir", str(data_dir), "--log-level", "WARNING",
            # No /metrics: tests run beside other ledgerd processes on the default port.
            "--metrics-port", "0", *flags]


@pytest.mark.parametrize("flags,words", [
    (("--envelope-shares-max", "0"), "shares_max must be 1.."),
    (("--envelope-total-max-minor", "100", "--envelope-share-min-minor", "101"),
     "share_minor_min must be 1..total_minor_max"),
    (("--envelope-expiry-max-s", "0"), "expiry_ms_max must be at least 1 ms"),
], ids=["no shares", "min share over the total", "no expiry"])
async def test_ledgerd_refuses_bad_envelope_flags(tmp_path, flags, words):
    process = await asyncio.create_subprocess_exec(
        *_ledgerd_dev(tmp_path, *flags), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode != 0 and b"serving" not in out
    message = err.decode()
    assert "bad red-envelope rules" in message and words in message, message
    assert flags[0] in message


async def test_ledgerd_envelope_flags_reach_the_rules(tmp_path):
    process = await asyncio.create_subprocess_exec(
        *_ledgerd_dev(tmp_path, "--envelope-shares-max", "3", "--envelope-total-max-minor",
                      "900", "--envelope-expiry-max-s", "2.5"),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        match = re.search(rb"serving ledger\.v1 on (\S+):(\d+)", line)
        assert match, line
        async with LedgerClient(f"{match.group(1).decode()}:{match.group(2).decode()}",
                                caller="tests", retries=False) as client:
            await wallets(client, "fl-alice", deposit=5_000)
            error = await refused(client.create_envelope("fl-alice", 900, 4, "LUCKY", "CNY"))
            assert (error.field, error.message) == ("shares", "shares: must be 1..3")
            error = await refused(client.create_envelope("fl-alice", 901, 3, "LUCKY", "CNY"))
            assert error.field == "total_minor" and "900" in error.message
            created = await client.create_envelope("fl-alice", 900, 3, "LUCKY", "CNY")
            assert created.envelope.expires_at_ms - created.envelope.created_at_ms == 2_500
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)


# --- the README's grpcurl walk-through -------------------------------------------------------

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(port: int, method: str, body: dict | None = None,
                  *flags: str) -> tuple[int, str, str]:
    """Run grpcurl as the README does (plaintext, caller ``demo``, server reflection)."""
    args = [GRPCURL, "-plaintext", "-H", "ledger-caller:demo", *flags]
    if body is not None:
        args += ["-d", json.dumps(body)]
    process = await asyncio.create_subprocess_exec(
        *args, f"127.0.0.1:{port}", *method.split(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def grpcurl_json(port: int, method: str, body: dict) -> dict:
    code, out, err = await grpcurl(port, method, body)
    assert code == 0, err
    return json.loads(out)


async def test_the_readme_grpcurl_walk_through(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    port = running.port
    try:
        code, out, _ = await grpcurl(port, "list")
        assert code == 0 and "ledger.v1.RedEnvelopeService" in out.split()
        health = await grpcurl_json(port, "grpc.health.v1.Health/Check",
                                    {"service": "ledger.v1.RedEnvelopeService"})
        assert health == {"status": "SERVING"}
        receivers = ["bob", "carol", "dave", "erin", "frank", "grace"]
        for w in ["alice", *receivers]:
            await grpcurl_json(port, "ledger.v1.LedgerService/CreateWallet",
                               {"idempotency_key": f"w-{w}", "wallet_id": w, "currency": "CNY"})
        await grpcurl_json(port, "ledger.v1.LedgerService/Deposit",
                           {"idempotency_key": "dep-1", "wallet_id": "alice",
                            "amount_minor": "10000", "currency": "CNY"})
        created = await grpcurl_json(
            port, "ledger.v1.RedEnvelopeService/CreateEnvelope",
            {"idempotency_key": "env-1", "sender_wallet_id": "alice", "total_minor": "1000",
             "shares": 5, "kind": "ENVELOPE_KIND_LUCKY", "currency": "CNY",
             "memo": "happy new year"})
        envelope = created["envelope"]
        # The id derives from the caller and the key: the README's id is everyone's.
        eid = envelope["envelope_id"]
        assert eid == "e1505a99203afdf95781d6692"
        assert (envelope["kind"], envelope["total_minor"], envelope["shares"]) == (
            "ENVELOPE_KIND_LUCKY", "1000", 5)
        assert created["funding"]["kind"] == "TRANSFER_KIND_ENVELOPE_FUND"

        async def state():
            answer = await grpcurl_json(port, "ledger.v1.RedEnvelopeService/GetEnvelope",
                                        {"envelope_id": eid})
            return answer["envelope"]["state"] != "ENVELOPE_STATE_FUNDING"
        await until(state, "funding")

        grabs = []
        for w in receivers[:5]:
            answer = await grpcurl_json(
                port, "ledger.v1.RedEnvelopeService/GrabEnvelope",
                {"idempotency_key": f"g-{w}", "envelope_id": eid, "receiver_wallet_id": w})
            grabs.append(answer["grab"])
        assert sum(int(g["amount_minor"]) for g in grabs) == 1000
        # grpcurl leaves out fields at their default: position 0 of the first grab.
        assert [g.get("position", 0) for g in grabs] == [0, 1, 2, 3, 4]
        code, out, err = await grpcurl(
            port, "ledger.v1.RedEnvelopeService/GrabEnvelope",
            {"idempotency_key": "g-grace", "envelope_id": eid, "receiver_wallet_id": "grace"},
            "-v")
        assert code != 0 and "Code: FailedPrecondition" in err
        assert "Message: envelope_id: every share of the envelope is taken" in err
        assert "ledger-status: RESULT_STATUS_ENVELOPE_SOLD_OUT" in out
        assert "ledger-field: envelope_id" in out

        for g in grabs:
            async def landed(transfer_id=g["transfer_id"]):
                answer = await grpcurl_json(port, "ledger.v1.LedgerService/GetTransfer",
                                            {"transfer_id": transfer_id})
                return answer["transfer"].get("credited", False)
            await until(landed, f"credit of {g['transfer_id']}")
        balances = {}
        for w in ["alice", *receivers]:
            wallet = (await grpcurl_json(port, "ledger.v1.LedgerService/GetWallet",
                                         {"wallet_id": w}))["wallet"]
            balances[w] = int(wallet.get("balance_minor", 0))
        assert balances == {"alice": 9_000, "grace": 0,
                            **{g["receiver_wallet_id"]: int(g["amount_minor"]) for g in grabs}}
    finally:
        await running.close(grace_s=0.5)
