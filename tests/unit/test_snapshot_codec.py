"""Snapshot encoding (format 2): exact, deterministic, compressed, and loud when damaged."""

from __future__ import annotations

import json

import pytest

from ledger.core import codec
from ledger.core.model import CreateHold, CreateWallet, Post, settlement_wallet_id
from ledger.core.shard import ShardState
from ledger.core.step import step


def run(state: ShardState, command) -> None:
    outcome = step(state, [command]).outcomes[0]
    assert outcome.ok, outcome


def busy_state(transfers: int = 3_000) -> ShardState:
    s = ShardState(3)
    for i in range(50):
        run(s, CreateWallet("svc", f"c{i}", f"w{i}", "CNY", False, 1))
        run(s, Post("svc", f"d{i}", f"td{i}", "DEPOSIT", settlement_wallet_id("CNY", 3), f"w{i}",
                    10**6, "CNY", "", 3, 1))
    for i in range(transfers):
        # Same-shard and cross-shard (outbox) transfers, with memos JSON must escape.
        run(s, Post("svc", f"k{i}", f"t{i}", "TRANSFER", f"w{i % 50}", f"w{(i + 1) % 50}"
                    if i % 3 else f"far{i}", 1 + i % 7, "CNY", 'red "envelope"\n\u7ea2', 3
                    if i % 3 else 9, 2 + i))
    run(s, CreateHold("svc", "h", "h1", "w1", 10, "CNY", 60_000, 5))
    s.seq = 4242
    return s


def fields(s: ShardState) -> dict:
    return {name: getattr(s, name) for name in ShardState.__slots__}


def test_a_snapshot_round_trips_exactly_and_deterministically():
    s = busy_state()
    data = codec.snapshot_dumps(s)
    restored = codec.snapshot_loads(data)
    assert fields(restored) == fields(s)
    assert codec.snapshot_dumps(restored) == data  # same state, same bytes
    assert codec.snapshot_dumps(busy_state()) == data


def test_a_snapshot_is_compressed_and_in_lines_of_bounded_size():
    s = busy_state()
    data = codec.snapshot_dumps(s)
    lines = list(codec.snapshot_lines(s))
    raw = sum(len(line) for line in lines)
    assert len(data) * 5 < raw
    assert json.loads(lines[0]) == {"format": codec.SNAPSHOT_FORMAT, "shard": 3, "seq": 4242}
    for line in lines[1:-1]:
        assert len(json.loads(line)[1]) <= codec.SNAPSHOT_RECORDS_PER_LINE


@pytest.mark.parametrize("cut", [1, 100, 0.5, -1])
def test_a_cut_off_snapshot_fails_loudly(cut):
    data = codec.snapshot_dumps(busy_state())
    end = int(len(data) * cut) if isinstance(cut, float) else (
        len(codec._SNAPSHOT_MAGIC) + cut if cut > 0 else len(data) + cut)
    with pytest.raises(ValueError):
        codec.snapshot_loads(data[:end])


def test_a_snapshot_whose_counts_disagree_with_its_trailer_is_refused():
    import zlib
    s = busy_state(10)
    lines = list(codec.snapshot_lines(s))
    damaged = lines[:2] + lines[3:]  # a records line lost
    data = codec._SNAPSHOT_MAGIC + zlib.compress(b"".join(damaged))
    with pytest.raises(ValueError, match="disagree"):
        codec.snapshot_loads(data)


def test_format_1_snapshots_are_still_read():
    s = ShardState(1)
    run(s, CreateWallet("svc", "c", "alice", "CNY", False, 1))
    run(s, Post("svc", "d", "td", "DEPOSIT", settlement_wallet_id("CNY", 1), "alice", 50, "CNY",
                "", 1, 1))
    s.seq = 2
    old = json.dumps({
        "v": 1, "shard": 1, "seq": 2, "wallets": list(s.wallets.values()),
        "transfers": list(s.transfers.values()), "idempotency": list(s.idempotency.values()),
        "outbox": [], "outbox_last_seq": [], "inbox_applied": [], "holds": [], "claims": [],
        "chains": []}, default=codec._default).encode()
    restored = codec.snapshot_loads(old)
    assert restored.wallets == s.wallets and restored.idempotency == s.idempotency
