"""``ledger.v1.RedEnvelopeService``: as ``LedgerService``, each method validates (in the
coordinator's ``Envelopes``), delegates, and translates the outcome."""

from __future__ import annotations

from coordinator.envelopes import Envelopes, GrabItem
from ledger.api import convert
from ledger.api.servicer import abort, caller_of, deadline_of
from ledger.core import constants as C
from ledger.core import validate
from ledger.core.status import Outcome, Status
from ledger.runtime.clock import Clock, now_ms
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc


def _item(req: pb.GrabEnvelopeRequest) -> GrabItem:
    return GrabItem(req.idempotency_key, req.envelope_id, req.receiver_wallet_id)


class RedEnvelopeServicer(pb_grpc.RedEnvelopeServiceServicer):
    """Args:
        envelopes: The coordinator's envelope calls.
        clock_ms: The server's wall clock: an envelope's state depends on the time (an
            ACTIVE envelope past its expiry answers EXPIRED).
    """

    def __init__(self, envelopes: Envelopes, clock_ms: Clock = now_ms) -> None:
        self._e = envelopes
        self._clock_ms = clock_ms

    async def CreateEnvelope(self, request, context):
        outcome = await self._e.create(caller_of(context), request.idempotency_key,
                                       request.sender_wallet_id, request.total_minor,
                                       request.shares,
                                       convert.envelope_kind_from_proto(request.kind),
                                       request.currency, request.expiry_ms, request.memo,
                                       request.receiver_wallet_id,
                                       deadline=deadline_of(context),
                                       device_id=request.device_id)
        if not outcome.ok:
            await abort(context, outcome)
        envelope, funding = outcome.value
        return pb.CreateEnvelopeResponse(
            envelope=convert.envelope_to_proto(envelope, self._clock_ms()),
            replayed=outcome.replayed, funding=convert.transfer_to_proto(funding))

    async def GrabEnvelope(self, request, context):
        outcome = await self._e.grab(caller_of(context), _item(request),
                                     deadline=deadline_of(context))
        if not outcome.ok:
            # ENVELOPE_ALREADY_GRABBED too: its message says how much the wallet got.
            await abort(context, outcome)
        grab, transfer = outcome.value
        return pb.GrabEnvelopeResponse(grab=convert.grab_to_proto(grab),
                                       credited=transfer.credited, replayed=outcome.replayed)

    async def GrabEnvelopes(self, request, context):
        if len(request.grabs) > C.BATCH_TRANSFERS_MAX:
            await abort(context, Outcome(Status.BATCH_TOO_LARGE, "grabs",
                                         f"at most {C.BATCH_TRANSFERS_MAX} items per call "
                                         f"(got {len(request.grabs)})"))
        outcomes = await self._e.grab_many(caller_of(context),
                                           [_item(r) for r in request.grabs],
                                           deadline=deadline_of(context))
        results = []
        for outcome in outcomes:
            # protobuf takes the enum's int value; the generated .pyi lists only the enum type.
            if outcome.value is None:
                results.append(pb.GrabResult(
                    status=int(outcome.status),  # type: ignore[arg-type]
                    field=outcome.field, detail=outcome.detail, replayed=outcome.replayed))
                continue
            # OK: (grab, its transfer); ENVELOPE_ALREADY_GRABBED: (the earlier grab, None).
            # One constructor per result (no CopyFrom of a built Grab).
            grab, transfer = outcome.value
            results.append(pb.GrabResult(
                status=int(outcome.status),  # type: ignore[arg-type]
                field=outcome.field, detail=outcome.detail, replayed=outcome.replayed,
                grab=convert.grab_to_proto(grab),
                credited=transfer is not None and transfer.credited))
        return pb.GrabEnvelopesResponse(results=results)

    async def GetEnvelope(self, request, context):
        outcome = await self._e.get(request.envelope_id, request.page_size, request.page_token,
                                    deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        view = outcome.value
        response = pb.GetEnvelopeResponse(
            envelope=convert.envelope_to_proto(view.envelope, self._clock_ms()),
            grabs=[convert.grab_to_proto(g) for g in view.grabs],
            next_page_token=view.next_page_token)
        if view.luckiest is not None:
            response.luckiest.CopyFrom(convert.grab_to_proto(view.luckiest))
        return response

    async def ListEnvelopes(self, request, context):
        # The role is the API's (the coordinator takes sent or received); fields in request
        # order, as the coordinator checks them.
        bad = validate.wallet_id(request.wallet_id) or (
            None if request.role in (pb.ENVELOPE_ROLE_SENT, pb.ENVELOPE_ROLE_RECEIVED)
            else Outcome(Status.INVALID_ARGUMENT, "role", "must be SENT or RECEIVED"))
        if bad:
            await abort(context, bad)
        sent = request.role == pb.ENVELOPE_ROLE_SENT
        outcome = await self._e.list_for_wallet(request.wallet_id, sent, request.page_size,
                                                request.page_token)
        if not outcome.ok:
            await abort(context, outcome)
        items, next_token = outcome.value
        if sent:
            now = self._clock_ms()
            return pb.ListEnvelopesResponse(
                envelopes=[convert.envelope_to_proto(e, now) for e in items],
                next_page_token=next_token)
        return pb.ListEnvelopesResponse(grabs=[convert.grab_to_proto(g) for g in items],
                                        next_page_token=next_token)
