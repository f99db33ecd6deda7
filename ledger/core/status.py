"""Expected outcomes as values (TigerBeetle's result enums), in precedence order.

The numbers equal the ``ledger.v1.ResultStatus`` enum on the wire; a test pins that. Which
gRPC code each status answers with is the API layer's business (``ledger.api.errors``): the
core knows nothing of gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Status(enum.IntEnum):
    OK = 1

    # INVALID_ARGUMENT: the request itself is wrong; nothing was looked up.
    INVALID_IDEMPOTENCY_KEY = 10
    INVALID_WALLET_ID = 11
    INVALID_CURRENCY = 12
    INVALID_AMOUNT = 13
    SAME_WALLET = 14
    BATCH_TOO_LARGE = 15
    INVALID_ARGUMENT = 16
    LINKED_CHAIN_OPEN = 17

    # NOT_FOUND
    WALLET_NOT_FOUND = 20
    TRANSFER_NOT_FOUND = 21
    HOLD_NOT_FOUND = 22
    ENVELOPE_NOT_FOUND = 23
    # The envelope exists, but its sender's money never reached it (the funding was refused,
    # or has not arrived within ENVELOPE_FUNDING_WAIT_MS): there is nothing to grab.
    ENVELOPE_UNFUNDED = 24

    # ALREADY_EXISTS
    WALLET_EXISTS = 30
    IDEMPOTENCY_KEY_REUSED = 31
    # This receiver grabbed this envelope before (with another idempotency key).
    ENVELOPE_ALREADY_GRABBED = 32

    # FAILED_PRECONDITION: valid request, refused by the state of the ledger.
    CURRENCY_MISMATCH = 40
    INSUFFICIENT_FUNDS = 41
    BALANCE_OVERFLOW = 42
    WALLET_FROZEN = 43
    HOLD_NOT_ACTIVE = 44
    HOLD_AMOUNT_EXCEEDED = 45
    # An item of a linked chain that was fine by itself, refused because the chain failed.
    LINKED_ITEM_FAILED = 46
    # Red envelopes: every share is taken; past its expiry; an exclusive envelope grabbed by
    # a wallet it is not for.
    ENVELOPE_SOLD_OUT = 47
    ENVELOPE_EXPIRED = 48
    ENVELOPE_NOT_ELIGIBLE = 49

    # ABORTED: a request with this idempotency key is still being executed.
    REQUEST_IN_FLIGHT = 50

    # UNAVAILABLE: the shard has no serving owner right now (failover, fenced, store down).
    SHARD_UNAVAILABLE = 60

    # RESOURCE_EXHAUSTED: a bounded queue is full.
    OVERLOADED = 70

    # FAILED_PRECONDITION, risk controls (``ledger.core.risk``): the wallet's velocity limit
    # would be passed (recorded, like INSUFFICIENT_FUNDS); the amount needs a device the
    # wallet has confirmed (not recorded: the same request succeeds once it is confirmed).
    VELOCITY_LIMIT_EXCEEDED = 80
    STEP_UP_REQUIRED = 81

    def transient(self) -> bool:
        """True when the same request may succeed if retried unchanged later."""
        return self in _TRANSIENT

    def recorded(self) -> bool:
        """True when the outcome is a decision kept under the idempotency key.

        Refusals that depend on ledger state (insufficient funds, ...) are decisions: a retry
        with the same key returns the same refusal. Malformed requests and transient failures
        are not recorded: nothing was decided.
        """
        return self is Status.OK or 40 <= self < 50 or self in (
            Status.WALLET_EXISTS, Status.VELOCITY_LIMIT_EXCEEDED)


_TRANSIENT = frozenset({Status.REQUEST_IN_FLIGHT, Status.SHARD_UNAVAILABLE, Status.OVERLOADED})


@dataclass(slots=True, frozen=True)
class Outcome:
    """The answer to one command: a status, the field it concerns, why, and a value.

    Attributes:
        status: The result status.
        field: The request field the status is about ("" when none).
        detail: A human-readable reason, safe to show to callers (no internal state).
        value: The result on success (a ``Wallet``, ``Transfer``, ...), else None.
        replayed: True when this is the stored result of an earlier request with the same
            idempotency key.
    """

    status: Status
    field: str = ""
    detail: str = ""
    value: Any = None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def ok(value: Any = None, replayed: bool = False) -> Outcome:
    return Outcome(Status.OK, value=value, replayed=replayed)


def refuse(status: Status, field: str = "", detail: str = "") -> Outcome:
    return Outcome(status, field, detail)
