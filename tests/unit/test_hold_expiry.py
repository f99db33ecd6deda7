"""A capture or release refused because its hold expired stays refused.

Found by the simulation (seed 212; 724 and 795 for releases): the refusal "hold has expired"
was judged on the request's clock and not journaled, so a network duplicate of an earlier
attempt, stamped before the expiry and delivered late, still captured the hold the client had
been told was expired. Now the refusal journals the expiry with it.
"""

from ledger.core.model import CaptureHold, CreateHold, CreateWallet, Post, ReleaseHold, \
    settlement_wallet_id
from ledger.core.shard import ShardState
from ledger.core.step import step as core_step
from ledger.core.status import Status


def step(state, command):
    return core_step(state, [command]).outcomes[0]


def held() -> ShardState:
    s = ShardState(0)
    step(s, CreateWallet("svc", "w-a", "a", "CNY", False, 1))
    step(s, CreateWallet("svc", "w-b", "b", "CNY", False, 1))
    step(s, Post("svc", "d", "t0000d", "DEPOSIT", settlement_wallet_id("CNY", 0), "a", 500,
                 "CNY", "", 0, 1))
    assert step(s, CreateHold("svc", "h", "h0000x", "a", 400, "CNY", 1_000, 10)).ok
    return s


def test_a_capture_refused_as_expired_is_not_executed_by_an_older_copy():
    s = held()
    late = step(s, CaptureHold("svc", "c", "t0000c", "h0000x", 0, "b", 0, "", 2_000))
    assert late.status is Status.HOLD_NOT_ACTIVE and "expired" in late.detail
    older_copy = step(s, CaptureHold("svc", "c", "t0000c", "h0000x", 0, "b", 0, "", 500))
    assert older_copy.status is Status.HOLD_NOT_ACTIVE, older_copy
    assert s.wallets["b"].balance_minor == 0 and s.wallets["a"].held_minor == 0
    assert s.holds["h0000x"].state == "EXPIRED"


def test_a_release_refused_as_expired_is_not_executed_by_an_older_copy():
    s = held()
    assert step(s, ReleaseHold("svc", "r", "h0000x", 2_000)).status is Status.HOLD_NOT_ACTIVE
    older_copy = step(s, ReleaseHold("svc", "r", "h0000x", 500))
    assert older_copy.status is Status.HOLD_NOT_ACTIVE, older_copy
    assert s.holds["h0000x"].state == "EXPIRED"
