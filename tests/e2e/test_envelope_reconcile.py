"""``ledgerctl reconcile`` and ``ledgerctl envelope show`` on red envelopes: clean books are
clean (headroom grants included), a share journaled without its money (a forged grab) is
named, and so is a headroom grant noted by a debit shard that its credit shard never gave.

Real commands (subprocesses) against a store written by a real ``ledgerd dev``-style server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from coordinator.envelopes import GrabItem
from ledger import server
from ledger.core.model import EnvelopeGrabbed, Grab, HeadroomNoted, escrow_wallet_id
from shard_router import shard_of
from tests.e2e.test_reconcile import POLL_S, append_raw, replayed, run_reconcile

SHARDS = 8
CREDITED_DEADLINE_S = 30.0
RECEIVERS = [f"r{i}" for i in range(3)]


def envelope_show(data_dir, envelope_id: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "ledger.cli.ledgerctl", "envelope", "show",
                           envelope_id, "--data-dir", str(data_dir), "--shards", str(SHARDS),
                           "--json"], capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}


@pytest.fixture
async def ledger_dir(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    c = running.coordinator
    for w in ["alice", *RECEIVERS, "late"]:
        assert (await c.create_wallet("fin", "w-" + w, w, "CNY")).ok
    assert (await c.deposit("fin", "d-alice", "alice", 5_000, "CNY")).ok
    made = await running.envelopes.create("fin", "env-1", "alice", 1_000, 5, "LUCKY", "CNY",
                                          3_600_000, "hny")
    assert made.ok, made
    envelope_id = made.value[0].envelope_id
    grabs = await running.envelopes.grab_many("fin", [GrabItem("g-" + r, envelope_id, r)
                                                      for r in RECEIVERS])
    assert all(g.ok for g in grabs), grabs
    pending = {g.value[0].transfer_id for g in grabs}
    deadline = time.monotonic() + CREDITED_DEADLINE_S
    while pending:
        for tid in list(pending):
            if (await c.get_transfer(tid)).value.credited:
                pending.discard(tid)
        assert time.monotonic() < deadline, f"credits not landed: {sorted(pending)}"
        if pending:
            await asyncio.sleep(POLL_S)
    await running.close()
    return tmp_path, envelope_id, [g.value[0] for g in grabs]


async def test_clean_envelope_books_and_show(ledger_dir):
    data_dir, envelope_id, grabs = ledger_dir
    code, report = run_reconcile(data_dir)
    assert code == 0 and report["clean"], report["findings"]
    assert report["checks"]["envelopes"] == report["checks"]["headroom_grants"] == 0
    assert (report["envelopes"], report["grabs"]) == (1, 3)
    grabbed = sum(g.amount_minor for g in grabs)
    assert report["envelope_minor"] == {"grabbed": grabbed, "refunded": 0,
                                        "left": 1_000 - grabbed}
    code, doc = envelope_show(data_dir, envelope_id)
    assert code == 0 and doc["problems"] == []
    assert doc["state"] == "ACTIVE" and doc["source"] == "journal"
    assert doc["escrow_minor"] == 1_000 - grabbed == doc["envelope"]["left_minor"]
    assert [(g["position"], g["receiver_wallet_id"], g["amount_minor"], g["credit"])
            for g in doc["grabs"]] == [(g.position, g.receiver_wallet_id, g.amount_minor,
                                        "credited") for g in grabs]
    assert doc["luckiest"]["amount_minor"] == max(g.amount_minor for g in grabs)
    assert envelope_show(data_dir, "e" + "0" * 24)[0] == 1


async def test_share_journaled_without_its_money_is_named(ledger_dir):
    data_dir, envelope_id, grabs = ledger_dir
    path = data_dir / "ledger.sqlite3"
    shard = shard_of(escrow_wallet_id(envelope_id), SHARDS)
    envelope = replayed(path, shard).envelopes[envelope_id]
    # The next share, within the split's rules, but without the TransferDecided that moves
    # its money out of the escrow: the envelope and its escrow now disagree.
    forged = Grab(envelope_id, envelope.shares - envelope.left_shares, "late", 1, "t-forged",
                  "fin", "forged", envelope.created_at_ms + 1)
    append_raw(path, shard, [EnvelopeGrabbed(forged)])
    code, report = run_reconcile(data_dir)
    assert code == 1
    assert ("envelopes", envelope_id) in [(f["check"], f["subject"])
                                          for f in report["findings"]]
    code, doc = envelope_show(data_dir, envelope_id)
    assert code == 1 and any("escrow holds" in p for p in doc["problems"])


async def test_a_grant_noted_but_never_given_is_named(ledger_dir):
    data_dir, envelope_id, grabs = ledger_dir
    path = data_dir / "ledger.sqlite3"
    # The grabs' credits went to other shards under grants the envelope's shard noted.
    debit = shard_of(escrow_wallet_id(envelope_id), SHARDS)
    state = replayed(path, debit)
    assert state.headroom_used, "the grabs were owed under headroom grants"
    # A grant from a shard read after this one, larger than that shard ever gave.
    if debit == SHARDS - 1:  # the envelope's shard is read last: note one on shard 0 instead
        debit = 0
        state = replayed(path, debit)
    credit = debit + 1
    total = max(state.headroom_in.get(credit, 0), replayed(path, credit).grants_out.get(
        debit, 0)) + 5
    append_raw(path, debit, [HeadroomNoted(credit, total)])
    code, report = run_reconcile(data_dir)
    assert code == 1
    assert ("headroom_grants", debit, f"shard {credit}") in [
        (f["check"], f["shard"], f["subject"]) for f in report["findings"]]
