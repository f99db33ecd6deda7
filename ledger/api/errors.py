"""The API's boundary: what a caller of ``ledger.v1`` sees when a call does not succeed.

Two sources, one place (etcd's ``v3rpc/util.go`` and its ``toGRPCErrorMap``):

* **Refusals** are domain outcomes (``Status`` values, written for callers). ``GRPC_CODE`` is
  the one table from a status to its gRPC code. A refused unary call answers that code, a
  message ``"<field>: <why>"``, and the trailers ``ledger-status`` (the ResultStatus name)
  and ``ledger-field``.
* **Failures** are exceptions that escape a servicer method: store errors, driver errors,
  node-to-node call errors, bugs. ``ErrorBoundary`` (a server interceptor on the public
  services) answers them with UNAVAILABLE (the ledger could not reach what it needs: retry
  with the same idempotency key) or INTERNAL (a bug), with a fixed message and a reference
  (``ref``, also in the trailer ``ledger-error-id``). The exception itself, whose text may
  name hosts, keyspaces or internal state, goes only to the server's log, under the same
  reference. CANCELLED and DEADLINE_EXCEEDED belong to the call machinery and pass through
  with their own code.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ledger.core.status import Outcome, Status
from ledger.store.port import StoreError
from ledgerpb import ledger_pb2 as pb

log = logging.getLogger("ledger.api")

# The one table from domain outcomes to gRPC codes. ``tests/unit/test_status_table.py`` pins
# that every status has a code and that it agrees with proto/README.md.
GRPC_CODE: dict[Status, grpc.StatusCode] = {
    Status.OK: grpc.StatusCode.OK,
    # The request itself is wrong; nothing was looked up.
    Status.INVALID_IDEMPOTENCY_KEY: grpc.StatusCode.INVALID_ARGUMENT,
    Status.INVALID_WALLET_ID: grpc.StatusCode.INVALID_ARGUMENT,
    Status.INVALID_CURRENCY: grpc.StatusCode.INVALID_ARGUMENT,
    Status.INVALID_AMOUNT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.SAME_WALLET: grpc.StatusCode.INVALID_ARGUMENT,
    Status.BATCH_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.LINKED_CHAIN_OPEN: grpc.StatusCode.INVALID_ARGUMENT,
    Status.WALLET_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.TRANSFER_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.HOLD_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.ENVELOPE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.ENVELOPE_UNFUNDED: grpc.StatusCode.NOT_FOUND,
    Status.WALLET_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Status.IDEMPOTENCY_KEY_REUSED: grpc.StatusCode.ALREADY_EXISTS,
    Status.ENVELOPE_ALREADY_GRABBED: grpc.StatusCode.ALREADY_EXISTS,
    # A valid request, refused by the state of the ledger (recorded under the key).
    Status.CURRENCY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Status.INSUFFICIENT_FUNDS: grpc.StatusCode.FAILED_PRECONDITION,
    Status.BALANCE_OVERFLOW: grpc.StatusCode.FAILED_PRECONDITION,
    Status.WALLET_FROZEN: grpc.StatusCode.FAILED_PRECONDITION,
    Status.HOLD_NOT_ACTIVE: grpc.StatusCode.FAILED_PRECONDITION,
    Status.HOLD_AMOUNT_EXCEEDED: grpc.StatusCode.FAILED_PRECONDITION,
    Status.LINKED_ITEM_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    Status.ENVELOPE_SOLD_OUT: grpc.StatusCode.FAILED_PRECONDITION,
    Status.ENVELOPE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Status.ENVELOPE_NOT_ELIGIBLE: grpc.StatusCode.FAILED_PRECONDITION,
    Status.VELOCITY_LIMIT_EXCEEDED: grpc.StatusCode.FAILED_PRECONDITION,
    Status.STEP_UP_REQUIRED: grpc.StatusCode.FAILED_PRECONDITION,
    # Transient: the same request (same key) may succeed later.
    Status.REQUEST_IN_FLIGHT: grpc.StatusCode.ABORTED,
    Status.SHARD_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# What a caller reads when a call failed for a reason other than a refusal. Fixed texts: the
# cause stays in the server's log, under the reference appended to the message.
UNAVAILABLE_MESSAGE = ("the ledger cannot complete this request right now (its storage or a "
                       "node it needs is unavailable); retry it with the same idempotency key")
INTERNAL_MESSAGE = ("internal error in the ledger; the request may or may not have been "
                    "executed: retry it with the same idempotency key, and quote the reference "
                    "to the ledger's operators")
# The codes of the call machinery, and the messages gRPC itself gives them.
PASS_THROUGH_MESSAGE = {
    grpc.StatusCode.CANCELLED: "Cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "Deadline Exceeded",
}

# Trailer naming the reference of a failure (the same as in the message and the log).
ERROR_ID_TRAILER = "ledger-error-id"

# Exceptions meaning "something the ledger needs could not be reached": the store port's
# errors (StoreUnavailable, UnknownOutcome, Fenced), the network, SQLite, a node-to-node call.
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    StoreError, ConnectionError, TimeoutError, OSError, sqlite3.Error, grpc.aio.AioRpcError)
# Drivers whose exceptions are outages too, recognized by the top-level module of the
# exception's class, so that this layer needs no import of the drivers.
_DRIVER_MODULES = frozenset({"cassandra", "pyetcd", "etcd3"})


def status_name(status: Status) -> str:
    """The ``ResultStatus`` enum name of a status (``RESULT_STATUS_INSUFFICIENT_FUNDS``)."""
    return pb.ResultStatus.Name(int(status))


def message(outcome: Outcome) -> str:
    """The caller's message of a refusal: ``"<field>: <why>"``, or what of it there is."""
    if outcome.field:
        return f"{outcome.field}: {outcome.detail}" if outcome.detail else outcome.field
    return outcome.detail or status_name(outcome.status)


