"""The row rules both stores share (``ledger.store.rows``): positions, and which row of a key
wins (the highest position, and among equal positions the last), with no store at all."""

from __future__ import annotations

import pytest

from ledger.core.model import Entry, Transfer, Wallet
from ledger.store.rows import (ENTRY_COLS, TRANSFER_COLS, WALLET_COLS, latest_rows, rows_at)


def wallet(balance_minor: int, version: int) -> Wallet:
    return Wallet("w", "CNY", balance_minor=balance_minor, version=version)


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


def test_columns_follow_the_model_fields():
    # A read rebuilds a row as ``Model(*columns)``: the orders must match.
    for cols, model in ((WALLET_COLS, Wallet), (ENTRY_COLS, Entry),
                        (TRANSFER_COLS, Transfer)):
        assert cols == tuple(model.__dataclass_fields__)[:len(cols)], model
