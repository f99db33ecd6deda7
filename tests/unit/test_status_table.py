"""The one status table: the core's ``Status``, the wire's ``ResultStatus``, the gRPC code of
each status (``ledger.api.errors.GRPC_CODE``) and the table in proto/README.md all agree."""

import re
from pathlib import Path

import grpc

from ledger.api.errors import GRPC_CODE
from ledger.core.status import Status
from ledgerpb import ledger_pb2 as pb

PROTO_README = Path(__file__).resolve().parents[2] / "proto" / "README.md"


def test_every_status_is_on_the_wire_with_the_same_number():
    for status in Status:
        assert pb.ResultStatus.Value("RESULT_STATUS_" + status.name) == int(status)
    wire = {v.number for v in pb.ResultStatus.DESCRIPTOR.values} - {0}
    assert wire == {int(s) for s in Status}


def test_every_status_has_exactly_one_grpc_code():
    assert set(GRPC_CODE) == set(Status)
    assert GRPC_CODE[Status.OK] is grpc.StatusCode.OK
    assert GRPC_CODE[Status.INSUFFICIENT_FUNDS] is grpc.StatusCode.FAILED_PRECONDITION


def test_transient_statuses_are_the_retryable_codes():
    assert {s for s in Status if s.transient()} == {
        Status.REQUEST_IN_FLIGHT, Status.SHARD_UNAVAILABLE, Status.OVERLOADED}
    assert {GRPC_CODE[s] for s in Status if s.transient()} == {
        grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_the_core_knows_no_grpc_code():
    assert not hasattr(Status.OK, "grpc_code_name")


def test_the_documented_table_is_the_table():
    """Every row ``| STATUS, STATUS | CODE | retry? |`` of proto/README.md's status table."""
    documented = {}
    for line in PROTO_README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[A-Z_]+", cells[1]) and cells[1] != "OK":
            for name in cells[0].split(","):
                if name.strip() in Status.__members__:
                    documented[Status[name.strip()]] = cells[1]
    assert documented == {s: code.name for s, code in GRPC_CODE.items() if s is not Status.OK}
