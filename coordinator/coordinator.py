"""The coordinator: turns API requests into shard commands and runs the transfer protocol.

It holds no durable state. Same-shard transfers (and all deposits and withdrawals, which use
the shard's own settlement sub-account) are one ``Post`` on one shard. Cross-shard transfers:

1. ``ReserveCredit`` on the credit shard (destination exists, currency matches, no overflow);
2. ``Post`` on the debit shard: the commit point (idempotency, funds, debit, outbox credit);
3. the debit shard's crediting pipeline applies the credit on the credit shard, exactly once.

Work is batched: every phase sends one command list per shard, shards in parallel.

Every public method takes the caller's ``deadline`` (a point on the event loop's monotonic
clock, ``loop.time()``; the API layer turns the gRPC deadline into one) and passes it to every
shard call it makes: no shard call starts after it, and one that has not answered by then is
answered SHARD_UNAVAILABLE (transient: never a refusal of something that may commit; a retry
with the same key gets the recorded outcome). Without one (the simulation, tests), each shard
call has the router's own retry budget. Best-effort clean-ups started after the answer
(reservation cancels, chain-finished reports) are not bound by the caller's deadline.

Linked chains: the decisions are pure functions (``coordinator.chains``); this module only
sends each round and feeds the answers back.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Coroutine, Mapping, NamedTuple

from coordinator import chains
from coordinator.constants import HISTORY_POLL_MS, HISTORY_WAIT_MS
from coordinator.ports import HistoryReader, ShardExecutor
from ledger.core import constants as C
from ledger.core import validate
from ledger.core.ids import transfer_id_for
from ledger.core.invariants import InvariantViolation
from ledger.core.model import (
    KIND_DEPOSIT, KIND_ENVELOPE_FUND, KIND_TRANSFER, KIND_WITHDRAWAL, STATE_COMMITTED, CancelReservation, CaptureHold,
    ClaimKey, CreateHold, CreateWallet, GetHold, GetTransfer, GetWallet, Post, ReleaseHold,
    ReserveCredit, SetFrozen, SetRiskLimits, ConfirmDevice, settlement_wallet_id,
)
from ledger.core.shard import (capture_fingerprint, hold_fingerprint, release_fingerprint,
                               transfer_fingerprint, wallet_fingerprint)
from ledger.core.status import Outcome, Status, ok, refuse
from ledger.runtime import failpoints
from ledger.runtime.clock import Clock, now_ms
from ledger.runtime.tasks import spawn
from shard_router.hashing import shard_of

_TRANSFER_ID = re.compile(r"t([0-9a-f]{4})[0-9a-f]{24}")
_HOLD_ID = re.compile(r"h([0-9a-f]{4})[0-9a-f]{24}")


@dataclass(slots=True, frozen=True)
class TransferItem:
    """One requested money movement. For deposits ``from_wallet_id`` is empty, for
    withdrawals ``to_wallet_id`` is empty (the settlement account is filled in)."""

    idempotency_key: str
    from_wallet_id: str
    to_wallet_id: str
    amount_minor: int
    currency: str
    memo: str = ""
    kind: str = KIND_TRANSFER
    linked: bool = False
    device_id: str = ""  # the payer's device (the step-up check, ledger.core.risk)


# Kinds whose credit goes to another shard's wallet and is reserved there first (deposits and
# withdrawals credit their own shard's settlement account).
_RESERVED_KINDS = (KIND_TRANSFER, KIND_ENVELOPE_FUND)


def key_shard_of(caller: str, idempotency_key: str, shard_count: int) -> int:
    """The shard a (caller, idempotency key) is claimed on."""
    return shard_of(f"\x00key\x00{caller}\x00{idempotency_key}", shard_count)


# A Post with one field changed, without ``dataclasses.replace`` (which walks the fields in
# Python: a few microseconds per item, for every item of every batch).
_POST_FIELDS = tuple(f.name for f in fields(Post))
_post_values = attrgetter(*_POST_FIELDS)
_RESERVED_AT = _POST_FIELDS.index("reserved_at_ms")
_CREDIT_REFUSAL = _POST_FIELDS.index("credit_refusal")


def _post_with(post: Post, index: int, value: object) -> Post:
    values = list(_post_values(post))
    values[index] = value
    return Post(*values)


async def _both(first: Coroutine[Any, Any, Any], second: Coroutine[Any, Any, Any]
                ) -> tuple[Any, Any]:
    """``gather`` of two coroutines, with one task less: the second runs as a task while the
    first runs in the caller's (a round that has nothing to send returns at once)."""
    task = asyncio.ensure_future(second)
    try:
        first_result = await first
    except BaseException:
        task.cancel()
        raise
    return first_result, await task


