"""The API is a boundary: what a caller sees when a call fails for a reason other than a
refusal, on the embedded default (a real ``ledgerd dev`` server in this process).

* A store error, a driver error or an outage raised anywhere behind a servicer reaches the
  caller as UNAVAILABLE, a bug as INTERNAL, each with a fixed message and a reference; the
  exception's text (hosts, keyspaces, paths) is never in the answer, only in the server's log
  under the same reference.
* A journal append that fails (the failpoint ``owner.append_unavailable``) answers
  UNAVAILABLE with the owner's fixed message, and the same request with the same key, sent
  again once the store is back, moves the money exactly once.
* CANCELLED and DEADLINE_EXCEEDED belong to the call machinery: a call whose deadline passes
  (or that the client cancels) while its append hangs ends with that code, not UNAVAILABLE,
  and the server logs no failure for it.

Faults are injected into the real embedded store and coordinator of the running server (an
append held on an event, a read raising SQLite's own error), not into a mock of them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3

import grpc
import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from clients import LedgerClient, LedgerOutcomeUnknown, LedgerUnavailable
from ledger import server
from ledger.runtime import failpoints
from ledger.api.errors import INTERNAL_MESSAGE, UNAVAILABLE_MESSAGE
from ledger.store.port import Fenced, StoreUnavailable, UnknownOutcome

SHARDS = 4
# Text that only the server's log may contain.
SECRET = "keyspace ledger_prod on cass-7.dc1.internal:9042"
REF = re.compile(r"\(ref ([0-9a-f]{16})\)$")


@pytest.fixture
async def running(tmp_path):
    ledger = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        yield ledger
    finally:
        await ledger.close(grace_s=0.5)


@pytest.fixture
async def ledger(running):
    async with LedgerClient(f"127.0.0.1:{running.port}", caller="tests", retries=False) as c:
        await c.create_wallet("alice", "CNY")
        await c.deposit("alice", 10_000, "CNY")
        yield c


def _assert_no_internal_text(error, expected_message: str, caplog) -> str:
    """The answer is the fixed message and a reference; the log has the cause under it."""
    match = REF.search(error.message)
    assert match, error.message
    error_id = match.group(1)
    assert error.message == f"{expected_message} (ref {error_id})"
    assert error.error_id == error_id
    assert SECRET not in str(error)
    logged = [r for r in caplog.records if r.name == "ledger.api" and error_id in r.getMessage()]
    assert len(logged) == 1 and SECRET in logged[0].exc_text
    return error_id


OUTAGES = [StoreUnavailable(f"cannot connect to {SECRET}"), UnknownOutcome(f"CAS timeout {SECRET}"),
           Fenced(f"epoch 7 < 9 on {SECRET}"), sqlite3.OperationalError(f"disk I/O error {SECRET}"),
           ConnectionRefusedError(f"connect {SECRET}"), OperationTimedOut(f"timed out {SECRET}"),
           NoHostAvailable(f"no host {SECRET}", {})]


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: type(e).__name__)
async def test_an_outage_behind_a_money_movement_is_unavailable_without_its_text(
        running, ledger, monkeypatch, caplog, exc):
    async def outage(*args, **kwargs):
        raise exc
    monkeypatch.setattr(running.coordinator, "transfer", outage)
    with pytest.raises(LedgerOutcomeUnknown) as err:
        await ledger.transfer("alice", "bob", 5, "CNY", idempotency_key="t-1")
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    _assert_no_internal_text(err.value, UNAVAILABLE_MESSAGE, caplog)


async def test_a_store_read_that_fails_is_unavailable_without_its_text(running, ledger,
                                                                        monkeypatch, caplog):
    async def failing_read(*args, **kwargs):
        raise sqlite3.OperationalError(f"database disk image is malformed: {SECRET}")
    monkeypatch.setattr(running.store, "list_entries", failing_read)
    with pytest.raises(LedgerUnavailable) as err:
        await ledger.list_entries("alice")
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    _assert_no_internal_text(err.value, UNAVAILABLE_MESSAGE, caplog)


async def test_a_bug_is_internal_without_its_text_and_its_outcome_is_unknown(
        running, ledger, monkeypatch, caplog):
    async def bug(*args, **kwargs):
        raise KeyError(SECRET)
    monkeypatch.setattr(running.coordinator, "batch_transfer", bug)
    with pytest.raises(LedgerOutcomeUnknown) as err:
        await ledger.deposit("alice", 5, "CNY", idempotency_key="d-bug")
    assert err.value.code is grpc.StatusCode.INTERNAL
    assert err.value.idempotency_key == "d-bug"
    _assert_no_internal_text(err.value, INTERNAL_MESSAGE, caplog)
    monkeypatch.setattr(running.coordinator, "get_wallet", bug)
    with pytest.raises(LedgerUnavailable) as err:
        await ledger.get_wallet("alice")
    assert err.value.code is grpc.StatusCode.INTERNAL


async def test_refusals_keep_their_own_code_and_message(ledger, caplog):
    with pytest.raises(Exception) as err:
        await ledger.withdraw("alice", 1_000_000, "CNY")
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.status == "RESULT_STATUS_INSUFFICIENT_FUNDS" and not err.value.error_id
    assert not [r for r in caplog.records if r.name == "ledger.api"]


async def test_a_failing_append_is_unavailable_and_the_retry_moves_money_once(running, ledger):
    await ledger.create_wallet("bob", "CNY")
    # Every append fails until disarmed: the owner answers SHARD_UNAVAILABLE, the router
    # retries until its deadline, and the caller gets the owner's fixed message.
    failpoints.arm("owner.append_unavailable@1+1000000")
    try:
        with pytest.raises(LedgerOutcomeUnknown) as err:
            await ledger.transfer("alice", "bob", 700, "CNY", idempotency_key="t-append")
    finally:
        failpoints.disarm()
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert err.value.status == "RESULT_STATUS_SHARD_UNAVAILABLE"
    assert "failpoint" not in err.value.message and "batch" not in err.value.message
    answer = await ledger.transfer("alice", "bob", 700, "CNY", idempotency_key="t-append")
    assert answer.transfer.amount_minor == 700
    assert (await ledger.get_wallet("alice")).balance_minor == 10_000 - 700
    assert (await ledger.get_wallet("bob")).balance_minor == 700


@pytest.fixture
def held_appends(running, monkeypatch):
    """Appends wait on ``release`` (set at teardown); ``entered`` is set when one waits."""
    append = running.store.append
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(*args, **kwargs):
        entered.set()
        await release.wait()
        return await append(*args, **kwargs)
    monkeypatch.setattr(running.store, "append", held)
    try:
        yield entered, release
    finally:
        release.set()


async def test_a_passed_deadline_is_deadline_exceeded_not_unavailable(running, ledger,
                                                                       held_appends, caplog):
    entered, release = held_appends
    async with LedgerClient(f"127.0.0.1:{running.port}", caller="tests", timeout_s=0.5,
                            retries=False) as hurried:
        with pytest.raises(LedgerOutcomeUnknown) as err:
            await hurried.deposit("alice", 5, "CNY", idempotency_key="d-deadline")
    assert entered.is_set()  # the call reached the store and waited there past its deadline
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not [r for r in caplog.records if r.name == "ledger.api"]
    release.set()
    # The request may have run after its caller gave up: the same key tells, once.
    again = await ledger.deposit("alice", 5, "CNY", idempotency_key="d-deadline")
    assert again.transfer.amount_minor == 5
    assert (await ledger.get_wallet("alice")).balance_minor == 10_005


async def test_a_cancelled_call_is_not_turned_into_a_failure(running, ledger, held_appends,
                                                              caplog):
    entered, release = held_appends
    call = asyncio.create_task(ledger.deposit("alice", 5, "CNY", idempotency_key="d-cancel"))
    await entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    release.set()
    again = await ledger.deposit("alice", 5, "CNY", idempotency_key="d-cancel")
    assert again.transfer.amount_minor == 5
    assert (await ledger.get_wallet("alice")).balance_minor == 10_005
    assert not [r for r in caplog.records
                if r.name == "ledger.api" and r.levelno >= logging.WARNING]