async def abort(context: grpc.aio.ServicerContext, outcome: Outcome) -> None:
    """End the call with the outcome's gRPC code (raises, as ``context.abort`` does)."""
    context.set_trailing_metadata((("ledger-status", status_name(outcome.status)),
                                   ("ledger-field", outcome.field)))
    await context.abort(GRPC_CODE[outcome.status], message(outcome))


def failure_code(exc: BaseException, deadline_passed: bool = False) -> grpc.StatusCode:
    """The gRPC code a failed call answers for an exception that escaped its servicer.

    Args:
        exc: The exception.
        deadline_passed: True when the call's own deadline has passed: a timeout is then the
            caller's deadline, not an outage.

    Returns:
        CANCELLED or DEADLINE_EXCEEDED for the call machinery's own errors (also when a
        node-to-node call reports them), UNAVAILABLE for an outage of something the ledger
        needs, INTERNAL for anything else (a bug).
    """
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in PASS_THROUGH_MESSAGE:
        return exc.code()
    if isinstance(exc, TimeoutError) and deadline_passed:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return grpc.StatusCode.UNAVAILABLE
    if type(exc).__module__.partition(".")[0] in _DRIVER_MODULES:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def new_error_id() -> str:
    """A reference of one failure, shown to the caller and written to the log (16 hex)."""
    return uuid.uuid4().hex[:16]


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining_s = context.time_remaining()
    return remaining_s is not None and remaining_s <= 0


async def fail(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    """End a call whose servicer raised ``exc`` (raises, as ``context.abort`` does).

    Args:
        context: The call's context.
        method: The full method name (``/ledger.v1.LedgerService/Transfer``), for the log.
        exc: The exception that escaped the servicer.
    """
    code = failure_code(exc, _deadline_passed(context))
    if code in PASS_THROUGH_MESSAGE:
        await context.abort(code, PASS_THROUGH_MESSAGE[code])
    error_id = new_error_id()
    # The only place the exception's text goes: the server's log, under the reference the
    # caller holds.
    log.error("%s failed (ref %s), answered %s", method, error_id, code.name,
              exc_info=(type(exc), exc, exc.__traceback__))
    context.set_trailing_metadata(((ERROR_ID_TRAILER, error_id),))
    text = UNAVAILABLE_MESSAGE if code is grpc.StatusCode.UNAVAILABLE else INTERNAL_MESSAGE
    await context.abort(code, f"{text} (ref {error_id})")


UnaryHandler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

try:
    # grpc's "could not send on this call" (the caller reset the stream): the call is over.
    from grpc._cython.cygrpc import ExecuteBatchError as _SendFailed
except ImportError:  # pragma: no cover - another grpc build: the checks below still hold
    _SendFailed = ()


def _guarded(method: str, handler: UnaryHandler) -> UnaryHandler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            # The call was cancelled (or its deadline passed: gRPC cancels the handler), or
            # the servicer already answered with a refusal: both stand as they are.
            raise
        except Exception as exc:
            if (isinstance(exc, _SendFailed) or _deadline_passed(context)
                    or context.cancelled()):
                # The caller is gone: its deadline passed (the servicer's own abort then
                # fails to send, ExecuteBatchError), it cancelled, or it reset the stream
                # before either shows on the context (the send failed all the same). Nothing
                # can be answered and a second abort would only fail again ("Abort already
                # called!"); end the call as cancelled.
                log.info("%s: the call ended before its answer was sent (%s)", method,
                         type(exc).__name__)
                raise asyncio.CancelledError() from exc
            await fail(context, method, exc)
    return guarded


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Server interceptor: no exception of a public method reaches its caller as such.

    Args:
        services: Full names of the services it guards (``ledger.v1.LedgerService``). Others
            (the node-to-node service, health, reflection) are left as they are: the
            node-to-node caller is the ledger itself, which needs its errors.
    """

    def __init__(self, services: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(
                self._prefixes):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guarded(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
