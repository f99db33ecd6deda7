"""Red envelopes: creation, grabs and reads, on top of the transfer protocol.

An envelope lives on one shard: the one its escrow wallet (``~envelope:<id>``) hashes to.
Its owner serializes every grab on it, so a hot envelope has no lock to fight over (WeChat's
"serialize per envelope"). See ``coordinator/PROTOCOL.md`` ("Red envelopes").

* **Create.** ``OpenEnvelope`` on the envelope's shard (the escrow wallet and the terms,
  idempotent by envelope id, which derives from the caller's key), then an ``ENVELOPE_FUND``
  transfer sender -> escrow through the ordinary two-phase path under the caller's key (key
  claim, credit reservation, Post on the sender's shard: the commit point). The credit landing
  on the escrow makes the envelope ACTIVE. The money is in the sender's wallet or in the
  escrow, never both and never neither; a refused funding leaves an envelope with no money.
* **Grab.** The receiver's wallet is checked in its owner's durable state when that owner
  runs in this process (exists, has the envelope's currency), and the credit is owed under
  the receiver shard's headroom grant to the envelope's shard (PROTOCOL.md, "Headroom
  grants"); otherwise the receiver's shard reserves headroom for the credit
  (``ReserveCredit``: exists, currency, cannot overflow). Then the envelope's shard
  decides the grab (``GrabEnvelope``): it draws the amount (``ledger.core.split``), debits the
  escrow and owes the credit in the same journal batch, and answers once that batch is
  durable. The crediting pipeline delivers the credit exactly once, in order. A grab's key is
  scoped to its envelope (``ledger.core.ids.grab_key``).
* **Expiry.** The envelope owner's sweep refunds what is left (``RefundEnvelope``), once.

Grabs of many envelopes and receivers are batched: one command list per shard per round.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from coordinator.coordinator import Coordinator, TransferItem
from coordinator.ports import ShardExecutor
from ledger.core import constants as C
from ledger.core import split, validate
from ledger.core.ids import envelope_id_for, grab_key, transfer_id_for
from ledger.core.model import (
    KIND_ENVELOPE_FUND, AbandonEnvelope, CancelReservation, Envelope, GetEnvelope, Grab, GrabEnvelope,
    GrantHeadroom, NoteHeadroom, OpenEnvelope, ReserveCredit, escrow_wallet_id, luckiest,
)
from ledger.core.shard import HEADROOM_NEEDED
from ledger.core.status import Outcome, Status, ok, refuse
from ledger.runtime.clock import Clock, now_ms
from ledger.runtime.tasks import spawn

_ENVELOPE_ID = re.compile(r"e[0-9a-f]{24}")
# Envelopes whose currency this coordinator remembers (terms never change); the memory is
# dropped whole when it reaches this size.
_CURRENCIES_KEPT_MAX = 100_000
# (envelope shard, receiver shard) pairs this coordinator saw a headroom grant noted for
# (at most shards^2); forgotten whole past this size (asking again costs two steps).
_GRANTS_SEEN_MAX = 1 << 17
# A refused funding transfer names its own fields; CreateEnvelope's are these.
_FUNDING_FIELDS = {"amount_minor": "total_minor", "from_wallet_id": "sender_wallet_id"}


@dataclass(frozen=True, slots=True)
class EnvelopeRules:
    """The rules a deployment sets (``ledgerd`` flags); defaults from the real products."""

    total_minor_max: int = C.ENVELOPE_TOTAL_MINOR_MAX
    shares_max: int = C.ENVELOPE_SHARES_MAX
    share_minor_min: int = C.ENVELOPE_SHARE_MINOR_MIN
    expiry_ms_max: int = C.ENVELOPE_EXPIRY_MS_MAX

    def __post_init__(self) -> None:
        if not 1 <= self.total_minor_max <= C.ENVELOPE_TOTAL_MINOR_CEILING:
            raise ValueError(f"envelope total_minor_max must be 1..{C.ENVELOPE_TOTAL_MINOR_CEILING}")
        if not 1 <= self.shares_max <= C.ENVELOPE_SHARES_CEILING:
            raise ValueError(f"envelope shares_max must be 1..{C.ENVELOPE_SHARES_CEILING}")
        if not 1 <= self.share_minor_min <= self.total_minor_max:
            raise ValueError("envelope share_minor_min must be 1..total_minor_max")
        if self.expiry_ms_max < 1:
            raise ValueError("envelope expiry_ms_max must be at least 1 ms")


@dataclass(frozen=True, slots=True)
class GrabItem:
    idempotency_key: str
    envelope_id: str
    receiver_wallet_id: str


@dataclass(frozen=True, slots=True)
class EnvelopeView:
    """What GetEnvelope answers: the envelope, a page of its grabs, and the luckiest."""

    envelope: Envelope
    grabs: list[Grab]
    next_page_token: str
    luckiest: Grab | None


class EnvelopeReader(Protocol):
    """The materialized envelope views (a ``ledger.store`` adapter): rows lag the journal."""

    async def get_envelope(self, envelope_id: str) -> Envelope | None: ...

    async def list_grabs(self, envelope_id: str, after_position: int,
                         limit: int) -> list[Grab]: ...

    async def list_envelopes_sent(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Envelope]: ...

    async def list_grabs_received(self, wallet_id: str, after: tuple[int, str] | None,
                                  limit: int) -> list[Grab]: ...


class Envelopes:
    """The red-envelope calls, run against the shard owners.

    Args:
        coordinator: Runs the funding transfer (and lends its per-shard batching).
        executor: Runs commands on any shard's owner.
        views: Reads envelope rows past their owner's memory, and the per-wallet lists.
        shard_count: Number of virtual shards.
        rules: The deployment's envelope rules.
        clock_ms: Wall time for the commands' stamps.
        new_seed: The seed of a new envelope's draws (a simulation passes a seeded one).
    """

    def __init__(self, coordinator: Coordinator, executor: ShardExecutor,
                 views: EnvelopeReader, shard_count: int,
                 rules: EnvelopeRules = EnvelopeRules(), clock_ms: Clock = now_ms,
                 new_seed: Callable[[], int] = lambda: secrets.randbits(63)) -> None:
        self._coordinator = coordinator
        self._executor = executor
        self._views = views
        self._shard_count = shard_count
        self.rules = rules
        self._clock_ms = clock_ms
        self._new_seed = new_seed
        self._currencies: dict[str, str] = {}
        self._grants_seen: set[tuple[int, int]] = set()
        self._in_flight: set[tuple[str, str]] = set()

    def shard_of_envelope(self, envelope_id: str) -> int:
        return self._coordinator.shard_of(escrow_wallet_id(envelope_id))

    # --- create -----------------------------------------------------------------------------

    def _check_terms(self, caller: str, idempotency_key: str, sender: str, total_minor: int,
                     shares: int, kind: str, currency: str, expiry_ms: int, memo: str,
                     receiver: str) -> Outcome | None:
        """The first bad field of a CreateEnvelope request, in request order, or None."""
        r = self.rules
        bad = (validate.caller(caller) or validate.idempotency_key(idempotency_key)
               or validate.wallet_id(sender, "sender_wallet_id")
               or validate.amount(total_minor, "total_minor"))
        if bad:
            return bad
        if total_minor > r.total_minor_max:
            return refuse(Status.INVALID_AMOUNT, "total_minor",
                          f"is more than the {r.total_minor_max} an envelope may hold")
        if kind not in split.ENVELOPE_KINDS:
            return refuse(Status.INVALID_ARGUMENT, "kind", "must be FIXED, LUCKY or EXCLUSIVE")
        if kind == split.KIND_EXCLUSIVE and shares != 1:
            return refuse(Status.INVALID_ARGUMENT, "shares", "an EXCLUSIVE envelope has 1 share")
        if not 1 <= shares <= r.shares_max:
            return refuse(Status.INVALID_ARGUMENT, "shares", f"must be 1..{r.shares_max}")
        if total_minor < shares * r.share_minor_min:
            return refuse(Status.INVALID_AMOUNT, "total_minor",
                          f"is less than {r.share_minor_min} per share")
        bad = validate.currency(currency)
        if bad:
            return bad
        if not 1 <= expiry_ms <= r.expiry_ms_max:
            return refuse(Status.INVALID_ARGUMENT, "expiry_ms",
                          f"must be 1..{r.expiry_ms_max} ms (0 for the longest)")
        bad = validate.memo(memo)
        if bad:
            return bad
        if kind == split.KIND_EXCLUSIVE:
            bad = validate.wallet_id(receiver, "receiver_wallet_id")
            if bad:
                return bad
            if receiver == sender:
                return refuse(Status.SAME_WALLET, "receiver_wallet_id",
                              "an exclusive envelope is for another wallet")
        elif receiver:
            return refuse(Status.INVALID_ARGUMENT, "receiver_wallet_id",
                          "only an EXCLUSIVE envelope names its receiver")
        return None

    async def create(self, caller: str, idempotency_key: str, sender_wallet_id: str,
                     total_minor: int, shares: int, kind: str, currency: str,
                     expiry_ms: int = 0, memo: str = "", receiver_wallet_id: str = "",
                     deadline: float | None = None, device_id: str = "") -> Outcome:
        """Create and fund an envelope. Value: ``(Envelope, funding Transfer)``. The funding
        is a debit of the sender like any other: frozen wallets, velocity limits and the
        step-up check (``device_id``) apply to it."""
        if kind == split.KIND_EXCLUSIVE and shares == 0:
            shares = 1
        expiry_ms = expiry_ms or self.rules.expiry_ms_max
        bad = self._check_terms(caller, idempotency_key, sender_wallet_id, total_minor, shares,
                                kind, currency, expiry_ms, memo, receiver_wallet_id)
        if not bad and device_id:
            bad = validate.device_id(device_id)
        if bad:
            return bad
        now = self._clock_ms()
        envelope_id = envelope_id_for(caller, idempotency_key)
        shard = self.shard_of_envelope(envelope_id)
        funding_id = transfer_id_for(self._coordinator.shard_of(sender_wallet_id), caller,
                                     idempotency_key)
        envelope = Envelope(envelope_id, sender_wallet_id, currency, kind, total_minor, shares,
                            self.rules.share_minor_min, receiver_wallet_id, memo,
                            self._new_seed(), caller, idempotency_key, funding_id, now,
                            now + expiry_ms)
        opened = (await self._executor.execute(shard, [OpenEnvelope(envelope, now)],
                                               deadline=deadline))[0]
        if not opened.ok:
            return opened
        funded = await self._coordinator.transfer(caller, TransferItem(
            idempotency_key, sender_wallet_id, escrow_wallet_id(envelope_id), total_minor,
            currency, memo, KIND_ENVELOPE_FUND, device_id=device_id), deadline)
        if not funded.ok:
            if funded.status.recorded():
                # Refused for good: the money will never reach the escrow. Close the
                # envelope, so that grabs are told so at once (not "retry").
                await self._executor.execute(shard, [AbandonEnvelope(
                    envelope_id, funding_id, self._clock_ms())], deadline=deadline)
            # The funding transfer's refusal, in the names of this request's fields.
            field_name = _FUNDING_FIELDS.get(funded.field, funded.field)
            detail = funded.detail.replace("from_wallet_id", "sender_wallet_id")
            return Outcome(funded.status, field_name, detail, funded.value, funded.replayed)
        read = (await self._executor.execute(shard, [GetEnvelope(envelope_id)],
                                             deadline=deadline))[0]
        if not read.ok:
            return read
        return ok((read.value[0], funded.value), replayed=opened.replayed and funded.replayed)

    # --- grab -------------------------------------------------------------------------------

    async def grab(self, caller: str, item: GrabItem,
                   deadline: float | None = None) -> Outcome:
        return (await self.grab_many(caller, [item], deadline))[0]

    async def grab_many(self, caller: str, items: list[GrabItem],
                        deadline: float | None = None) -> list[Outcome]:
        """Grabs, one outcome per item, in order. An OK value is ``(Grab, Transfer)``; an
        ENVELOPE_ALREADY_GRABBED value is ``(the earlier Grab, None)``."""
        bad = validate.caller(caller)
        if bad:
            return [bad] * len(items)
        if len(items) > C.BATCH_TRANSFERS_MAX:
            return [refuse(Status.BATCH_TOO_LARGE, "grabs",
                           f"at most {C.BATCH_TRANSFERS_MAX} items per call")] * len(items)
        results: list[Outcome | None] = [None] * len(items)
        live: dict[int, GrabItem] = {}
        for i, item in enumerate(items):
            bad = (validate.idempotency_key(item.idempotency_key)
                   or (None if _ENVELOPE_ID.fullmatch(item.envelope_id or "") else refuse(
                       Status.INVALID_ARGUMENT, "envelope_id", "is not an envelope id"))
                   or validate.wallet_id(item.receiver_wallet_id, "receiver_wallet_id"))
            if bad:
                results[i] = bad
            else:
                live[i] = item
        unread = await self._learn_currencies({it.envelope_id for it in live.values()},
                                              deadline)
        # The shard of each envelope, once per call (a hot envelope is in every item).
        homes = {e: self.shard_of_envelope(e) for e in {it.envelope_id for it in live.values()}}
        shard_of = self._coordinator.shard_of
        facts = getattr(self._executor, "wallet_currency", None)
        claimed: list[tuple[str, str]] = []
        # The same grab key twice in one call: the later items get the first one's answer.
        firsts: dict[str, int] = {}
        again: dict[int, int] = {}
        try:
            commands: dict[int, tuple[int, GrabEnvelope]] = {}
            now = self._clock_ms()
            for i, item in live.items():
                currency = self._currencies.get(item.envelope_id)
                if currency is None:
                    # Not found, or its owner did not answer (SHARD_UNAVAILABLE, ...: the
                    # client retries; never a definitive "not found" for a missed read).
                    results[i] = unread.get(item.envelope_id) or refuse(
                        Status.ENVELOPE_NOT_FOUND, "envelope_id", "no envelope with this id")
                    continue
                key = grab_key(item.envelope_id, item.idempotency_key)
                if key in firsts:
                    again[i] = firsts[key]
                    continue
                firsts[key] = i
                if (caller, key) in self._in_flight:
                    results[i] = refuse(Status.REQUEST_IN_FLIGHT, "idempotency_key",
                                        "a grab with this key is being executed")
                    continue
                self._in_flight.add((caller, key))
                claimed.append((caller, key))
                home = homes[item.envelope_id]
                receiver_shard = shard_of(item.receiver_wallet_id)
                refusal, reserved = None, 0
                if receiver_shard != home and facts is not None:
                    refusal, reserved = _owed_how(
                        facts(receiver_shard, item.receiver_wallet_id), currency)
                commands[i] = (home, GrabEnvelope(
                    caller, key, item.envelope_id, item.receiver_wallet_id, receiver_shard,
                    transfer_id_for(home, caller, key), now, refusal, reserved))
            await self._reserve(commands, results, deadline)
            decided = await self._coordinator._by_shard(commands, deadline=deadline)
            short = {i: o.value for i, o in decided.items()
                     if o.status is Status.REQUEST_IN_FLIGHT and o.field == HEADROOM_NEEDED}
            if short:
                resend = await self._more_headroom(commands, short, results, decided, deadline)
                decided.update(await self._coordinator._by_shard(resend, deadline=deadline))
                for i in short:
                    o = decided[i]
                    if o.status is Status.REQUEST_IN_FLIGHT and o.field == HEADROOM_NEEDED:
                        # Still short (a batch owing more than a whole grant to one shard):
                        # the client retries; the next call asks for more.
                        decided[i] = refuse(Status.REQUEST_IN_FLIGHT, "receiver_wallet_id",
                                            "the receiver's shard is granting headroom; retry")
            cancel: dict[int, tuple[int, object]] = {}
            for i, outcome in decided.items():
                results[i] = outcome
                c = commands[i][1]
                if c.reserved_at_ms > 0 and not outcome.ok and not outcome.status.transient():
                    cancel[i] = (c.receiver_shard, CancelReservation(c.transfer_id,
                                                                     c.reserved_at_ms))
            if cancel:
                # Best effort, as for transfers: a reservation left behind is dropped by its
                # shard after asking the envelope's shard (ResolveReservations).
                spawn(self._coordinator._by_shard(cancel), "cancel-grab-reservations")
        finally:
            self._in_flight.difference_update(claimed)
        for i, first in again.items():
            answer = results[first]
            assert answer is not None
            if items[i].receiver_wallet_id != items[first].receiver_wallet_id:
                results[i] = refuse(Status.IDEMPOTENCY_KEY_REUSED, "receiver_wallet_id",
                                    "idempotency key was first used with a different "
                                    "receiver_wallet_id")
            else:
                results[i] = Outcome(answer.status, answer.field, answer.detail, answer.value,
                                     replayed=answer.replayed or answer.ok)
        return results  # type: ignore[return-value]

    async def _learn_currencies(self, envelope_ids: set[str],
                                deadline: float | None) -> dict[str, Outcome]:
        """Read the currency of envelopes not seen before from their owners (once: the terms
        of an envelope never change). Returns the failed reads' outcomes by envelope id."""
        unknown = [e for e in envelope_ids if e not in self._currencies]
        if not unknown:
            return {}
        reads = await self._coordinator._by_shard(
            {i: (self.shard_of_envelope(e), GetEnvelope(e)) for i, e in enumerate(unknown)},
            deadline=deadline)
        if len(self._currencies) + len(unknown) > _CURRENCIES_KEPT_MAX:
            # Start again, keeping what this call uses.
            kept = {e: self._currencies[e] for e in envelope_ids if e in self._currencies}
            self._currencies.clear()
            self._currencies.update(kept)
        failed: dict[str, Outcome] = {}
        for i, outcome in reads.items():
            if outcome.ok:
                self._currencies[unknown[i]] = outcome.value[0].currency
            else:
                failed[unknown[i]] = outcome
        return failed

    async def _reserve(self, commands: dict[int, tuple[int, GrabEnvelope]], results: list,
                       deadline: float | None) -> None:
        """Settle how each grab's credit will be owed (a receiver on the envelope's own
        shard is checked there, in the grab's step).

        ``grab_many`` checked each receiver whose shard's owner runs in this process in that
        owner's durable state, without a journaled step (``Router.wallet_currency``,
        ``_owed_how``): a missing wallet or another currency became the grab's refusal, a
        fitting one is owed under the receiver shard's headroom grant to the envelope's
        shard (``UNDER_GRANT``: PROTOCOL.md, "Headroom grants"). Here the grants this
        coordinator has not seen given are asked for; every other receiver (another node's,
        or one whose shard cannot grant) gets headroom reserved on its shard
        (``ReserveCredit``), one journaled step per shard, as before grants existed.
        """
        cold = {(home, c.receiver_shard): C.HEADROOM_GRANT_MINOR
                for home, c in commands.values()
                if c.reserved_at_ms == C.UNDER_GRANT
                and (home, c.receiver_shard) not in self._grants_seen}
        if cold:
            given = await self._grant(cold, deadline)
            for i, (home, c) in list(commands.items()):
                outcome = given.get((home, c.receiver_shard))
                if outcome is None or outcome.ok or c.reserved_at_ms != C.UNDER_GRANT:
                    continue
                if outcome.status.transient():
                    results[i] = outcome
                    del commands[i]
                else:  # no grant to be had: reserved below
                    commands[i] = (home, _grab_with(c, under_grant=False))
        currencies = self._currencies
        reserve = {i: (c.receiver_shard, ReserveCredit(
                       c.transfer_id, c.receiver_wallet_id, currencies[c.envelope_id],
                       C.ENVELOPE_TOTAL_MINOR_CEILING, c.now_ms))
                   for i, (home, c) in commands.items()
                   if c.receiver_shard != home and not c.reserved_at_ms
                   and c.credit_refusal is None}
        if not reserve:
            return
        for i, outcome in (await self._coordinator._by_shard(reserve, deadline=deadline)).items():
            home, c = commands[i]
            if outcome.ok:
                commands[i] = (home, _grab_with(c, reserved_at_ms=outcome.value))
            elif outcome.status.transient():
                results[i] = outcome
                del commands[i]
            else:
                # The envelope's shard decides: a retry of a grab made before gets its grab.
                commands[i] = (home, _grab_with(c, credit_refusal=(
                    int(outcome.status), outcome.field, outcome.detail)))

    async def _grant(self, pairs: dict[tuple[int, int], int],
                     deadline: float | None) -> dict[tuple[int, int], Outcome]:
        """Have each receiver shard grant each envelope shard headroom up to a total
        (``{(envelope shard, receiver shard): total}``): ``GrantHeadroom`` on the receiver
        shard (journaled there; idempotent by the total, so racing coordinators ask for the
        same), then ``NoteHeadroom`` on the envelope shard with what was granted. The
        outcome per pair: OK once the envelope shard holds the grant."""
        keys = list(pairs)
        given = await self._coordinator._by_shard(
            {k: (credit, GrantHeadroom(home, pairs[(home, credit)]))
             for k, (home, credit) in enumerate(keys)}, deadline=deadline)
        noted = await self._coordinator._by_shard(
            {k: (home, NoteHeadroom(credit, given[k].value))
             for k, (home, credit) in enumerate(keys) if given[k].ok}, deadline=deadline)
        out = {keys[k]: o for k, o in given.items()}
        out.update({keys[k]: o for k, o in noted.items()})
        if len(self._grants_seen) > _GRANTS_SEEN_MAX:
            self._grants_seen.clear()
        self._grants_seen.update(pair for pair, o in out.items() if o.ok)
        return out

    async def _more_headroom(self, commands: dict[int, tuple[int, GrabEnvelope]],
                             short: dict[int, tuple[int, int]], results: list,
                             decided: dict[int, Outcome],
                             deadline: float | None) -> dict[int, tuple[int, GrabEnvelope]]:
        """Grabs their envelope's shard could not owe under the receiver shard's grant (used
        up: once per HEADROOM_GRANT_MINOR of credits): ask for that much more (``_grant``)
        and return the grabs to send again; where no grant is to be had (a wallet too close
        to the int64 ceiling), the grab's credit is reserved on its own instead. (Those
        grabs are decided after the call's other grabs of the same envelope.)"""
        pairs: dict[tuple[int, int], int] = {}
        for i, (credit_shard, granted) in short.items():
            pair = (commands[i][0], credit_shard)
            pairs[pair] = max(pairs.get(pair, 0), granted + C.HEADROOM_GRANT_MINOR)
        given = await self._grant(pairs, deadline)
        again: dict[int, tuple[int, GrabEnvelope]] = {}
        fallback: dict[int, tuple[int, GrabEnvelope]] = {}
        for i in short:
            home, c = commands[i]
            outcome = given[(home, c.receiver_shard)]
            if outcome.ok:
                again[i] = commands[i]
            elif outcome.status.transient():
                decided[i] = outcome
            else:
                fallback[i] = (home, _grab_with(c, under_grant=False))
        if fallback:
            tried = list(fallback)
            await self._reserve(fallback, results, deadline)
            for i in tried:
                if i not in fallback:  # the reservation failed transiently: its answer
                    decided[i] = results[i]
                    results[i] = None
            commands.update(fallback)
            again.update(fallback)
        return again

    # --- reads ------------------------------------------------------------------------------

    async def get(self, envelope_id: str, page_size: int = 0, page_token: str = "",
                  deadline: float | None = None) -> Outcome:
        """The envelope, a page of its grabs and its luckiest grab (``EnvelopeView``)."""
        if not _ENVELOPE_ID.fullmatch(envelope_id or ""):
            return refuse(Status.INVALID_ARGUMENT, "envelope_id", "is not an envelope id")
        if page_token and not (page_token.isascii() and page_token.isdigit()):
            return refuse(Status.INVALID_ARGUMENT, "page_token", "is not a token from this API")
        after = int(page_token or 0)
        size = min(page_size or C.ENVELOPE_GRABS_PAGE_DEFAULT, C.ENVELOPE_GRABS_PAGE_MAX)
        outcome = (await self._executor.execute(self.shard_of_envelope(envelope_id),
                                                [GetEnvelope(envelope_id)],
                                                deadline=deadline))[0]
        if outcome.ok:
            envelope, grabs = outcome.value
        elif outcome.status is Status.ENVELOPE_NOT_FOUND:
            # Past the idempotency window its owner forgets a closed envelope; the views
            # keep it.
            stored = await self._views.get_envelope(envelope_id)
            if stored is None:
                return outcome
            envelope, grabs = stored, await self._all_grabs(envelope_id)
        else:
            return outcome
        page = grabs[after:after + size]
        token = str(after + size) if after + size < len(grabs) else ""
        return ok(EnvelopeView(envelope, page, token, luckiest(grabs)))

    async def _all_grabs(self, envelope_id: str) -> list[Grab]:
        out: list[Grab] = []
        while True:
            page = await self._views.list_grabs(envelope_id, out[-1].position if out else -1,
                                                C.ENVELOPE_GRABS_PAGE_MAX)
            out.extend(page)
            if len(page) < C.ENVELOPE_GRABS_PAGE_MAX:
                return out

    async def list_for_wallet(self, wallet_id: str, sent: bool, page_size: int = 0,
                              page_token: str = "") -> Outcome:
        """Envelopes a wallet sent (value ``(list[Envelope], token)``) or grabs it received
        (value ``(list[Grab], token)``), oldest first, from the views (they lag the
        journal by a bounded time)."""
        bad = validate.wallet_id(wallet_id)
        if bad:
            return bad
        after: tuple[int, str] | None = None
        if page_token:
            at, _, envelope_id = page_token.partition(".")
            if not (at.isascii() and at.isdigit()) or not _ENVELOPE_ID.fullmatch(envelope_id):
                return refuse(Status.INVALID_ARGUMENT, "page_token",
                              "is not a token from this API")
            after = (int(at), envelope_id)
        size = min(page_size or C.ENVELOPES_PAGE_DEFAULT, C.ENVELOPES_PAGE_MAX)
        if sent:
            envelopes = await self._views.list_envelopes_sent(wallet_id, after, size + 1)
            more = len(envelopes) > size
            envelopes = envelopes[:size]
            last = envelopes[-1] if envelopes else None
            token = f"{last.created_at_ms}.{last.envelope_id}" if more and last else ""
            return ok((envelopes, token))
        grabs = await self._views.list_grabs_received(wallet_id, after, size + 1)
        more = len(grabs) > size
        grabs = grabs[:size]
        token = f"{grabs[-1].at_ms}.{grabs[-1].envelope_id}" if more and grabs else ""
        return ok((grabs, token))


