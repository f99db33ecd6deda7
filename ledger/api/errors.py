"""The one table from domain outcomes to gRPC status (etcd's toGRPCErrorMap).

A refused unary call answers the table's code, a message "<field>: <why>", and the trailers
``ledger-status`` (the ResultStatus name) and ``ledger-field``. No internal error text leaks:
details come from the core's refusals, which are written for callers.
"""

from __future__ import annotations

import grpc

from ledger.core.status import Outcome, Status
from ledgerpb import ledger_pb2 as pb

GRPC_CODE: dict[Status, grpc.StatusCode] = {
    status: getattr(grpc.StatusCode, status.grpc_code_name()) for status in Status
}


def status_name(status: Status) -> str:
    return pb.ResultStatus.Name(int(status))


def message(outcome: Outcome) -> str:
    if outcome.field:
        return f"{outcome.field}: {outcome.detail}" if outcome.detail else outcome.field
    return outcome.detail or status_name(outcome.status)


async def abort(context: grpc.aio.ServicerContext, outcome: Outcome) -> None:
    """End the call with the outcome's gRPC code (raises, as ``context.abort`` does)."""
    context.set_trailing_metadata((("ledger-status", status_name(outcome.status)),
                                   ("ledger-field", outcome.field)))
    await context.abort(GRPC_CODE[outcome.status], message(outcome))
