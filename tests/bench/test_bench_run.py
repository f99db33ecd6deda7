"""One short ``ledger-bench`` run on the embedded default, end to end: the JSON has every row
and field, and the figures are plausible (something committed, CPU and store work measured).
No timing thresholds: this checks that the bench measures, not how fast the ledger is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

# The whole run (setup, two 2 s workloads, the naive baseline, stop), at most (s).
BENCH_TIMEOUT_S = 240


def test_embedded_bench_json_has_costs_per_transfer() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clients.bench", "--backend", "embedded", "--seconds", "2",
         "--wallets", "200", "--workloads", "batch,hot-out", "--json"],
        capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {r["workload"]: r for r in report["results"]}
    assert list(rows) == ["batch", "hot-out", "naive sqlite"]
    for row in rows.values():
        for key in ("workload", "per_s", "p50_ms", "p99_ms", "x_naive", "committed"):
            assert key in row, (row["workload"], key)
        assert row["committed"] > 0 and row["per_s"] > 0
    for name in ("batch", "hot-out"):
        row = rows[name]
        assert row["cpu_us_per_transfer"] > 0, row
        assert row["appends_per_transfer"] > 0, row
        assert row["rows_per_transfer"] > 0, row
        assert row["statements_per_transfer"] > 0, row
        assert row["lwt_per_transfer"] == 0, row  # the embedded store has none
        assert 0 < row["store_cpu_share"] < 1, row
        # The ledger's own count of committed transfers: the bench's, less any answered as
        # replays to a retried call (none on a quiet machine; the client retries transients).
        assert 0 < row["server_committed"] <= row["committed"], row
        assert row["refusals"] == {}, row
        series = report["series"][name]
        assert sum(s["committed"] for s in series) == row["committed"]
