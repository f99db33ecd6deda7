"""``ledgerctl audit verify`` and ``ledgerctl audit show`` as operators run them (subprocesses)
against the embedded store a real ledger wrote: a clean store verifies (exit 0, every shard's
head in ``--json``), a record altered behind the ledger's back is named by shard and batch
(exit 1), anchored heads given back with ``--expect`` catch a deleted tail, and ``show``
filters by wallet, principal and time."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from ledger import server

SHARDS = 8


def ledgerctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger.cli.ledgerctl", "audit", *args,
                           "--shards", str(SHARDS)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
async def ledger_dir(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    c = running.coordinator
    for i in range(4):
        await c.create_wallet("fin", f"w{i}", f"w{i}", "CNY")
        await c.deposit("fin", f"d{i}", f"w{i}", 1_000, "CNY")
    from coordinator import TransferItem
    outcomes = await c.batch_transfer("fin", [TransferItem(
        f"t{i}", f"w{i % 4}", f"w{(i + 1) % 4}", 10 + i, "CNY") for i in range(8)])
    outcomes.append(await c.withdraw("ops", "wd", "w0", 5, "CNY"))
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    await running.close()
    return tmp_path


def rows_of(path) -> list[tuple[int, int, bytes]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute("SELECT shard, seq, records FROM audit ORDER BY shard, seq"))
    finally:
        db.close()


async def test_a_clean_store_verifies_and_prints_every_head(ledger_dir):
    proc = ledgerctl("verify", "--data-dir", str(ledger_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["problems"] == []
    rows = rows_of(ledger_dir / "ledger.sqlite3")
    last = {}
    for shard, seq, _ in rows:
        last[shard] = seq
    assert {int(s): e["head"]["seq"] for s, e in report["shards"].items()
            if e["head"]["seq"]} == last
    assert sum(e["rows"] for e in report["shards"].values()) == len(rows)
    text = ledgerctl("verify", "--data-dir", str(ledger_dir))
    assert text.returncode == 0 and "RESULT: every audit chain is intact" in text.stdout


async def test_an_altered_record_is_named_with_its_shard_and_batch(ledger_dir):
    path = ledger_dir / "ledger.sqlite3"
    shard, seq, records = next(r for r in rows_of(path) if b'"Transfer"' in r[2])
    db = sqlite3.connect(path)
    db.execute("UPDATE audit SET records = ? WHERE shard = ? AND seq = ?",
               (records.replace(b'"Transfer"', b'"Deposit"', 1), shard, seq))
    db.commit()
    db.close()
    proc = ledgerctl("verify", "--data-dir", str(ledger_dir), "--json")
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert [(p["shard"], p["seq"]) for p in problems] == [(shard, seq)]
    assert "hash mismatch" in problems[0]["what"]
    text = ledgerctl("verify", "--data-dir", str(ledger_dir))
    assert text.returncode == 1 and f"PROBLEM shard {shard} batch {seq}:" in text.stdout


async def test_anchored_heads_catch_a_deleted_tail(ledger_dir, tmp_path_factory):
    anchors = tmp_path_factory.mktemp("anchors") / "heads.json"
    proc = ledgerctl("verify", "--data-dir", str(ledger_dir), "--json")
    anchors.write_text(proc.stdout)
    again = ledgerctl("verify", "--data-dir", str(ledger_dir), "--expect", str(anchors))
    assert again.returncode == 0, again.stdout
    path = ledger_dir / "ledger.sqlite3"
    shard, seq, _ = rows_of(path)[-1]
    db = sqlite3.connect(path)
    db.execute("DELETE FROM audit WHERE shard = ? AND seq = ?", (shard, seq))
    db.commit()
    db.close()
    proc = ledgerctl("verify", "--data-dir", str(ledger_dir), "--expect", str(anchors),
                     "--json")
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert {(p["shard"], p["seq"]) for p in problems} == {(shard, seq)}
    whats = " / ".join(p["what"] for p in problems)
    assert "missing rows" in whats and "anchored head" in whats
    bad = ledgerctl("verify", "--data-dir", str(ledger_dir), "--expect", str(path))
    assert bad.returncode == 2 and "--expect" in bad.stderr


async def test_show_filters_by_wallet_principal_and_time(ledger_dir):
    def show(*args: str) -> list[dict]:
        proc = ledgerctl("show", "--data-dir", str(ledger_dir), "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    everything = show()
    assert {r["method"] for r in everything} >= {"CreateWallet", "Deposit", "Transfer",
                                                 "Withdraw"}
    w2 = show("--wallet", "w2")
    assert w2 and all("w2" in (r["from_wallet_id"], r["to_wallet_id"]) for r in w2)
    assert {"shard", "epoch", "seq", "at_ms", "request_hash"} <= set(w2[0])
    assert [r["method"] for r in show("--principal", "ops")] == ["Withdraw"]
    times = sorted(r["at_ms"] for r in everything)
    assert show("--since", str(times[-1] + 1)) == []
    assert len(show("--until", str(times[-1] + 1))) == len(everything)
    assert show("--until", "1970-01-01T00:00:01Z") == []
    assert len(show("--since", "1970-01-01T00:00:00+00:00")) == len(everything)
    text = ledgerctl("show", "--data-dir", str(ledger_dir), "--principal", "ops")
    assert text.returncode == 0 and "Withdraw by ops OK 5 CNY w0" in text.stdout
    bad = ledgerctl("show", "--data-dir", str(ledger_dir), "--since", "yesterday")
    assert bad.returncode == 2 and "not a time" in bad.stderr


async def test_every_owner_records_its_takeover_before_its_first_batch(ledger_dir):
    # The node started once: each shard that journaled anything begins its chain with the
    # takeover that made the node its owner (node:dev, its epoch, what it enforced).
    proc = ledgerctl("show", "--data-dir", str(ledger_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    first: dict[int, dict] = {}
    for r in records:
        first.setdefault(r["shard"], r)
    assert first and all(r["method"] == "TakeOver" for r in first.values()), first
    assert all(r["principal"] == "node:dev" and r["subject"] == "dev"
               and f"epoch {r['epoch']}" in r["detail"] for r in first.values())
    assert sum(r["method"] == "TakeOver" for r in records) == len(first)
    takeovers = ledgerctl("show", "--data-dir", str(ledger_dir), "--principal", "node:dev",
                          "--json")
    assert {r["method"] for r in json.loads(takeovers.stdout)} == {"TakeOver"}
