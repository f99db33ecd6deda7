"""``ledger-bench`` red-envelope workloads end to end on the embedded default, tiny sizes:
every row is there with its fields and its correctness verdict true, and the bench exits 0.
No timing thresholds: this checks that the bench measures and checks, not how fast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

# The whole run (setup, the four workloads, stop), at most (s).
BENCH_TIMEOUT_S = 240
RECEIVERS = 120
UNARY_RECEIVERS = 40
NYE_ENVELOPES = 8
NYE_SHARES = 5


def test_embedded_envelope_workloads_rows_and_verdicts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clients.bench", "--backend", "embedded", "--seconds", "5",
         "--workloads", "hot-envelope,hot-envelope-unary,nye,naive-envelope",
         "--envelope-receivers", str(RECEIVERS), "--unary-receivers", str(UNARY_RECEIVERS),
         "--nye-envelopes", str(NYE_ENVELOPES), "--nye-shares", str(NYE_SHARES),
         "--grab-batch", "25", "--clients", "8", "--shards", "16", "--json"],
        capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {r["workload"]: r for r in report["results"]}
    # No transfer workload: no transfer baseline either.
    assert list(rows) == ["hot-envelope", "hot-envelope-unary", "nye",
                          "naive-envelope sqlite"]
    expected = {"hot-envelope": (1, RECEIVERS), "hot-envelope-unary": (1, UNARY_RECEIVERS),
                "nye": (NYE_ENVELOPES, NYE_ENVELOPES * NYE_SHARES),
                "naive-envelope sqlite": (1, RECEIVERS)}
    for name, row in rows.items():
        envelopes, grabs = expected[name]
        assert row["family"] == "envelope", row
        for key in ("per_s", "p50_ms", "p99_ms", "x_naive", "credited_s", "credits_per_s",
                    "correct", "check", "grabs", "envelopes"):
            assert key in row, (name, key)
        assert row["correct"] is True, row
        assert row["refusals"] == {}, row
        assert row["grabs"] == row["committed"] == grabs, row
        assert row["envelopes"] == envelopes, row
        assert row["credited_s"] > 0 and row["per_s"] > 0, row
        assert row["x_naive"] > 0, row
    assert rows["naive-envelope sqlite"]["x_naive"] == 1.0
    for name in ("hot-envelope", "hot-envelope-unary", "nye"):
        row = rows[name]
        # Every grab is credited no earlier than it was answered.
        assert row["credited_s"] >= row["seconds"], row
        assert 0 < row["credit_probes"] <= row["grabs"], row
        assert row["credit_polls"] >= row["credit_probes"], row
        assert row["credit_check"] == "last grab per (envelope, receiver shard)", row
        assert row["cpu_us_per_grab"] is not None and row["cpu_us_per_grab"] >= 0, row
        assert row["appends_per_transfer"] > 0, row
        assert sum(s["committed"] for s in report["series"][name]) == row["grabs"]
    # One receiver shard's grabs of one envelope need one probe: at most one per shard.
    assert rows["hot-envelope"]["credit_probes"] <= 16
    assert rows["nye"]["created_per_s"] > 0
