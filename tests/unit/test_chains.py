"""The linked-chain decisions of the coordinator (``coordinator.chains``), every branch.

They are pure: given the chain's items and the participants' answers of a round, they return
the chain's answer or the next round's commands. No shard, no await, no clock.
"""

from __future__ import annotations

from types import SimpleNamespace

from coordinator import chains
from ledger.core.model import (
    KIND_DEPOSIT, KIND_TRANSFER, ChainFinished, DecideChain, FinishChain, Post, PrepareLinked,
    ReserveCredit,
)
from ledger.core.status import Outcome, Status, ok, refuse

NOW_MS = 1_000
UNAVAILABLE = refuse(Status.SHARD_UNAVAILABLE, "", "retry")
FUNDS = refuse(Status.INSUFFICIENT_FUNDS, "amount_minor", "not enough")


def post(index: int, debit: int, to_shard: int, kind: str = KIND_TRANSFER) -> Post:
    return Post("svc", f"k{index}", f"t{debit:04x}{index:024x}", kind, f"from{index}",
                f"to{index}", 10 + index, "CNY", "", to_shard, NOW_MS)


def chain_of(*shards: tuple[int, int], kinds: tuple[str, ...] = ()) -> chains.Chain:
    """A chain of items at indices 0.., item i debited on shards[i][0], credited on [1]."""
    posts = {i: post(i, debit, credit, kinds[i] if kinds else KIND_TRANSFER)
             for i, (debit, credit) in enumerate(shards)}
    debit = {i: shards[i][0] for i in posts}
    return chains.new_chain(list(posts), posts, lambda p: debit[int(p.idempotency_key[1:])],
                            NOW_MS)


def prepared_fresh(chain: chains.Chain) -> dict[int, Outcome]:
    """Every item prepared by this attempt: PENDING under our own chain id."""
    return {i: Outcome(Status.REQUEST_IN_FLIGHT, "idempotency_key", "", chain.chain_id)
            for i in chain.indices}


def test_the_chain_is_named_by_its_first_item_and_decided_on_its_debit_shard():
    chain = chain_of((5, 5), (2, 9), (5, 1))
    assert chain.chain_id == chain.posts[0].transfer_id
    assert chain.primary == 5
    assert chain.shards == (2, 5)


# --- 1. key claims ---------------------------------------------------------------------


def test_claims_all_granted_go_on():
    assert chains.after_claims(chain_of((1, 1), (2, 2)), {}) is None


def test_a_refused_claim_fails_the_chain_before_it_starts():
    chain = chain_of((1, 1), (2, 2), (3, 3))
    reused = refuse(Status.IDEMPOTENCY_KEY_REUSED, "amount_minor", "differs")
    answer = chains.after_claims(chain, {1: reused})
    assert answer[1] is reused
    assert answer[0].status is answer[2].status is Status.LINKED_ITEM_FAILED


def test_a_transient_claim_answer_answers_every_item():
    chain = chain_of((1, 1), (2, 2))
    reused = refuse(Status.IDEMPOTENCY_KEY_REUSED, "memo", "differs")
    assert chains.after_claims(chain, {0: reused, 1: UNAVAILABLE}) == {0: UNAVAILABLE,
                                                                     1: UNAVAILABLE}


# --- 2. credit reservations ------------------------------------------------------------


def test_only_cross_shard_transfers_reserve_credit():
    chain = chain_of((1, 1), (2, 7), (3, 4), kinds=(KIND_TRANSFER, KIND_TRANSFER, KIND_DEPOSIT))
    reserve = chains.reservations(chain)
    assert list(reserve) == [1]
    shard, command = reserve[1]
    assert shard == 7 and isinstance(command, ReserveCredit)
    assert (command.transfer_id, command.wallet_id, command.amount_minor) == (
        chain.posts[1].transfer_id, "to1", 11)


def test_reservations_made_are_recorded_in_the_posts():
    chain = chain_of((1, 1), (2, 7))
    answer, after = chains.after_reservations(chain, {1: ok(4_242)})
    assert answer is None
    assert after.posts[1].reserved_at_ms == 4_242 and after.posts[0].reserved_at_ms == 0
    assert chain.posts[1].reserved_at_ms == 0  # the chain given is not changed


def test_a_failed_reservation_fails_the_chain():
    chain = chain_of((1, 7), (2, 8))
    missing = refuse(Status.WALLET_NOT_FOUND, "to_wallet_id", "no such wallet")
    answer, _ = chains.after_reservations(chain, {0: ok(1), 1: missing})
    assert answer[1] is missing and answer[0].status is Status.LINKED_ITEM_FAILED


# --- 3. prepare, and the decision to record --------------------------------------------


def test_every_item_is_prepared_on_its_debit_shard_under_the_chain():
    chain = chain_of((4, 4), (6, 1))
    commands = chains.preparations(chain)
    assert {i: shard for i, (shard, _) in commands.items()} == {0: 4, 1: 6}
    for i, (_, command) in commands.items():
        assert command == PrepareLinked(chain.posts[i], chain.chain_id, 4)


def test_all_prepared_decides_commit_on_the_primary():
    chain = chain_of((4, 4), (6, 1))
    decide = chains.after_prepare(chain, prepared_fresh(chain))
    assert isinstance(decide, chains.Decide)
    assert decide.shard == 4 and decide.failures == {}
    assert decide.command == DecideChain(chain.chain_id, True, NOW_MS, (4, 6))


def test_a_failed_item_decides_abort():
    chain = chain_of((4, 4), (6, 1))
    prepared = prepared_fresh(chain) | {1: FUNDS}
    decide = chains.after_prepare(chain, prepared)
    assert decide.failures == {1: FUNDS} and decide.command.commit is False


