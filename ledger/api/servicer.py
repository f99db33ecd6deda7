"""``ledger.v1.LedgerService``: each method validates, delegates to the coordinator, and
translates the outcome (three steps, nothing else)."""

from __future__ import annotations

import grpc

import asyncio
import contextvars

from coordinator import Coordinator, TransferItem
from coordinator.changes import ChangeFeed, Compacted, event_json
from coordinator.constants import REQUEST_DEADLINE_DEFAULT_S
from ledger import metrics
from ledger.api import convert
from ledger.api import errors
from ledger.api.errors import status_name
from ledger.core import constants as C
from ledger.core.model import KIND_DEPOSIT, KIND_WITHDRAWAL
from ledger.core.status import Outcome, Status
from ledger.security.authz import PRIVILEGED_NEGATIVE_WALLET, Authorizer, current_principal
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

CALLER_METADATA = "ledger-caller"
ANONYMOUS = "anonymous"


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """The caller an idempotency key is scoped to: the certificate's identity under mutual
    TLS (the ``ledger-caller`` header is then ignored), else the header."""
    principal = current_principal()
    if principal is not None:
        return principal
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_METADATA:
            return value
    return ANONYMOUS


# The deadline of the call this task serves (each call runs in a task of its own).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("ledger_deadline",
                                                                         default=None)


def deadline_of(context: grpc.aio.ServicerContext) -> float:
    """The caller's gRPC deadline as a point on the event loop's clock (monotonic), or the
    default deadline (``REQUEST_DEADLINE_DEFAULT_S`` from now) when the caller sent none.
    The coordinator passes it to every shard call of the request."""
    remaining_s = context.time_remaining()
    if remaining_s is None:
        remaining_s = REQUEST_DEADLINE_DEFAULT_S
    deadline = asyncio.get_running_loop().time() + remaining_s
    _deadline.set(deadline)
    return deadline


async def abort(context: grpc.aio.ServicerContext, outcome: Outcome) -> None:
    """End the call with the outcome (``errors.abort``), except when the call's deadline
    has passed and the outcome is transient: the shard calls stopped because the caller's
    deadline did, so the call ends DEADLINE_EXCEEDED, as gRPC itself ends it at the caller's
    side (whichever comes first, the caller sees the same code: may have executed, retry
    with the same key)."""
    deadline = _deadline.get()
    if (deadline is not None and outcome.status.transient()
            and asyncio.get_running_loop().time() >= deadline):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    await errors.abort(context, outcome)


def _item(req: pb.TransferRequest) -> TransferItem:
    return TransferItem(req.idempotency_key, req.from_wallet_id, req.to_wallet_id,
                        req.amount_minor, req.currency, req.memo, linked=req.linked,
                        device_id=req.device_id)


