"""Request validation (``ledger.core.validate``): for each field, which values pass, and which
status, field and reason each bad value is refused with.

Validation runs before anything is looked up, so these refusals are never recorded under an
idempotency key (``Status.recorded()`` is False for all of them): the same key with a
corrected request is still free.
"""

import pytest

from ledger.core import constants as C
from ledger.core import validate
from ledger.core.status import Status

KEY_MAX = "k" * C.IDEMPOTENCY_KEY_BYTES_MAX
WALLET_MAX = "w" * C.WALLET_ID_BYTES_MAX


def assert_refused(outcome, status: Status, field: str, reason: str = "") -> None:
    assert outcome is not None, "accepted"
    assert (outcome.status, outcome.field) == (status, field)
    assert reason in outcome.detail
    assert not outcome.status.recorded()


# --- idempotency_key ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["k", "payments:2026-11-26/42", KEY_MAX, "!~"])
def test_good_idempotency_keys(key):
    assert validate.idempotency_key(key) is None


@pytest.mark.parametrize("key, reason", [
    ("", "is required"),
    (KEY_MAX + "k", f"longer than {C.IDEMPOTENCY_KEY_BYTES_MAX} bytes"),
    # Bytes, not characters: 64 two-byte characters are 128 bytes, 65 are too many.
    ("é" * 65, f"longer than {C.IDEMPOTENCY_KEY_BYTES_MAX} bytes"),
    ("é", "printable ASCII"),
    ("a b", "printable ASCII"),
    ("a\tb", "printable ASCII"),
    ("key\n", "printable ASCII"),
    ("\x00", "printable ASCII"),
])
def test_bad_idempotency_keys(key, reason):
    assert_refused(validate.idempotency_key(key), Status.INVALID_IDEMPOTENCY_KEY,
                   "idempotency_key", reason)


def test_the_key_field_can_be_renamed():
    assert_refused(validate.idempotency_key("", "transfers[3].idempotency_key"),
                   Status.INVALID_IDEMPOTENCY_KEY, "transfers[3].idempotency_key")


# --- wallet ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("wallet", ["alice", "a", "user-42", "a.b_c:d@e-f", "0", WALLET_MAX])
def test_good_wallet_ids(wallet):
    assert validate.wallet_id(wallet) is None


@pytest.mark.parametrize("wallet, reason", [
    ("", "is required"),
    (WALLET_MAX + "w", f"longer than {C.WALLET_ID_BYTES_MAX} bytes"),
    ("~settlement:CNY:0", "reserved for the ledger"),
    ("~alice", "reserved for the ledger"),
    ("a b", "only letters, digits"),
    ("alice/bob", "only letters, digits"),
    ("ünicode", "only letters, digits"),
    ("alice\n", "only letters, digits"),
])
def test_bad_wallet_ids(wallet, reason):
    assert_refused(validate.wallet_id(wallet), Status.INVALID_WALLET_ID, "wallet_id", reason)
    assert_refused(validate.wallet_id(wallet, "to_wallet_id"), Status.INVALID_WALLET_ID,
                   "to_wallet_id", reason)


# --- currency -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["CNY", "USD", "XAU"])
def test_good_currencies(code):
    assert validate.currency(code) is None


@pytest.mark.parametrize("code", ["", "cny", "CN", "CNYY", "C1Y", "CN ", "ＣＮＹ", None])
def test_bad_currencies(code):
    assert_refused(validate.currency(code), Status.INVALID_CURRENCY, "currency", "ISO 4217")


# --- amounts --------------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [1, 2_500, C.AMOUNT_MINOR_MAX])
def test_good_amounts(amount):
    assert validate.amount(amount) is None


@pytest.mark.parametrize("amount, reason", [
    (0, "must be greater than 0 (got 0)"),
    (-1, "must be greater than 0 (got -1)"),
    (C.BALANCE_MINOR_MIN, "must be greater than 0"),
    (C.AMOUNT_MINOR_MAX + 1, "larger than int64"),
])
def test_bad_amounts(amount, reason):
    assert_refused(validate.amount(amount), Status.INVALID_AMOUNT, "amount_minor", reason)