def refused_for_good(outcome: Outcome) -> bool:
    """True when the debit shard refused a transfer and recorded it under its key: it can
    never commit, so no credit will use its reservation."""
    return not outcome.ok and outcome.status.recorded()


class BalanceAt(NamedTuple):
    """A wallet's balance after one entry of its history (version 0: before the first)."""

    wallet_id: str
    currency: str
    balance_minor: int
    version: int
    at_ms: int


class Coordinator:
    """Runs API requests against the shard owners (through ``executor``).

    Args:
        executor: Runs commands on any shard's owner (``shard_router.router.Router``).
        history: Reads the materialized history (a ``ledger.store`` adapter).
        shard_count: Number of virtual shards.
        clock_ms: Wall time for the commands' stamps (a virtual one in simulations).
    """

    def __init__(self, executor: ShardExecutor, history: HistoryReader, shard_count: int,
                 clock_ms: Clock = now_ms) -> None:
        self._executor = executor
        self._history = history
        self._shard_count = shard_count
        self._clock_ms = clock_ms
        # (caller, key) of requests this coordinator is executing: a concurrent duplicate is
        # answered REQUEST_IN_FLIGHT instead of racing the first (no second execution).
        self._in_flight: set[tuple[str, str]] = set()

    def shard_of(self, wallet_id: str) -> int:
        return shard_of(wallet_id, self._shard_count)

    def key_shard(self, caller: str, idempotency_key: str) -> int:
        """The shard an idempotency key is claimed on (see ``ClaimKey``)."""
        return key_shard_of(caller, idempotency_key, self._shard_count)

    async def _claim_keys(self, caller: str, posts: dict[int, Post],
                          deadline: float | None) -> dict[int, Outcome]:
        """Claim each Post's key on its key shard; returns the refusals (and transient
        failures) by index. A key whose shard is the debit shard needs no claim: the debit
        shard's own record, checked by the Post and by every claim there, covers it."""
        claims = {}
        for i, p in posts.items():
            key_shard = self.key_shard(caller, p.idempotency_key)
            if key_shard != self._debit_shard(p):
                fingerprint = transfer_fingerprint(p.kind, p.from_wallet_id, p.to_wallet_id,
                                                   p.amount_minor, p.currency, p.memo)
                claims[i] = (key_shard, ClaimKey(caller, p.idempotency_key, fingerprint,
                                                 p.transfer_id, p.now_ms))
        if not claims:
            return {}
        return {i: o for i, o in (await self._by_shard(claims, deadline=deadline)).items()
                if not o.ok}

    async def _claim_key(self, caller: str, idempotency_key: str, decided_on: int,
                         fingerprint: tuple, target: str, now: int,
                         deadline: float | None) -> Outcome | None:
        """Claim a key on its own shard for a request decided on shard ``decided_on``;
        returns the refusal (or transient failure), or None when the request may go on. A
        key whose shard is ``decided_on`` needs no claim: the deciding shard checks its own
        records and claims."""
        key_shard = self.key_shard(caller, idempotency_key)
        if key_shard == decided_on:
            return None
        claim = (await self._executor.execute(key_shard, [ClaimKey(
            caller, idempotency_key, fingerprint, "", now, target)], deadline=deadline))[0]
        return None if claim.ok else claim

    # --- wallets ----------------------------------------------------------------------------

    async def create_wallet(self, caller: str, idempotency_key: str, wallet_id: str,
                            currency: str, allow_negative: bool = False,
                            deadline: float | None = None) -> Outcome:
        bad = (validate.caller(caller) or validate.idempotency_key(idempotency_key)
               or validate.wallet_id(wallet_id) or validate.currency(currency))
        if bad:
            return bad
        now = self._clock_ms()
        shard = self.shard_of(wallet_id)
        refused = await self._claim_key(caller, idempotency_key, shard, wallet_fingerprint(
            wallet_id, currency, allow_negative), "wallet:" + wallet_id, now, deadline)
        if refused is not None:
            return refused
        command = CreateWallet(caller, idempotency_key, wallet_id, currency, allow_negative,
                               now)
        return (await self._executor.execute(shard, [command], deadline=deadline))[0]

    async def get_wallet(self, wallet_id: str, deadline: float | None = None,
                         with_risk: bool = False) -> Outcome:
        """The wallet (``with_risk``: ``(Wallet, RiskView)``) as its owner holds it."""
        bad = validate.wallet_id(wallet_id)
        if bad:
            return bad
        return (await self._executor.execute(self.shard_of(wallet_id), [GetWallet(
            wallet_id, with_risk, self._clock_ms())], deadline=deadline))[0]

    async def set_risk_limits(self, caller: str, wallet_id: str, window_ms: int,
                              max_amount_minor: int, max_count: int, step_up_above_minor: int,
                              reason: str, deadline: float | None = None) -> Outcome:
        """Set a wallet's risk limits (journaled on its shard), or with ``wallet_id`` empty
        the default of every wallet (journaled on every shard, in one round). Value: the
        number of shards that hold the change."""
        bad = ((validate.wallet_id(wallet_id) if wallet_id else None)
               or validate.risk_limits(bool(wallet_id), window_ms, max_amount_minor, max_count,
                                       step_up_above_minor)
               or validate.memo(reason, "reason"))
        if bad:
            return bad
        command = SetRiskLimits(wallet_id, window_ms, max_amount_minor, max_count,
                                step_up_above_minor, reason, caller, self._clock_ms())
        shards = [self.shard_of(wallet_id)] if wallet_id else list(range(self._shard_count))
        results = await self._by_shard({s: (s, command) for s in shards}, deadline=deadline)
        for shard in shards:
            if not results[shard].ok:
                # A default is set on every shard or reported failed (those that took it keep
                # it; the same call again sets it on the rest, and changes nothing where it is).
                return results[shard]
        return ok(len(shards))

    async def confirm_device(self, caller: str, wallet_id: str, device_id: str, confirmed: bool,
                             reason: str, deadline: float | None = None) -> Outcome:
        """Confirm (or forget) a device of a wallet for the step-up check (journaled)."""
        bad = (validate.wallet_id(wallet_id) or validate.device_id(device_id, required=True)
               or validate.memo(reason, "reason"))
        if bad:
            return bad
        return (await self._executor.execute(self.shard_of(wallet_id), [ConfirmDevice(
            wallet_id, device_id, confirmed, reason, caller, self._clock_ms())],
            deadline=deadline))[0]

    async def set_frozen(self, caller: str, wallet_id: str, frozen: bool, reason: str,
                         deadline: float | None = None) -> Outcome:
        """Freeze or unfreeze a wallet (journaled on its shard); the wallet as it is after."""
        bad = validate.wallet_id(wallet_id) or validate.memo(reason, "reason")
        if bad:
            return bad
        return (await self._executor.execute(self.shard_of(wallet_id), [SetFrozen(
            wallet_id, frozen, reason, caller, self._clock_ms())], deadline=deadline))[0]

    # --- money movement ---------------------------------------------------------------------

    async def deposit(self, caller: str, idempotency_key: str, wallet_id: str, amount_minor: int,
                      currency: str, memo: str = "", deadline: float | None = None) -> Outcome:
        item = TransferItem(idempotency_key, "", wallet_id, amount_minor, currency, memo,
                            KIND_DEPOSIT)
        return (await self.batch_transfer(caller, [item], deadline))[0]

    async def withdraw(self, caller: str, idempotency_key: str, wallet_id: str,
                       amount_minor: int, currency: str, memo: str = "",
                       deadline: float | None = None, device_id: str = "") -> Outcome:
        item = TransferItem(idempotency_key, wallet_id, "", amount_minor, currency, memo,
                            KIND_WITHDRAWAL, device_id=device_id)
        return (await self.batch_transfer(caller, [item], deadline))[0]

    async def transfer(self, caller: str, item: TransferItem,
                       deadline: float | None = None) -> Outcome:
        return (await self.batch_transfer(caller, [item], deadline))[0]

    async def batch_transfer(self, caller: str, items: list[TransferItem],
                             deadline: float | None = None) -> list[Outcome]:
        """Run independent transfers; one outcome per item, in order."""
        bad = validate.caller(caller)
        if bad:
            return [bad] * len(items)
        if len(items) > C.BATCH_TRANSFERS_MAX:
            return [refuse(Status.BATCH_TOO_LARGE, "transfers",
                           f"at most {C.BATCH_TRANSFERS_MAX} items per call")] * len(items)
        now = self._clock_ms()
        results: list[Outcome | None] = [None] * len(items)
        chains: list[list[int]] = []
        single: list[int] = []
        chain: list[int] = []
        for i, item in enumerate(items):
            if item.linked or chain:
                chain.append(i)
                if not item.linked:
                    chains.append(chain)
                    chain = []
            else:
                single.append(i)
        for i in chain:  # the batch ended inside a chain
            results[i] = refuse(Status.LINKED_CHAIN_OPEN, "linked",
                                "the last item of the batch must not be linked")
        await asyncio.gather(self._run_single(caller, items, single, now, results, deadline),
                             *(self._run_chain(caller, items, c, now, results, deadline)
                               for c in chains))
        return results  # type: ignore[return-value]

    async def _run_single(self, caller: str, items: list[TransferItem], indices: list[int],
                          now: int, results: list, deadline: float | None) -> None:
        posts: dict[int, Post] = {}
        claimed: list[tuple[str, str]] = []
        try:
            for i in indices:
                item = items[i]
                post = self._plan(caller, item, now)
                if isinstance(post, Outcome):
                    results[i] = post
                    continue
                key = (caller, item.idempotency_key)
                if key in self._in_flight:
                    results[i] = refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key",
                                        "a request with this key is being executed")
                    continue
                self._in_flight.add(key)
                claimed.append(key)
                posts[i] = post
            # Key claims and credit reservations go to different shards and do not depend on
            # each other: one round trip for both. A reservation whose key claim is refused
            # is not cancelled here (a concurrent attempt with the same key may share it):
            # its credit shard drops it after asking the debit shard (ResolveReservations).
            refused, _ = await _both(self._claim_keys(caller, posts, deadline),
                                     self._reserve_credits(posts, results, deadline))
            for i, refusal in refused.items():
                results[i] = refusal
                posts.pop(i, None)
            failpoints.hit("coordinator.after_reserve")
            await self._commit(posts, results, deadline)
            failpoints.hit("coordinator.after_post")
        finally:
            self._in_flight.difference_update(claimed)

    def _debit_shard(self, post: Post) -> int:
        return post.to_shard if post.kind == KIND_DEPOSIT else self.shard_of(post.from_wallet_id)

    async def _run_chain(self, caller: str, items: list[TransferItem], indices: list[int],
                         now: int, results: list, deadline: float | None) -> None:
        """A linked chain: all items commit or none does (two-phase commit with holds).

        1. reserve credits of cross-shard items; 2. prepare every item on its debit shard
        (checks and a hold, journaled); 3. record the decision on the primary shard (the
        debit shard of the first item): the commit point; 4. finish the items on their
        shards. If the coordinator dies after 2, each participant asks the primary after
        CHAIN_RESOLVE_AFTER_MS, and the primary records an abort if nobody decided.
        """
        posts: dict[int, Post] = {}
        for i in indices:
            post = self._plan(caller, items[i], now)
            if isinstance(post, Outcome):
                for j in indices:
                    results[j] = post if j == i else chains.linked_failed()
                return
            posts[i] = post
        keys = [(caller, items[i].idempotency_key) for i in indices]
        if len(set(keys)) != len(keys) or any(k in self._in_flight for k in keys):
            for i in indices:
                results[i] = refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key",
                                    "a request with this key is being executed")
            return
        self._in_flight.update(keys)
        try:
            await self._chain_steps(posts, indices, now, results, deadline)
        finally:
            self._in_flight.difference_update(keys)

    async def _chain_steps(self, posts: dict[int, Post], indices: list[int], now: int,
                           results: list, deadline: float | None) -> None:
        """The shell of a linked chain: send each round ``coordinator.chains`` decides, feed
        the answers back, and write the chain's answer into ``results``."""
        chain = chains.new_chain(indices, posts, self._debit_shard, now)
        answer = chains.after_claims(chain, await self._claim_keys(
            posts[indices[0]].caller, posts, deadline))
        if answer is None:
            reserve = chains.reservations(chain)
            if reserve:
                answer, chain = chains.after_reservations(
                    chain, await self._by_shard(reserve, deadline=deadline))
        if answer is not None:
            self._answer(results, answer)
            return
        prepared = await self._by_shard(chains.preparations(chain), deadline=deadline)
        failpoints.hit("coordinator.after_prepare")
        decide = chains.after_prepare(chain, prepared)
        if not isinstance(decide, chains.Decide):
            self._answer(results, decide)
            return
        decided = (await self._executor.execute(decide.shard, [decide.command],
                                                deadline=deadline))[0]
        finish = chains.after_decision(chain, decide, decided)
        if not isinstance(finish, chains.Finish):
            self._answer(results, finish)
            return
        failpoints.hit("coordinator.after_decide")
        finished = await self._by_shard(finish.commands, wait_credit=True, deadline=deadline)
        answer, reports = chains.after_finish(chain, prepared, decide, finish, finished)
        if reports:
            # Best effort, past the caller's deadline: a lost report only keeps the
            # primary's decision longer (participants report again on recovery).
            spawn(self._executor.execute(chain.primary, reports), "chain-finished")
        self._answer(results, answer)

    @staticmethod
    def _answer(results: list, answer: dict[int, Outcome]) -> None:
        for i, outcome in answer.items():
            results[i] = outcome

    def _plan(self, caller: str, item: TransferItem, now: int) -> Post | Outcome:
        """Validate one item and turn it into the Post for its debit shard."""
        if item.kind == KIND_DEPOSIT:
            bad = validate.movement(item.idempotency_key, item.to_wallet_id, item.amount_minor,
                                    item.currency, item.memo)
            if bad:
                return bad
            shard = self.shard_of(item.to_wallet_id)
            source, target, to_shard = (settlement_wallet_id(item.currency, shard),
                                        item.to_wallet_id, shard)
        elif item.kind == KIND_WITHDRAWAL:
            bad = validate.movement(item.idempotency_key, item.from_wallet_id, item.amount_minor,
                                    item.currency, item.memo)
            if bad:
                return bad
            shard = self.shard_of(item.from_wallet_id)
            source, target, to_shard = (item.from_wallet_id,
                                        settlement_wallet_id(item.currency, shard), shard)
        elif item.kind == KIND_ENVELOPE_FUND:
            # Built by coordinator.envelopes, which validated the request; the target is the
            # envelope's escrow account (a reserved id no client may name).
            shard = self.shard_of(item.from_wallet_id)
            source, target, to_shard = (item.from_wallet_id, item.to_wallet_id,
                                        self.shard_of(item.to_wallet_id))
        else:
            bad = validate.transfer(item.idempotency_key, item.from_wallet_id, item.to_wallet_id,
                                    item.amount_minor, item.currency, item.memo)
            if bad:
                return bad
            shard = self.shard_of(item.from_wallet_id)
            source, target, to_shard = (item.from_wallet_id, item.to_wallet_id,
                                        self.shard_of(item.to_wallet_id))
        if item.device_id:
            bad = validate.device_id(item.device_id)
            if bad:
                return bad
        return Post(caller, item.idempotency_key, transfer_id_for(shard, caller,
                    item.idempotency_key), item.kind, source, target, item.amount_minor,
                    item.currency, item.memo, to_shard, now, device_id=item.device_id)

    async def _by_shard(self, commands: Mapping[int, tuple[int, object]],
                        wait_credit: bool = False,
                        deadline: float | None = None) -> dict[int, Outcome]:
        """Execute ``{index: (shard, command)}``, one command list per shard, in parallel."""
        groups: dict[int, list[tuple[int, object]]] = {}
        for index, (shard, command) in commands.items():
            groups.setdefault(shard, []).append((index, command))
        many = getattr(self._executor, "execute_many", None)
        if many is not None and not wait_credit and len(groups) > 1:
            # One future per shard, no task per shard (``Router.execute_many``).
            by_shard = await many({shard: [c for _, c in group]
                                   for shard, group in groups.items()}, deadline=deadline)
            answers = [by_shard[shard] for shard in groups]
        elif len(groups) == 1:  # one shard (a single transfer's round): no task to gather
            ((shard, group),) = groups.items()
            answers = [await self._executor.execute(shard, [c for _, c in group], wait_credit,
                                                    deadline=deadline)]
        else:
            answers = await asyncio.gather(*(
                self._executor.execute(shard, [c for _, c in group], wait_credit,
                                       deadline=deadline)
                for shard, group in groups.items()))
        outcomes: dict[int, Outcome] = {}
        for group, answer in zip(groups.values(), answers):
            for (index, _), outcome in zip(group, answer):
                outcomes[index] = outcome
        return outcomes

    async def _reserve_credits(self, posts: dict[int, Post], results: list,
                               deadline: float | None) -> None:
        reserve = {i: (p.to_shard, ReserveCredit(p.transfer_id, p.to_wallet_id, p.currency,
                                                 p.amount_minor, p.now_ms))
                   for i, p in posts.items() if p.to_shard != self.shard_of(p.from_wallet_id)
                   and p.kind in _RESERVED_KINDS}
        if not reserve:
            return
        for i, outcome in (await self._by_shard(reserve, deadline=deadline)).items():
            if i not in posts:
                continue
            if outcome.ok:
                posts[i] = _post_with(posts[i], _RESERVED_AT, outcome.value)
                continue
            if outcome.status.transient():
                results[i] = outcome
                del posts[i]
            else:
                # Let the debit shard decide: a retry of a transfer committed before must get
                # its original result, and a state refusal is recorded under the key there.
                posts[i] = _post_with(posts[i], _CREDIT_REFUSAL, (
                    int(outcome.status), outcome.field, outcome.detail))

    async def _commit(self, posts: dict[int, Post], results: list,
                      deadline: float | None) -> None:
        if not posts:
            return
        commit = {i: (self._debit_shard(p), p) for i, p in posts.items()}
        outcomes = await self._by_shard(commit, wait_credit=True, deadline=deadline)
        cancel: dict[int, tuple[int, object]] = {}
        for i, outcome in outcomes.items():
            results[i] = outcome
            post = posts[i]
            if post.reserved_at_ms and refused_for_good(outcome):
                cancel[i] = (post.to_shard, CancelReservation(post.transfer_id,
                                                              post.reserved_at_ms))
        if cancel:
            # Best effort, past the caller's deadline: a reservation left behind (this call
            # failed: spawn logs it) is dropped by its credit shard after it asked the debit
            # shard (ResolveReservations).
            spawn(self._by_shard(cancel), "cancel-reservations")

    # --- holds ------------------------------------------------------------------------------

    async def create_hold(self, caller: str, idempotency_key: str, wallet_id: str,
                          amount_minor: int, currency: str, timeout_ms: int,
                          deadline: float | None = None, device_id: str = "") -> Outcome:
        bad = (validate.caller(caller) or validate.idempotency_key(idempotency_key)
               or validate.wallet_id(wallet_id) or validate.amount(amount_minor)
               or validate.currency(currency) or validate.device_id(device_id))
        if bad:
            return bad
        bad = validate.hold_timeout(timeout_ms)
        if bad:
            return bad
        shard = self.shard_of(wallet_id)
        now = self._clock_ms()
        hold_id = transfer_id_for(shard, caller, idempotency_key, "h")
        refused = await self._claim_key(caller, idempotency_key, shard, hold_fingerprint(
            wallet_id, amount_minor, currency, timeout_ms), "hold:" + hold_id, now, deadline)
        if refused is not None:
            return refused
        command = CreateHold(caller, idempotency_key, hold_id, wallet_id, amount_minor,
                             currency, timeout_ms, now, device_id)
        return (await self._executor.execute(shard, [command], deadline=deadline))[0]

    def _hold_shard(self, hold_id: str) -> int | Outcome:
        match = _HOLD_ID.fullmatch(hold_id or "")
        if match is None:
            return refuse(Status.INVALID_ARGUMENT, "hold_id", "is not a hold id")
        shard = int(match.group(1), 16)
        if shard >= self._shard_count:
            return refuse(Status.HOLD_NOT_FOUND, "hold_id", "no hold with this id")
        return shard

    async def get_hold(self, hold_id: str, deadline: float | None = None) -> Outcome:
        shard = self._hold_shard(hold_id)
        if isinstance(shard, Outcome):
            return shard
        return (await self._executor.execute(shard, [GetHold(hold_id)], deadline=deadline))[0]

    async def release_hold(self, caller: str, idempotency_key: str, hold_id: str,
                           deadline: float | None = None) -> Outcome:
        bad = validate.caller(caller) or validate.idempotency_key(idempotency_key)
        if bad:
            return bad
        shard = self._hold_shard(hold_id)
        if isinstance(shard, Outcome):
            return shard
        now = self._clock_ms()
        refused = await self._claim_key(caller, idempotency_key, shard,
                                        release_fingerprint(hold_id), "release:" + hold_id, now,
                                        deadline)
        if refused is not None:
            return refused
        command = ReleaseHold(caller, idempotency_key, hold_id, now)
        return (await self._executor.execute(shard, [command], deadline=deadline))[0]

    async def capture_hold(self, caller: str, idempotency_key: str, hold_id: str,
                           amount_minor: int, to_wallet_id: str, memo: str = "",
                           deadline: float | None = None) -> Outcome:
        bad = (validate.caller(caller) or validate.idempotency_key(idempotency_key)
               or validate.wallet_id(to_wallet_id, "to_wallet_id")
               or (validate.amount(amount_minor) if amount_minor else None)
               or validate.memo(memo))
        if bad:
            return bad
        shard = self._hold_shard(hold_id)
        if isinstance(shard, Outcome):
            return shard
        now = self._clock_ms()
        to_shard = self.shard_of(to_wallet_id)
        transfer_id = transfer_id_for(shard, caller, idempotency_key)
        key_shard = self.key_shard(caller, idempotency_key)
        hold = None
        if to_shard != shard or (key_shard != shard and not amount_minor):
            hold = (await self._executor.execute(shard, [GetHold(hold_id)],
                                                 deadline=deadline))[0]
            if not hold.ok:
                return hold
        # "All" (0) is claimed as the amount it stands for, as the hold's shard records it,
        # so a retry naming the amount and one saying "all" are the same request everywhere.
        amount = amount_minor or (hold.value.amount_minor if hold is not None else 0)
        refused = await self._claim_key(caller, idempotency_key, shard, capture_fingerprint(
            hold_id, to_wallet_id, amount, memo), "transfer:" + transfer_id, now, deadline)
        if refused is not None:
            return refused
        credit_refusal = None
        reserved_at = 0
        if to_shard != shard:
            if hold is None:  # read above whenever the credit is on another shard
                raise InvariantViolation("capture across shards without its hold read")
            answer = (await self._executor.execute(to_shard, [ReserveCredit(
                transfer_id, to_wallet_id, hold.value.currency, amount, now)],
                deadline=deadline))[0]
            if answer.status.transient():
                return answer
            if not answer.ok:
                credit_refusal = (int(answer.status), answer.field, answer.detail)
            reserved_at = answer.value if answer.ok else 0
        command = CaptureHold(caller, idempotency_key, transfer_id, hold_id, amount_minor,
                              to_wallet_id, to_shard, memo, now, credit_refusal, reserved_at)
        outcome = (await self._executor.execute(shard, [command], wait_credit=True,
                                                deadline=deadline))[0]
        if reserved_at and refused_for_good(outcome):
            # Best effort, as in _commit: a failed cancel is logged, and resolved later.
            spawn(self._executor.execute(to_shard, [CancelReservation(transfer_id, reserved_at)]),
                  "cancel-reservation")
        return outcome

    # --- reads ------------------------------------------------------------------------------

    async def get_transfer(self, transfer_id: str, deadline: float | None = None) -> Outcome:
        match = _TRANSFER_ID.fullmatch(transfer_id or "")
        if match is None:
            return refuse(Status.INVALID_ARGUMENT, "transfer_id", "is not a transfer id")
        shard = int(match.group(1), 16)
        if shard >= self._shard_count:
            return refuse(Status.TRANSFER_NOT_FOUND, "transfer_id", "no transfer with this id")
        outcome = (await self._executor.execute(shard, [GetTransfer(transfer_id)],
                                                deadline=deadline))[0]
        if outcome.status is Status.TRANSFER_NOT_FOUND:
            # Past the idempotency window the owner forgets it; the history still has it.
            stored = await self._history.get_transfer(transfer_id)
            if stored is not None:
                return ok(stored)
        return outcome

    async def list_entries(self, wallet_id: str, page_size: int, page_token: str,
                           deadline: float | None = None) -> Outcome:
        """A page of a wallet's history: value is ``(entries, next_page_token)``."""
        bad = validate.wallet_id(wallet_id)
        if bad:
            return bad
        if page_token and not (page_token.isascii() and page_token.isdigit()):
            return refuse(Status.INVALID_ARGUMENT, "page_token", "is not a token from this API")
        after = int(page_token or 0)
        wallet = await self.get_wallet(wallet_id, deadline)
        if not wallet.ok:
            return wallet
        size = min(page_size or C.ENTRIES_PAGE_DEFAULT, C.ENTRIES_PAGE_MAX)
        entries = await self._history_page(wallet_id, after, size + 1, wallet.value.version,
                                           deadline)
        more = len(entries) > size
        entries = entries[:size]
        return ok((entries, str(entries[-1].version) if more else ""))

    async def _history_page(self, wallet_id: str, after: int, size: int, version: int,
                            deadline: float | None) -> list:
        """Up to ``size`` entries after version ``after``. History rows are written behind
        the journal (bounded lag); the wallet's ``version``, read from its owner, says how
        many exist: they are waited for (``HISTORY_WAIT_MS``), so a caller reads its own
        writes. Fewer come back only if the rows lag longer than that."""
        wanted = min(size, max(version - after, 0))
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + HISTORY_WAIT_MS / 1000
        if deadline is not None:
            wait_until = min(wait_until, deadline)
        while True:
            entries = await self._history.list_entries(wallet_id, after, size)
            if len(entries) >= wanted or loop.time() >= wait_until:
                return entries
            await asyncio.sleep(HISTORY_POLL_MS / 1000)

    async def balance_at(self, wallet_id: str, version: int = 0, at_ms: int = 0,
                         deadline: float | None = None) -> Outcome:
        """A wallet's balance after its entry ``version``, or as of ``at_ms``: after the
        longest prefix of its history whose entries are all at or before that time (entries
        carry their shard's decision time; one prefix is one state the wallet was in).
        Value: ``BalanceAt``. Reads one page of history per ``ENTRIES_PAGE_MAX`` entries
        before the time (a version costs one read)."""
        bad = validate.wallet_id(wallet_id)
        if bad:
            return bad
        if version < 0 or at_ms < 0 or (version > 0) == (at_ms > 0):
            return refuse(Status.INVALID_ARGUMENT, "at_ms" if at_ms else "version",
                          "give exactly one of version and at_ms, positive")
        got = await self.get_wallet(wallet_id, deadline)
        if not got.ok:
            return got
        wallet = got.value
        before = BalanceAt(wallet.wallet_id, wallet.currency, 0, 0, 0)
        if version:
            if version > wallet.version:
                return refuse(Status.INVALID_ARGUMENT, "version",
                              f"the wallet is at version {wallet.version}")
            page = await self._history_page(wallet_id, version - 1, 1, wallet.version, deadline)
            if not page or page[0].version != version:
                return refuse(Status.SHARD_UNAVAILABLE, "version",
                              "the wallet's history is not written that far yet; retry")
            e = page[0]
            return ok(before._replace(balance_minor=e.balance_after_minor, version=e.version,
                                      at_ms=e.at_ms))
        if at_ms < wallet.created_at_ms:
            return refuse(Status.WALLET_NOT_FOUND, "at_ms",
                          "the wallet did not exist yet at that time")
        answer, after = before, 0
        while after < wallet.version:
            page = await self._history_page(wallet_id, after, C.ENTRIES_PAGE_MAX,
                                            wallet.version, deadline)
            if not page:
                return refuse(Status.SHARD_UNAVAILABLE, "at_ms",
                              "the wallet's history is not written that far yet; retry")
            for e in page:
                if e.at_ms > at_ms:
                    return ok(answer)
                answer = before._replace(balance_minor=e.balance_after_minor,
                                         version=e.version, at_ms=e.at_ms)
            after = page[-1].version
        return ok(answer)


__all__ = ["Coordinator", "TransferItem", "transfer_id_for", "STATE_COMMITTED"]
