"""Issue 7, defect 11: the client tells "refused" from "outcome unknown".

Both raised the same ``LedgerError``: a caller could not tell a final refusal from a request
that may have executed, and might resend an unknown one with a new key (twice the money).
"""

from __future__ import annotations

import socket

import grpc
import pytest

from clients import (LedgerClient, LedgerError, LedgerOutcomeUnknown, LedgerRefused,
                     LedgerUnavailable)
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc


async def test_refusal_is_final_and_named(client):
    with pytest.raises(LedgerRefused) as err:
        await client.deposit("nobody-here", 5, "CNY", idempotency_key="k1")
    assert isinstance(err.value, LedgerError)
    assert err.value.status == "RESULT_STATUS_WALLET_NOT_FOUND" and err.value.field == "to_wallet_id"
    assert not isinstance(err.value, LedgerOutcomeUnknown)


def _dead_port() -> int:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_no_answer_on_a_money_movement_is_an_unknown_outcome_with_its_key():
    async with LedgerClient(f"127.0.0.1:{_dead_port()}", caller="tests", timeout_s=1.0,
                            retries=False) as dead:
        with pytest.raises(LedgerOutcomeUnknown) as err:
            await dead.transfer("a", "b", 5, "CNY", idempotency_key="k-unknown")
        assert err.value.idempotency_key == "k-unknown" and err.value.attempts == 1
        assert err.value.code.name == "UNAVAILABLE"
        with pytest.raises(LedgerUnavailable):
            await dead.get_wallet("a")


async def test_envelope_calls_tell_refused_unknown_and_unavailable_apart():
    async with LedgerClient(f"127.0.0.1:{_dead_port()}", caller="tests", timeout_s=1.0,
                            retries=False) as dead:
        with pytest.raises(LedgerOutcomeUnknown) as err:
            await dead.create_envelope("a", 100, 2, "LUCKY", "CNY", idempotency_key="k-env")
        assert err.value.idempotency_key == "k-env"
        with pytest.raises(LedgerOutcomeUnknown) as err:
            await dead.grab_envelope("e" + "0" * 24, "b", idempotency_key="k-grab")
        assert err.value.idempotency_key == "k-grab"
        # A batch of grabs moves money: its items carry their keys.
        with pytest.raises(LedgerOutcomeUnknown):
            await dead.grab_envelopes([pb.GrabEnvelopeRequest(envelope_id="e" + "0" * 24,
                                                              receiver_wallet_id="b")])
        with pytest.raises(LedgerUnavailable):
            await dead.get_envelope("e" + "0" * 24)
        with pytest.raises(LedgerUnavailable):
            await dead.list_envelopes("a", "SENT")


class _FlakyEnvelopes(pb_grpc.RedEnvelopeServiceServicer):
    """Answers UNAVAILABLE to the first call of each method, then OK; keeps what it got."""

    def __init__(self) -> None:
        self.requests: list = []

    async def _answer(self, request, context, response):
        self.requests.append(request)
        if len(self.requests) % 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return response

    async def CreateEnvelope(self, request, context):
        return await self._answer(request, context, pb.CreateEnvelopeResponse())

    async def GrabEnvelope(self, request, context):
        return await self._answer(request, context, pb.GrabEnvelopeResponse())

    async def GrabEnvelopes(self, request, context):
        return await self._answer(request, context, pb.GrabEnvelopesResponse())


async def test_envelope_calls_are_retried_with_the_same_key():
    flaky = _FlakyEnvelopes()
    fake = grpc.aio.server()
    pb_grpc.add_RedEnvelopeServiceServicer_to_server(flaky, fake)
    port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    try:
        async with LedgerClient(f"127.0.0.1:{port}", caller="tests", timeout_s=5.0) as client:
            await client.create_envelope("a", 100, 2, "LUCKY", "CNY")
            await client.grab_envelope("e" + "0" * 24, "b")
            await client.grab_envelopes([pb.GrabEnvelopeRequest(envelope_id="e" + "0" * 24,
                                                                receiver_wallet_id="c")])
    finally:
        await fake.stop(None)
    create_1, create_2, grab_1, grab_2, batch_1, batch_2 = flaky.requests
    # A key was made for each call, and the retry sent the same one.
    assert create_1.idempotency_key and create_1 == create_2
    assert create_1.kind == pb.ENVELOPE_KIND_LUCKY
    assert grab_1.idempotency_key and grab_1 == grab_2
    assert batch_1.grabs[0].idempotency_key and batch_1 == batch_2
