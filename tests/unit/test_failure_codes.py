"""``ledger.api.errors.failure_code``: which gRPC code a call answers for an exception that
escaped its servicer. Outages of what the ledger needs are UNAVAILABLE (retry with the same
key), bugs INTERNAL, and the call machinery's CANCELLED and DEADLINE_EXCEEDED keep their code."""

import sqlite3

import grpc
import pytest
from cassandra import OperationTimedOut, Unavailable
from cassandra.cluster import NoHostAvailable
from grpc.aio import AioRpcError, Metadata

from ledger.api.errors import failure_code
from ledger.core.invariants import InvariantViolation
from ledger.store.port import Fenced, StoreUnavailable, UnknownOutcome

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INTERNAL = grpc.StatusCode.INTERNAL


def _rpc_error(code: grpc.StatusCode) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details="from another node")


@pytest.mark.parametrize("exc, code", [
    (StoreUnavailable("x"), UNAVAILABLE),
    (UnknownOutcome("x"), UNAVAILABLE),
    (Fenced("x"), UNAVAILABLE),
    (sqlite3.OperationalError("x"), UNAVAILABLE),
    (ConnectionResetError("x"), UNAVAILABLE),
    (OSError("x"), UNAVAILABLE),
    (TimeoutError("x"), UNAVAILABLE),
    (OperationTimedOut("x"), UNAVAILABLE),
    (Unavailable("x", consistency=4, required_replicas=2, alive_replicas=1), UNAVAILABLE),
    (NoHostAvailable("x", {}), UNAVAILABLE),
    (_rpc_error(grpc.StatusCode.UNAVAILABLE), UNAVAILABLE),
    (_rpc_error(grpc.StatusCode.INTERNAL), UNAVAILABLE),
    (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), grpc.StatusCode.DEADLINE_EXCEEDED),
    (_rpc_error(grpc.StatusCode.CANCELLED), grpc.StatusCode.CANCELLED),
    (KeyError("x"), INTERNAL),
    (TypeError("x"), INTERNAL),
    (InvariantViolation("x"), INTERNAL),
    (RuntimeError("x"), INTERNAL),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name)
def test_failure_code(exc, code):
    assert failure_code(exc) is code


def test_a_timeout_after_the_calls_deadline_is_the_deadline():
    assert failure_code(TimeoutError(), deadline_passed=True) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure_code(StoreUnavailable(), deadline_passed=True) is UNAVAILABLE


class _GoneContext:
    """A call whose deadline has passed: sending its answer fails (grpc's ExecuteBatchError)."""

    def __init__(self) -> None:
        self.aborts = 0

    def time_remaining(self):
        return -0.1

    def cancelled(self):
        return False

    def set_trailing_metadata(self, md):
        pass

    async def abort(self, code, message):
        self.aborts += 1
        raise RuntimeError("Abort already called!" if self.aborts > 1 else "execute_batch")


async def test_a_call_whose_caller_is_gone_is_not_reported_as_an_internal_error(caplog):
    import asyncio

    from ledger.api.errors import _guarded

    async def servicer(request, context):
        await context.abort(None, "deadline exceeded")  # fails: the call is over

    context = _GoneContext()
    with caplog.at_level("INFO", logger="ledger.api"):
        try:
            await _guarded("/ledger.v1.LedgerService/GetWallet", servicer)(None, context)
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the call should end as cancelled")
    assert context.aborts == 1  # no second abort
    assert "INTERNAL" not in caplog.text and "ended before its answer" in caplog.text


class _ResetContext(_GoneContext):
    """A call the caller reset (RST_STREAM) a moment before its deadline: the context says
    neither cancelled nor past its deadline yet, but sending the answer fails with grpc's own
    ExecuteBatchError (seen in a kill-region drill: logged as INTERNAL, then "Abort already
    called!" from the second abort)."""

    def time_remaining(self):
        return 0.4

    async def abort(self, code, message):
        from grpc._cython.cygrpc import ExecuteBatchError

        self.aborts += 1
        if self.aborts > 1:
            raise RuntimeError("Abort already called!")
        raise ExecuteBatchError("Failed \"execute_batch\"")


async def test_a_call_reset_before_its_deadline_is_not_reported_as_an_internal_error(caplog):
    import asyncio

    from ledger.api.errors import _guarded

    async def servicer(request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds")

    context = _ResetContext()
    with caplog.at_level("INFO", logger="ledger.api"):
        with pytest.raises(asyncio.CancelledError):
            await _guarded("/ledger.v1.LedgerService/Transfer", servicer)(None, context)
    assert context.aborts == 1  # no second abort
    assert "INTERNAL" not in caplog.text and "ended before its answer" in caplog.text
