"""The one pure step of a shard, and the one replay fold of its journal.

``step`` is what a shard owner does with a group of commands: each command is decided against
the state as the commands before it left it, and its events are applied at once, so that the
next command sees them. ``fold`` is what every reader of a journal does with its batches (a
takeover replay, a snapshot build, reconciliation, the simulation's running fold): it applies
the journaled events of each batch in order and advances the state's batch number and its audit
chain (``ledger.core.audit``: the owner chains its live batches the same way, so a replay
re-emits identical audit rows and a snapshot carries the head the owner had).

Every decide-then-evolve loop and every replay loop of the ledger goes through these two
functions, so the rules for "how a command changes a shard" live in one place
(``tests/unit/test_layers.py`` checks that no other module calls ``decide`` or ``evolve``).
Both mutate the ``ShardState`` they are given and perform no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from ledger.core import audit, codec
from ledger.core.invariants import InvariantViolation
from ledger.core.shard import Event, ShardState
from ledger.core.status import Outcome


@dataclass(slots=True)
class StepResult:
    """What one ``step`` produced.

    Attributes:
        outcomes: One outcome per command, in command order.
        events: The events to journal, in the order they were applied.
        rows: The materialized rows the events changed (``ShardState.evolve``), in order.
    """

    outcomes: list[Outcome]
    events: list[Event]
    rows: list


# Rows of mutable objects (a wallet, an envelope) are collected by ``ShardState.evolve`` as
# the live object, and copied once when the step (or batch) ends (``_own_rows``): a hot
# envelope's step changes its envelope and escrow wallet once per grab, and only the last of
# those rows is ever written (``ledger.store.rows``: the last row of a key wins).
_LIVE_ROWS = frozenset({"wallet", "envelope"})


def _own_rows(rows: list, start: int) -> None:
    """Copy the live rows collected since ``start``, once per object: the LAST row of each
    object stays where it is, as a copy of the object now; earlier rows of the same object
    are dropped (a store would have let the last one win anyway). Other rows and the order
    of the rows kept are unchanged."""
    seen: set[int] = set()
    kept: list = []
    for index in range(len(rows) - 1, start - 1, -1):
        row = rows[index]
        if row[0] in _LIVE_ROWS:
            ident = id(row[1])
            if ident in seen:
                continue
            seen.add(ident)
            row = (row[0], row[1].copy())
        kept.append(row)
    kept.reverse()
    rows[start:] = kept


def step(state: ShardState, commands: Iterable[object],
         rows: list | None = None) -> StepResult:
    """Decide ``commands`` in order against ``state``, applying each one's events at once.

    Commands carry their own time (``now_ms`` fields), so the step is a function of the state
    and the commands alone.

    Args:
        state: The shard's state; it is changed in place by the events.
        commands: Shard commands (``ledger.core.model``), applied in order.
        rows: A list to collect the changed rows into (a new one if None).

    Returns:
        The outcomes, the events to journal and the rows they changed.

    Raises:
        InvariantViolation: an event does not apply. ``state`` then holds the events before
            it: the caller must not answer from it again (an owner gives the shard up).
    """
    collected = [] if rows is None else rows
    start = len(collected)
    outcomes: list[Outcome] = []
    events: list[Event] = []
    decide = state.decide
    evolve = state.evolve
    try:
        for command in commands:
            outcome, new_events = decide(command)
            for event in new_events:
                evolve(event, collected)
            events.extend(new_events)
            outcomes.append(outcome)
    finally:
        _own_rows(collected, start)
    return StepResult(outcomes, events, collected)


class JournalGap(InvariantViolation):
    """A journal batch does not follow the state's batch number (a batch is missing)."""


class Batch(Protocol):
    """A journal batch as the fold reads it (``ledger.store.port.JournalBatch`` is one)."""

    @property
    def seq(self) -> int:
        """The batch number: one more than the batch before it."""
        ...

    @property
    def epoch(self) -> int:
        """The writer epoch of the batch (part of its audit row's hash)."""
        ...

    @property
    def events(self) -> bytes:
        """The batch's events, encoded with ``ledger.core.codec.dumps``."""
        ...


class FoldObserver(Protocol):
    """Looks at a fold as it goes (reconciliation), and lets it go on past bad batches.

    A fold given an observer reports a gap or an event that does not apply to it, and goes
    on; without one, either stops the fold with an exception.
    """

    def on_event(self, seq: int, event: Event) -> None:
        """``event`` of batch ``seq`` was applied."""
        ...

    def on_gap(self, seq: int, expected: int) -> None:
        """Batch ``seq`` came where batch ``expected`` was due; it is folded anyway."""
        ...

    def on_violation(self, seq: int, error: InvariantViolation) -> None:
        """An event of batch ``seq`` did not apply; the fold goes on with the next one."""
        ...


def fold_events(state: ShardState, events: Iterable[Event], rows: list | None = None) -> None:
    """Apply journaled ``events`` to ``state`` in order (one batch's worth, or a test's).

    Raises:
        InvariantViolation: an event does not apply.
    """
    evolve = state.evolve
    start = len(rows) if rows is not None else 0
    try:
        for event in events:
            evolve(event, rows)
    finally:
        if rows is not None:
            _own_rows(rows, start)


def fold_batch(state: ShardState, batch: Batch, rows: list | None = None,
               observer: FoldObserver | None = None) -> None:
    """Apply one journal batch, whatever its number: its events, its audit row (collected
    into ``rows`` as ``("audit", AuditRow)``), and the state's ``seq``. ``fold`` checks the
    numbers; the simulation's running fold calls this directly (its oracle checks them).

    Raises:
        InvariantViolation: an event does not apply (without an observer).
    """
    events = codec.loads(batch.events)
    if observer is None:
        fold_events(state, events, rows)
    else:
        start = len(rows) if rows is not None else 0
        for event in events:
            try:
                state.evolve(event, rows)
            except InvariantViolation as exc:
                observer.on_violation(batch.seq, exc)
                continue
            observer.on_event(batch.seq, event)
        if rows is not None:
            _own_rows(rows, start)
    # From the decoded events, applied or not: the records say what the journal holds.
    row = audit.chain(state, batch.seq, batch.epoch, events)
    if row is not None and rows is not None:
        rows.append(("audit", row))
    state.seq = batch.seq


def fold(state: ShardState, batches: Sequence[Batch], rows: list | None = None,
         rows_max: int | None = None, observer: FoldObserver | None = None) -> int:
    """Apply journal ``batches`` to ``state`` in order; the state's ``seq`` follows them.

    Args:
        state: The state after the batch before the first one (changed in place).
        batches: Consecutive journal batches.
        rows: A list to collect the changed rows into, or None not to collect them.
        rows_max: Stop after the batch at which more than this many rows are collected, so
            that the caller can write them before it goes on (None: no limit).
        observer: Sees every event, gap and violation; with one, a gap or a violation is
            reported and the fold goes on.

    Returns:
        How many batches were folded (all of them, unless ``rows_max`` stopped the fold).

    Raises:
        JournalGap: a batch does not follow the one before it (without an observer).
        InvariantViolation: an event does not apply (without an observer).
    """
    done = 0
    for batch in batches:
        if batch.seq != state.seq + 1:
            if observer is None:
                raise JournalGap(f"shard {state.shard}: journal gap before batch {batch.seq} "
                                 f"(state is at {state.seq})")
            observer.on_gap(batch.seq, state.seq + 1)
        fold_batch(state, batch, rows, observer)
        done += 1
        if rows_max is not None and rows is not None and len(rows) > rows_max:
            break
    return done
