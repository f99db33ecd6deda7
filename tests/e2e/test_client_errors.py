"""Issue 7, defect 11: the client tells "refused" from "outcome unknown".

Both raised the same ``LedgerError``: a caller could not tell a final refusal from a request
that may have executed, and might resend an unknown one with a new key (twice the money).
"""

from __future__ import annotations

import socket

import pytest

from clients import (LedgerClient, LedgerError, LedgerOutcomeUnknown, LedgerRefused,
                     LedgerUnavailable)


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