class LedgerServicer(pb_grpc.LedgerServiceServicer):
    """Args:
        authorizer: The policy (mutual TLS on), for actions finer than a method; None when
            the port has no TLS (loopback development).
    """

    def __init__(self, coordinator: Coordinator, authorizer: Authorizer | None = None,
                 changes: ChangeFeed | None = None, shard_count: int = 0) -> None:
        self._c = coordinator
        self._authz = authorizer
        self._changes = changes
        self._shard_count = shard_count

    async def CreateWallet(self, request, context):
        if request.allow_negative and self._authz is not None and not self._authz.allows(
                current_principal(), PRIVILEGED_NEGATIVE_WALLET):
            # A wallet that may go negative can create money: privileged principals only.
            context.set_trailing_metadata((("ledger-field", "allow_negative"),))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "allow_negative: only privileged callers may create a wallet "
                                "that can go below zero")
        outcome = await self._c.create_wallet(caller_of(context), request.idempotency_key,
                                              request.wallet_id, request.currency,
                                              request.allow_negative,
                                              deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        return pb.CreateWalletResponse(
            wallet=convert.wallet_to_proto(outcome.value, self._c.shard_of(request.wallet_id)),
            replayed=outcome.replayed)

    async def _wallet(self, wallet_id: str, context) -> pb.Wallet:
        """The wallet with its risk controls, as its owner holds it now."""
        outcome = await self._c.get_wallet(wallet_id, deadline=deadline_of(context),
                                           with_risk=True)
        if not outcome.ok:
            await abort(context, outcome)
        wallet, risk = outcome.value
        return convert.wallet_to_proto(wallet, self._c.shard_of(wallet_id), risk)

    async def GetWallet(self, request, context):
        return pb.GetWalletResponse(wallet=await self._wallet(request.wallet_id, context))

    async def SetWalletFrozen(self, request, context):
        outcome = await self._c.set_frozen(caller_of(context), request.wallet_id,
                                           request.frozen, request.reason,
                                           deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        return pb.GetWalletResponse(wallet=await self._wallet(request.wallet_id, context))

    async def SetRiskLimits(self, request, context):
        outcome = await self._c.set_risk_limits(
            caller_of(context), request.wallet_id, request.window_ms, request.max_amount_minor,
            request.max_count, request.step_up_above_minor, request.reason,
            deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        if not request.wallet_id:
            return pb.SetRiskLimitsResponse(shards=outcome.value)
        return pb.SetRiskLimitsResponse(wallet=await self._wallet(request.wallet_id, context),
                                        shards=outcome.value)

    async def ConfirmDevice(self, request, context):
        outcome = await self._c.confirm_device(caller_of(context), request.wallet_id,
                                               request.device_id, not request.forget,
                                               request.reason, deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        return pb.GetWalletResponse(wallet=await self._wallet(request.wallet_id, context))

    async def Deposit(self, request, context):
        outcome = await self._c.deposit(caller_of(context), request.idempotency_key,
                                        request.wallet_id, request.amount_minor,
                                        request.currency, request.memo,
                                        deadline=deadline_of(context))
        return await self._transfer_response(outcome, context)

    async def Withdraw(self, request, context):
        outcome = await self._c.withdraw(caller_of(context), request.idempotency_key,
                                         request.wallet_id, request.amount_minor,
                                         request.currency, request.memo,
                                         deadline=deadline_of(context),
                                         device_id=request.device_id)
        return await self._transfer_response(outcome, context)

    async def Transfer(self, request, context):
        outcome = await self._c.transfer(caller_of(context), _item(request),
                                         deadline=deadline_of(context))
        metrics.TRANSFERS_COMMITTED.inc(int(outcome.ok and not outcome.replayed))
        return await self._transfer_response(outcome, context)

    async def _transfer_response(self, outcome: Outcome, context) -> pb.TransferResponse:
        if not outcome.ok:
            await abort(context, outcome)
        return pb.TransferResponse(transfer=convert.transfer_to_proto(outcome.value),
                                   replayed=outcome.replayed)

    async def BatchTransfer(self, request, context):
        if len(request.transfers) > C.BATCH_TRANSFERS_MAX:
            await abort(context, Outcome(Status.BATCH_TOO_LARGE, "transfers",
                                         f"at most {C.BATCH_TRANSFERS_MAX} items per call "
                                         f"(got {len(request.transfers)})"))
        outcomes = await self._c.batch_transfer(caller_of(context),
                                                [_item(r) for r in request.transfers],
                                                deadline=deadline_of(context))
        metrics.TRANSFERS_COMMITTED.inc(sum(o.ok and not o.replayed for o in outcomes))
        results = []
        for outcome in outcomes:
            # protobuf takes the enum's int value; the generated .pyi lists only the enum type.
            result = pb.TransferResult(status=int(outcome.status),  # type: ignore[arg-type]
                                       field=outcome.field,
                                       detail=outcome.detail, replayed=outcome.replayed)
            if outcome.value is not None:
                result.transfer.CopyFrom(convert.transfer_to_proto(outcome.value))
            results.append(result)
        return pb.BatchTransferResponse(results=results)

    async def GetTransfer(self, request, context):
        outcome = await self._c.get_transfer(request.transfer_id,
                                             deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        return pb.GetTransferResponse(transfer=convert.transfer_to_proto(outcome.value))

    async def ListWalletEntries(self, request, context):
        outcome = await self._c.list_entries(request.wallet_id, request.page_size,
                                             request.page_token, deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        entries, next_token = outcome.value
        return pb.ListWalletEntriesResponse(
            entries=[convert.entry_to_proto(e) for e in entries], next_page_token=next_token)

    async def GetBalanceAt(self, request, context):
        outcome = await self._c.balance_at(request.wallet_id, request.version, request.at_ms,
                                           deadline=deadline_of(context))
        if not outcome.ok:
            await abort(context, outcome)
        b = outcome.value
        return pb.GetBalanceAtResponse(wallet_id=b.wallet_id, currency=b.currency,
                                       balance_minor=b.balance_minor, version=b.version,
                                       at_ms=b.at_ms)

    async def WatchChanges(self, request, context):
        count, changes = self._shard_count, self._changes
        if changes is None or not count:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no change feed on this port")
            return
        for field, shards in (("shards", list(request.shards)),
                              ("positions", [p.shard for p in request.positions])):
            wrong = [s for s in shards if s >= count]
            if wrong:
                await abort(context, Outcome(Status.INVALID_ARGUMENT, field,
                                             f"shard {wrong[0]} is not in 0..{count - 1}"))
        shards = sorted(set(request.shards)) or list(range(count))
        positions = {p.shard: p.after_seq for p in request.positions}
        try:
            async for change in changes.watch(shards, positions, request.follow):
                yield pb.ChangeBatch(shard=change.shard, seq=change.seq, epoch=change.epoch,
                                     events=[pb.ChangeEvent(type=type(e).__name__,
                                                            json=event_json(e))
                                             for e in change.events])
        except Compacted as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))

    async def CreateHold(self, request, context):
        outcome = await self._c.create_hold(caller_of(context), request.idempotency_key,
                                            request.wallet_id, request.amount_minor,
                                            request.currency, request.timeout_ms,
                                            deadline=deadline_of(context),
                                            device_id=request.device_id)
        return await self._hold_response(outcome, context)

    async def CaptureHold(self, request, context):
        outcome = await self._c.capture_hold(caller_of(context), request.idempotency_key,
                                             request.hold_id, request.amount_minor,
                                             request.to_wallet_id, request.memo,
                                             deadline=deadline_of(context))
        return await self._transfer_response(outcome, context)

    async def ReleaseHold(self, request, context):
        outcome = await self._c.release_hold(caller_of(context), request.idempotency_key,
                                             request.hold_id, deadline=deadline_of(context))
        return await self._hold_response(outcome, context)

    async def GetHold(self, request, context):
        return await self._hold_response(
            await self._c.get_hold(request.hold_id, deadline=deadline_of(context)), context)

    async def _hold_response(self, outcome: Outcome, context) -> pb.HoldResponse:
        if not outcome.ok:
            await abort(context, outcome)
        return pb.HoldResponse(hold=convert.hold_to_proto(outcome.value),
                               replayed=outcome.replayed)


__all__ = ["LedgerServicer", "caller_of", "status_name", "KIND_DEPOSIT", "KIND_WITHDRAWAL"]
