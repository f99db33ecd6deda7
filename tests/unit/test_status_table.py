"""The core's Status enum and the wire's ResultStatus agree, and every status has a gRPC code."""

from ledger.core.status import Status
from ledgerpb import ledger_pb2 as pb


def test_every_status_is_on_the_wire_with_the_same_number():
    for status in Status:
        assert pb.ResultStatus.Value("RESULT_STATUS_" + status.name) == int(status)
    wire = {v.number for v in pb.ResultStatus.DESCRIPTOR.values} - {0}
    assert wire == {int(s) for s in Status}


def test_transient_statuses_are_the_retryable_codes():
    assert {s for s in Status if s.transient()} == {
        Status.REQUEST_IN_FLIGHT, Status.SHARD_UNAVAILABLE, Status.OVERLOADED}
    assert Status.INSUFFICIENT_FUNDS.grpc_code_name() == "FAILED_PRECONDITION"