def test_items_prepared_for_another_chain_decide_nothing():
    chain = chain_of((4, 4), (6, 1), (7, 7))
    replayed = Outcome(Status.OK, value="t", replayed=True)
    prepared = {0: Outcome(Status.REQUEST_IN_FLIGHT, "idempotency_key", "", "other-chain"),
                1: prepared_fresh(chain)[1], 2: replayed}
    answer = chains.after_prepare(chain, prepared)
    assert answer[2] is replayed
    assert answer[0].status is answer[1].status is Status.REQUEST_IN_FLIGHT


def test_a_chain_decided_before_answers_its_records():
    chain = chain_of((4, 4), (6, 1))
    prepared = {i: Outcome(Status.OK, value=f"record{i}", replayed=True) for i in (0, 1)}
    assert chains.after_prepare(chain, prepared) == prepared


def test_a_failure_beside_another_chains_item_still_decides():
    chain = chain_of((4, 4), (6, 1))
    prepared = {0: Outcome(Status.REQUEST_IN_FLIGHT, "idempotency_key", "", "other"),
                1: FUNDS}
    decide = chains.after_prepare(chain, prepared)
    assert isinstance(decide, chains.Decide) and decide.command.commit is False


# --- 4. the primary's decision ---------------------------------------------------------


def _decide(chain, failures=None) -> chains.Decide:
    failures = failures or {}
    return chains.Decide(chain.primary, DecideChain(chain.chain_id, not failures, NOW_MS,
                                                    chain.shards), failures)


def test_no_answer_from_the_primary_is_passed_on_to_every_item():
    chain = chain_of((4, 4), (6, 1))
    assert chains.after_decision(chain, _decide(chain), UNAVAILABLE) == {0: UNAVAILABLE,
                                                                       1: UNAVAILABLE}


def test_commit_finishes_every_participant():
    chain = chain_of((4, 4), (6, 1), (4, 2))
    finish = chains.after_decision(chain, _decide(chain), ok(True))
    assert finish.commit is True
    assert finish.commands == {4: (4, FinishChain(chain.chain_id, True, NOW_MS)),
                               6: (6, FinishChain(chain.chain_id, True, NOW_MS))}


def test_abort_finishes_every_participant():
    chain = chain_of((4, 4), (6, 1))
    finish = chains.after_decision(chain, _decide(chain, {1: FUNDS}), ok(False))
    assert finish.commit is False and set(finish.commands) == {4, 6}


def test_a_commit_recorded_by_another_attempt_over_our_failure_is_in_flight():
    chain = chain_of((4, 4), (6, 1))
    answer = chains.after_decision(chain, _decide(chain, {1: FUNDS}), ok(True))
    assert {o.status for o in answer.values()} == {Status.REQUEST_IN_FLIGHT}


# --- 5. finished -----------------------------------------------------------------------


def _transfers(chain, *indices):
    return [SimpleNamespace(transfer_id=chain.posts[i].transfer_id) for i in indices]


def test_committed_items_answer_their_transfers_and_report_to_the_primary():
    chain = chain_of((4, 4), (6, 1))
    decide = _decide(chain)
    finish = chains.Finish(True, {})
    finished = {4: ok(_transfers(chain, 0)), 6: ok(_transfers(chain, 1))}
    answer, reports = chains.after_finish(chain, prepared_fresh(chain), decide, finish,
                                          finished)
    assert answer[0].ok and answer[0].value.transfer_id == chain.posts[0].transfer_id
    assert answer[1].ok
    assert reports == [ChainFinished(chain.chain_id, 4), ChainFinished(chain.chain_id, 6)]


def test_a_committed_item_whose_shard_did_not_answer_is_in_flight_not_a_guess():
    chain = chain_of((4, 4), (6, 1))
    finished = {4: ok(_transfers(chain, 0)), 6: UNAVAILABLE}
    answer, reports = chains.after_finish(chain, prepared_fresh(chain), _decide(chain),
                                          chains.Finish(True, {}), finished)
    assert answer[0].ok
    assert answer[1].status is Status.REQUEST_IN_FLIGHT and "finishing" in answer[1].detail
    assert reports == [ChainFinished(chain.chain_id, 4)]


def test_aborted_items_answer_linked_item_failed_and_the_failure_its_own():
    chain = chain_of((4, 4), (6, 1))
    decide = _decide(chain, {1: FUNDS})
    finished = {4: ok(_transfers(chain, 0)), 6: ok([])}
    answer, reports = chains.after_finish(chain, prepared_fresh(chain) | {1: FUNDS}, decide,
                                          chains.Finish(False, {}), finished)
    assert answer[1] is FUNDS
    assert answer[0].status is Status.LINKED_ITEM_FAILED
    assert answer[0].detail == "another item of the linked chain failed"
    assert answer[0].value.transfer_id == chain.posts[0].transfer_id
    assert reports == []  # only a commit is kept until its participants report


def test_an_abort_without_failures_was_a_timeout_before_the_decision():
    chain = chain_of((4, 4), (6, 1))
    answer, _ = chains.after_finish(chain, prepared_fresh(chain), _decide(chain),
                                    chains.Finish(False, {}), {4: ok([]), 6: ok([])})
    assert {o.detail for o in answer.values()} == {
        "the linked chain timed out before it was decided"}
    assert answer[0].value is None


def test_an_item_decided_before_answers_its_record():
    chain = chain_of((4, 4), (6, 1))
    record = Outcome(Status.OK, value="record", replayed=True)
    prepared = prepared_fresh(chain) | {0: record}
    answer, _ = chains.after_finish(chain, prepared, _decide(chain), chains.Finish(True, {}),
                                    {4: ok([]), 6: ok(_transfers(chain, 1))})
    assert answer[0] is record and answer[1].ok
