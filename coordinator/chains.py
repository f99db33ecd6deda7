"""The decisions of a linked chain, as pure functions; the coordinator's shell does the awaits.

A linked chain (all items commit or none does, ``PROTOCOL.md``) runs in rounds. Each function
here takes what the chain knows so far and the participants' answers of the last round, and
returns either the chain's answer (one outcome per item: the chain ends) or what to send in
the next round. ``Coordinator._chain_steps`` sends each round and feeds the answers back:

1. ``after_claims``: key claims refused -> the chain fails before it starts.
2. ``reservations`` / ``after_reservations``: credit reservations of cross-shard items.
3. ``preparations`` / ``after_prepare``: every item prepared on its debit shard -> answer
   now, or the ``DecideChain`` to record on the primary (the commit point).
4. ``after_decision``: the primary's decision -> answer now, or the ``FinishChain`` commands.
5. ``after_finish``: the items' answers, and the ``ChainFinished`` reports for the primary.

Nothing here performs I/O, reads a clock or keeps state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ledger.core.model import (
    KIND_TRANSFER, ChainFinished, DecideChain, FinishChain, Post, PrepareLinked, ReserveCredit,
)
from ledger.core.status import Outcome, Status, ok, refuse

# ``{index: (shard, command)}``: one round of commands, grouped per shard by the shell.
Commands = dict[int, tuple[int, object]]


def linked_failed(detail: str = "another item of the linked chain failed") -> Outcome:
    """The answer of an item that was fine by itself, refused because its chain failed."""
    return refuse(Status.LINKED_ITEM_FAILED, "", detail)


def in_flight(detail: str = "the linked chain of this key is being decided") -> Outcome:
    """A transient answer: the chain is (or may be) decided by someone else; a retry with
    the same keys gets the recorded outcome."""
    return refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key", detail)


@dataclass(frozen=True, slots=True)
class Chain:
    """What a chain is: its items' Posts and where each is decided.

    Attributes:
        indices: The items' positions in the batch, in chain order.
        posts: The Post of each item, by index (their ``reserved_at_ms`` filled in once
            reserved: see ``after_reservations``).
        debit: The debit shard of each item, by index: where it is prepared and decided.
        now_ms: The chain's time stamp (every command of the chain carries it).
    """

    indices: tuple[int, ...]
    posts: dict[int, Post]
    debit: dict[int, int]
    now_ms: int

    @property
    def chain_id(self) -> str:
        """The chain is named by its first item's transfer id."""
        return self.posts[self.indices[0]].transfer_id

    @property
    def primary(self) -> int:
        """The primary shard (the first item's debit shard) records the decision."""
        return self.debit[self.indices[0]]

    @property
    def shards(self) -> tuple[int, ...]:
        """The participants: every item's debit shard, sorted."""
        return tuple(sorted(set(self.debit.values())))

    def answer_all(self, outcome: Outcome) -> dict[int, Outcome]:
        return {i: outcome for i in self.indices}


def new_chain(indices: list[int], posts: dict[int, Post], debit_shard: Callable[[Post], int],
              now_ms: int) -> Chain:
    """The chain of ``posts`` (one per index of ``indices``)."""
    return Chain(tuple(indices), dict(posts), {i: debit_shard(p) for i, p in posts.items()},
                 now_ms)


def after_claims(chain: Chain, refused: dict[int, Outcome]) -> dict[int, Outcome] | None:
    """The chain's answer when key claims were refused (nothing is prepared yet: the chain
    fails before it starts), or None to go on.

    A transient refusal answers every item (a retry may succeed as a whole); otherwise each
    refused item gets its refusal and the others ``LINKED_ITEM_FAILED``.
    """
    if not refused:
        return None
    transient = next((o for o in refused.values() if o.status.transient()), None)
    return {i: transient or refused.get(i) or linked_failed() for i in chain.indices}


def reservations(chain: Chain) -> Commands:
    """The credit reservations of the chain's cross-shard transfers (to their credit shard)."""
    return {i: (p.to_shard, ReserveCredit(p.transfer_id, p.to_wallet_id, p.currency,
                                          p.amount_minor, chain.now_ms))
            for i, p in chain.posts.items()
            if p.kind == KIND_TRANSFER and p.to_shard != chain.debit[i]}


def after_reservations(chain: Chain, reserved: dict[int, Outcome]
                       ) -> tuple[dict[int, Outcome] | None, Chain]:
    """The chain's answer if a reservation failed (or None), and the chain with the
    reservations' times recorded in its Posts.

    Reservations made are left to their credit shards' resolution: nothing is prepared, so
    they are dropped (``ResolveReservations``).
    """
    failed = {i: o for i, o in reserved.items() if not o.ok}
    if failed:
        return {i: failed.get(i) or linked_failed() for i in chain.indices}, chain
    posts = dict(chain.posts)
    for i, o in reserved.items():
        posts[i] = replace(posts[i], reserved_at_ms=o.value)
    return None, replace(chain, posts=posts)


