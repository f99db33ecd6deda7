"""The row rules both stores share (``ledger.store.rows``): positions, and which row of a key
wins (the highest position, and among equal positions the last), with no store at all."""

from __future__ import annotations

import pytest

from ledger.core.model import Entry, Envelope, Grab, IdempotencyRecord, Transfer, Wallet
from ledger.store.rows import (ENTRY_COLS, ENVELOPE_COLS, GRAB_COLS, TRANSFER_COLS,
                               WALLET_COLS, KeyedRows, last_of_each_key, latest_rows, rows_at)


def wallet(balance_minor: int, version: int) -> Wallet:
    return Wallet("w", "CNY", balance_minor=balance_minor, version=version)


def envelope(left_shares: int, envelope_id: str = "e") -> Envelope:
    return Envelope(envelope_id, "sender", "CNY", "LUCKY", 1000, 3, 1, "", "memo", 42, "c",
                    "k", "t-fund", 1_000, 2_000, funded_at_ms=1_001,
                    left_minor=100 * left_shares, left_shares=left_shares)


def grab(position: int, envelope_id: str = "e", amount_minor: int = 100) -> Grab:
    return Grab(envelope_id, position, f"r{position}", amount_minor, f"t-grab-{position}",
                "c", f"k{position}", 1_500 + position)


def test_rows_take_their_own_position_or_the_given_one():
    w = wallet(1, 1)
    assert rows_at([("wallet", w), ("wallet", w, 7)], 3) == [("wallet", w, 3), ("wallet", w, 7)]
    with pytest.raises(ValueError, match="journal position"):
        rows_at([("wallet", w)], None)


def test_the_highest_position_wins_whatever_the_order():
    old, new = wallet(100, 1), wallet(70, 2)
    latest = latest_rows([("wallet", new, 2), ("wallet", old, 1)])
    assert latest.wallets == {"w": (new, 2)}


def test_among_equal_positions_the_last_row_wins():
    first, last = wallet(100, 1), wallet(70, 2)
    assert latest_rows([("wallet", first, 5), ("wallet", last, 5)]).wallets == {"w": (last, 5)}


def test_keys_of_each_kind():
    e1 = Entry("w", 1, "t", "deposit", 5, 5, "", "CNY", 0)
    e2 = Entry("w", 2, "t", "deposit", 5, 10, "", "CNY", 0)
    t = Transfer("t", "deposit", "", "w", 5, "CNY", "", "c", "k", 0, "COMMITTED", 1, "", "",
                 True)
    latest = latest_rows([("entry", e1, 1), ("entry", e2, 1), ("transfer", t, 1)])
    assert set(latest.entries) == {("w", 1), ("w", 2)}
    assert latest.transfers == {"t": (t, 1)}
    assert latest and not latest_rows([])
    with pytest.raises(ValueError, match="unknown row kind"):
        latest_rows([("hold", t, 1)])  # type: ignore[list-item]


def test_envelopes_by_id_and_grabs_by_envelope_and_position():
    older, newer = envelope(3), envelope(2)
    other = envelope(3, "e2")
    latest = latest_rows([("envelope", newer, 5), ("envelope", older, 3), ("envelope", other, 3),
                          ("grab", grab(0), 3), ("grab", grab(1), 5), ("grab", grab(0, "e2"), 4)])
    # The envelope of the highest position wins, whatever the order (like a wallet).
    assert latest.envelopes == {"e": (newer, 5), "e2": (other, 3)}
    assert latest.grabs == {("e", 0): (grab(0), 3), ("e", 1): (grab(1), 5),
                            ("e2", 0): (grab(0, "e2"), 4)}
    assert latest_rows([("grab", grab(0), 1)])
    assert latest_rows([("envelope", older, 1)])
    # Among equal positions, the last.
    assert latest_rows([("envelope", older, 4), ("envelope", newer, 4)]).envelopes == {
        "e": (newer, 4)}


def test_last_of_each_key_keeps_every_kind():
    w1, w2 = wallet(1, 1), wallet(2, 2)
    e1 = Entry("w", 1, "t", "deposit", 5, 5, "", "CNY", 0)
    t = Transfer("t", "deposit", "", "w", 5, "CNY", "", "c", "k", 0)
    record = IdempotencyRecord("c", "k", "transfer:t", (), 0)
    keyed = last_of_each_key([("wallet", w1), ("entry", e1), ("transfer", t),
                              ("envelope", envelope(3)), ("grab", grab(0)),
                              ("wallet", w2), ("envelope", envelope(2)), ("grab", grab(1)),
                              ("idem", record)])  # type: ignore[list-item]
    assert isinstance(keyed, KeyedRows)
    assert keyed.wallets == {"w": w2}
    assert keyed.entries == [e1]
    assert keyed.transfers == {"t": t}
    assert keyed.envelopes == {"e": envelope(2)}
    assert keyed.grabs == {("e", 0): grab(0), ("e", 1): grab(1)}
    assert keyed.keys == [("idem", record)]
    assert keyed.size() == 7
    assert last_of_each_key([]).size() == 0
    with pytest.raises(ValueError, match="unknown row kind"):
        last_of_each_key([("hold", t)])  # type: ignore[list-item]


def test_columns_follow_the_model_fields():
    # A read rebuilds a row as ``Model(*columns)``: the orders must match.
    for cols, model in ((WALLET_COLS, Wallet), (ENTRY_COLS, Entry),
                        (TRANSFER_COLS, Transfer)):
        assert cols == tuple(model.__dataclass_fields__)[:len(cols)], model
    # Envelopes and grabs: every field is a column, in order.
    for cols, model in ((ENVELOPE_COLS, Envelope), (GRAB_COLS, Grab)):
        assert cols == tuple(model.__dataclass_fields__), model