def _owed_how(known: str | None | bool,
             currency: str) -> tuple[tuple[int, str, str] | None, int]:
    """How a grab's credit will be owed, from what the receiver's owner says of its wallet
    (``Router.wallet_currency``): ``(credit_refusal, reserved_at_ms)``. Unknown: reserved
    (0, 0 -> ``_reserve``); no such wallet or another currency: the refusal the envelope's
    shard passes on; else under the receiver shard's headroom grant."""
    if known is None:
        return None, 0
    if known is False:
        return (int(Status.WALLET_NOT_FOUND), "receiver_wallet_id", "no wallet with this id"), 0
    if known != currency:
        return (int(Status.CURRENCY_MISMATCH), "receiver_wallet_id",
                f"receiver_wallet_id holds {known}, the envelope {currency}"), 0
    return None, C.UNDER_GRANT


def _grab_with(c: GrabEnvelope, credit_refusal: tuple[int, str, str] | None = None,
               reserved_at_ms: int = 0, under_grant: bool = True) -> GrabEnvelope:
    kept = c.reserved_at_ms if under_grant or c.reserved_at_ms != C.UNDER_GRANT else 0
    return GrabEnvelope(c.caller, c.idempotency_key, c.envelope_id, c.receiver_wallet_id,
                        c.receiver_shard, c.transfer_id, c.now_ms,
                        credit_refusal if credit_refusal is not None else c.credit_refusal,
                        reserved_at_ms or kept)