def preparations(chain: Chain) -> Commands:
    """Prepare every item on its debit shard (checks and a hold, journaled)."""
    return {i: (chain.debit[i], PrepareLinked(p, chain.chain_id, chain.primary))
            for i, p in chain.posts.items()}


@dataclass(frozen=True, slots=True)
class Decide:
    """Record the decision on the primary: ``command`` goes to ``shard``.

    Attributes:
        failures: The items whose preparation failed (refused for good), by index.
    """

    shard: int
    command: DecideChain
    failures: dict[int, Outcome]


def _failures(prepared: dict[int, Outcome]) -> dict[int, Outcome]:
    return {i: o for i, o in prepared.items()
            if not o.ok and o.status is not Status.REQUEST_IN_FLIGHT}


def after_prepare(chain: Chain, prepared: dict[int, Outcome]) -> dict[int, Outcome] | Decide:
    """The chain's answer without a decision, or the decision to record.

    - Items prepared for another chain (the same keys linked differently) are being decided:
      decide nothing here (our fresh prepares carry our chain id and are resolved with it; a
      fresh prepare is only PENDING, never answered OK).
    - Every item was prepared and decided before (all replayed): answer their records.
    - Otherwise every item is prepared (by us, or an earlier attempt of this chain) or one
      failed: decide, commit if none failed. The primary keeps the first decision.
    """
    failures = _failures(prepared)
    pending = {i: o for i, o in prepared.items() if o.status is Status.REQUEST_IN_FLIGHT}
    if not failures and pending and any(o.value != chain.chain_id for o in pending.values()):
        return {i: (prepared[i] if prepared[i].replayed else in_flight())
                for i in chain.indices}
    if not failures and all(o.replayed for o in prepared.values()):
        return {i: prepared[i] for i in chain.indices}
    return Decide(chain.primary, DecideChain(chain.chain_id, not failures, chain.now_ms,
                                             chain.shards), failures)


@dataclass(frozen=True, slots=True)
class Finish:
    """Finish the items on their shards with the recorded decision (``commit``)."""

    commit: bool
    commands: Commands


def after_decision(chain: Chain, decide: Decide, decided: Outcome
                   ) -> dict[int, Outcome] | Finish:
    """The chain's answer from the primary's decision, or the commands that finish it.

    - No answer from the primary: that (transient) answer for every item; the participants
      resolve the chain themselves (they ask the primary, which records an abort if nobody
      decided).
    - Committed although an item failed for us: another attempt of this chain prepared it
      and committed first, our view is stale; a transient answer makes the client ask again
      and get the recorded outcome.
    """
    if not decided.ok:
        return chain.answer_all(decided)
    commit = bool(decided.value)
    if commit and decide.failures:
        return chain.answer_all(in_flight())
    return Finish(commit, {s: (s, FinishChain(chain.chain_id, commit, chain.now_ms))
                           for s in chain.shards})


def after_finish(chain: Chain, prepared: dict[int, Outcome], decide: Decide, finish: Finish,
                 finished: dict[int, Outcome]
                 ) -> tuple[dict[int, Outcome], list[ChainFinished]]:
    """The items' answers once the shards finished, and the reports for the primary.

    The reports (``ChainFinished`` per participant that finished a commit) let the primary
    forget the decision once every participant finished; a lost report only keeps it longer.
    An item whose shard did not answer the finish of a commit is answered transiently (its
    record is not at hand): never a guess.
    """
    done = ([ChainFinished(chain.chain_id, s) for s, o in finished.items() if o.ok]
            if finish.commit else [])
    transfers = {t.transfer_id: t for o in finished.values() if o.ok for t in o.value}
    results: dict[int, Outcome] = {}
    for i in chain.indices:
        post = chain.posts[i]
        if i in decide.failures:
            results[i] = decide.failures[i]
        elif prepared[i].replayed:
            results[i] = prepared[i]
        elif finish.commit:
            transfer = transfers.get(post.transfer_id)
            results[i] = (ok(transfer) if transfer is not None else in_flight(
                "the linked chain committed; its items are finishing"))
        else:
            detail = ("another item of the linked chain failed" if decide.failures
                      else "the linked chain timed out before it was decided")
            results[i] = Outcome(Status.LINKED_ITEM_FAILED, "", detail,
                                 transfers.get(post.transfer_id))
    return results, done
