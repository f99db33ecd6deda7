"""Validation of request fields. Each check returns None when valid, else the refusal.

Validation happens before anything is looked up or changed, so a refused request leaves the
ledger exactly as it was.
"""

from __future__ import annotations

import re

from ledger.core import constants as C
from ledger.core import risk
from ledger.core.model import RESERVED_PREFIX
from ledger.core.status import Outcome, Status, refuse

_WALLET_ID = re.compile(r"[A-Za-z0-9._:@\-]+")
_CURRENCY = re.compile(r"[A-Z]{3}")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def idempotency_key(key: str, field: str = "idempotency_key") -> Outcome | None:
    if not key:
        return refuse(Status.INVALID_IDEMPOTENCY_KEY, field, "is required")
    if len(key.encode()) > C.IDEMPOTENCY_KEY_BYTES_MAX:
        return refuse(Status.INVALID_IDEMPOTENCY_KEY, field,
                      f"is longer than {C.IDEMPOTENCY_KEY_BYTES_MAX} bytes")
    if not _PRINTABLE.fullmatch(key):
        return refuse(Status.INVALID_IDEMPOTENCY_KEY, field,
                      "must be printable ASCII without spaces")
    return None


def wallet_id(value: str, field: str = "wallet_id") -> Outcome | None:
    if not value:
        return refuse(Status.INVALID_WALLET_ID, field, "is required")
    if len(value.encode()) > C.WALLET_ID_BYTES_MAX:
        return refuse(Status.INVALID_WALLET_ID, field,
                      f"is longer than {C.WALLET_ID_BYTES_MAX} bytes")
    if value.startswith(RESERVED_PREFIX):
        return refuse(Status.INVALID_WALLET_ID, field,
                      f"ids starting with '{RESERVED_PREFIX}' are reserved for the ledger")
    if not _WALLET_ID.fullmatch(value):
        return refuse(Status.INVALID_WALLET_ID, field,
                      "may contain only letters, digits and . _ : @ -")
    return None


def currency(value: str, field: str = "currency") -> Outcome | None:
    if not _CURRENCY.fullmatch(value or ""):
        return refuse(Status.INVALID_CURRENCY, field,
                      "must be a three-letter upper-case ISO 4217 code such as CNY")
    return None


def amount(value: int, field: str = "amount_minor") -> Outcome | None:
    if value <= 0:
        return refuse(Status.INVALID_AMOUNT, field, f"must be greater than 0 (got {value})")
    if value > C.AMOUNT_MINOR_MAX:
        return refuse(Status.INVALID_AMOUNT, field, "is larger than int64")
    return None


def hold_timeout(value: int, field: str = "timeout_ms") -> Outcome | None:
    if not 0 < value <= C.HOLD_TIMEOUT_MS_MAX:
        return refuse(Status.INVALID_ARGUMENT, field,
                      f"must be between 1 and {C.HOLD_TIMEOUT_MS_MAX} ms")
    return None


def memo(value: str, field: str = "memo") -> Outcome | None:
    if len(value.encode()) > C.MEMO_BYTES_MAX:
        return refuse(Status.INVALID_ARGUMENT, field, f"is longer than {C.MEMO_BYTES_MAX} bytes")
    return None


def caller(value: str) -> Outcome | None:
    if not value or len(value.encode()) > C.CALLER_BYTES_MAX or not _PRINTABLE.fullmatch(value):
        return refuse(Status.INVALID_ARGUMENT, "caller",
                      f"caller identity must be 1-{C.CALLER_BYTES_MAX} printable ASCII bytes")
    return None


def transfer(key: str, from_wallet_id: str, to_wallet_id: str, amount_minor: int,
             currency_code: str, memo_text: str) -> Outcome | None:
    """Validate a wallet-to-wallet transfer request, field by field in request order."""
    return (idempotency_key(key)
            or wallet_id(from_wallet_id, "from_wallet_id")
            or wallet_id(to_wallet_id, "to_wallet_id")
            or (refuse(Status.SAME_WALLET, "to_wallet_id",
                       "must differ from from_wallet_id")
                if from_wallet_id == to_wallet_id else None)
            or amount(amount_minor)
            or currency(currency_code)
            or memo(memo_text))


def movement(key: str, wallet: str, amount_minor: int, currency_code: str,
             memo_text: str) -> Outcome | None:
    """Validate a Deposit or Withdraw request."""
    return (idempotency_key(key) or wallet_id(wallet) or amount(amount_minor)
            or currency(currency_code) or memo(memo_text))


def device_id(value: str, field: str = "device_id", required: bool = False) -> Outcome | None:
    """A device id (the step-up check, ``ledger.core.risk``): optional on money movements."""
    if not value:
        return refuse(Status.INVALID_ARGUMENT, field, "is required") if required else None
    if len(value.encode()) > risk.DEVICE_ID_MAX:
        return refuse(Status.INVALID_ARGUMENT, field,
                      f"is longer than {risk.DEVICE_ID_MAX} bytes")
    if not _WALLET_ID.fullmatch(value):
        return refuse(Status.INVALID_ARGUMENT, field,
                      "may contain only letters, digits and . _ : @ -")
    return None


def risk_limits(for_wallet: bool, window_ms: int, max_amount_minor: int, max_count: int,
                step_up_above_minor: int) -> Outcome | None:
    """Validate a SetRiskLimits request (``ledger.core.risk``): -1 (follow the default) only
    for a wallet; a window needs an amount or a count limit, and limits need a window."""
    lowest = risk.INHERIT if for_wallet else 0
    follow = " or -1 (follow the default)" if for_wallet else ""
    if window_ms < lowest or 0 < window_ms < risk.WINDOW_MIN_MS or (
            window_ms > risk.WINDOW_MAX_MS):
        return refuse(Status.INVALID_ARGUMENT, "window_ms",
                      f"must be 0 (no velocity limit){follow} or {risk.WINDOW_MIN_MS}-"
                      f"{risk.WINDOW_MAX_MS} ms")
    for name, value in (("max_amount_minor", max_amount_minor), ("max_count", max_count)):
        if not 0 <= value <= C.AMOUNT_MINOR_MAX:
            return refuse(Status.INVALID_ARGUMENT, name, "must be 0 (unlimited) or positive")
        if value and window_ms <= 0:
            return refuse(Status.INVALID_ARGUMENT, name,
                          "needs window_ms > 0 (a limit counts within a window)")
    if window_ms > 0 and not (max_amount_minor or max_count):
        return refuse(Status.INVALID_ARGUMENT, "max_amount_minor",
                      "a velocity window needs max_amount_minor or max_count")
    if not lowest <= step_up_above_minor <= C.AMOUNT_MINOR_MAX:
        return refuse(Status.INVALID_ARGUMENT, "step_up_above_minor",
                      f"must be 0 (no step-up){follow} or a positive amount")
    return None