# --- memo and caller ------------------------------------------------------------------------

def test_memo_is_limited_in_bytes():
    assert validate.memo("") is None
    assert validate.memo("m" * C.MEMO_BYTES_MAX) is None
    assert_refused(validate.memo("m" * (C.MEMO_BYTES_MAX + 1)), Status.INVALID_ARGUMENT,
                   "memo", f"longer than {C.MEMO_BYTES_MAX} bytes")
    # 86 three-byte characters are 258 bytes.
    assert_refused(validate.memo("红" * 86), Status.INVALID_ARGUMENT, "memo")


@pytest.mark.parametrize("caller", ["payments", "svc-1", "c" * C.CALLER_BYTES_MAX])
def test_good_callers(caller):
    assert validate.caller(caller) is None


@pytest.mark.parametrize("caller", ["", "c" * (C.CALLER_BYTES_MAX + 1), "pay ments", "payé"])
def test_bad_callers(caller):
    assert_refused(validate.caller(caller), Status.INVALID_ARGUMENT, "caller",
                   "printable ASCII")


# --- whole requests: the first bad field, in request order -----------------------------------

GOOD_TRANSFER = dict(key="k1", from_wallet_id="alice", to_wallet_id="bob", amount_minor=100,
                     currency_code="CNY", memo_text="")


def test_a_good_transfer_passes():
    assert validate.transfer(**GOOD_TRANSFER) is None


@pytest.mark.parametrize("changed, status, field", [
    (dict(key=""), Status.INVALID_IDEMPOTENCY_KEY, "idempotency_key"),
    (dict(from_wallet_id=""), Status.INVALID_WALLET_ID, "from_wallet_id"),
    (dict(to_wallet_id="~x"), Status.INVALID_WALLET_ID, "to_wallet_id"),
    (dict(to_wallet_id="alice"), Status.SAME_WALLET, "to_wallet_id"),
    (dict(amount_minor=0), Status.INVALID_AMOUNT, "amount_minor"),
    (dict(currency_code="cny"), Status.INVALID_CURRENCY, "currency"),
    (dict(memo_text="m" * 257), Status.INVALID_ARGUMENT, "memo"),
    # Several bad fields: the first in request order is named.
    (dict(key="", amount_minor=-1, currency_code=""), Status.INVALID_IDEMPOTENCY_KEY,
     "idempotency_key"),
    (dict(to_wallet_id="alice", amount_minor=-1), Status.SAME_WALLET, "to_wallet_id"),
    (dict(amount_minor=-1, currency_code=""), Status.INVALID_AMOUNT, "amount_minor"),
])
def test_a_bad_transfer_names_its_first_bad_field(changed, status, field):
    assert_refused(validate.transfer(**{**GOOD_TRANSFER, **changed}), status, field)


GOOD_MOVEMENT = dict(key="d1", wallet="alice", amount_minor=100, currency_code="CNY",
                     memo_text="salary")


def test_a_good_deposit_or_withdrawal_passes():
    assert validate.movement(**GOOD_MOVEMENT) is None


@pytest.mark.parametrize("changed, status, field", [
    (dict(key="a b"), Status.INVALID_IDEMPOTENCY_KEY, "idempotency_key"),
    (dict(wallet="~settlement:CNY:3"), Status.INVALID_WALLET_ID, "wallet_id"),
    (dict(amount_minor=-5), Status.INVALID_AMOUNT, "amount_minor"),
    (dict(currency_code="RMB1"), Status.INVALID_CURRENCY, "currency"),
    (dict(memo_text="m" * 257), Status.INVALID_ARGUMENT, "memo"),
    (dict(wallet="", amount_minor=0), Status.INVALID_WALLET_ID, "wallet_id"),
])
def test_a_bad_deposit_or_withdrawal_names_its_first_bad_field(changed, status, field):
    assert_refused(validate.movement(**{**GOOD_MOVEMENT, **changed}), status, field)
