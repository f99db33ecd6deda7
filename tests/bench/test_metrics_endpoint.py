"""``ledgerd dev --metrics-port``: a real ledgerd process serves Prometheus counters that move
with the traffic it carries, names its store thread for per-thread CPU, and refuses to start
on a taken metrics port (rather than run unobserved)."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clients import LedgerClient
from clients.bench.probe import SQLITE_STORE_THREAD, parse_stat, scrape
from clients.bench.server import free_port

pytestmark = pytest.mark.timeout(180)

# ledgerd dev printing its serving line, at most (s).
SERVER_START_TIMEOUT_S = 120
SHARDS = 8
TRANSFERS = 20
# How long the rows of the last transfers may take to be written behind the journal (s).
ROWS_WRITTEN_TIMEOUT_S = 10.0


def _ledgerd_dev(data_dir: Path, metrics_port: int) -> list[str]:
    return [sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", "0", "--shards",
            str(SHARDS), "--data-dir", str(data_dir), "--log-level", "WARNING",
            "--metrics-port", str(metrics_port)]


def _thread_names(pid: int) -> set[str]:
    """The kernel's names of the threads of ``pid``."""
    return {parse_stat((task / "stat").read_text())[0]
            for task in Path(f"/proc/{pid}/task").iterdir()}


async def test_counters_move_under_traffic(tmp_path: Path) -> None:
    metrics_port = free_port()
    proc = await asyncio.create_subprocess_exec(*_ledgerd_dev(tmp_path, metrics_port),
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), SERVER_START_TIMEOUT_S)
        match = re.search(rb"serving ledger\.v1 on (\S+):(\d+)", line)
        assert match, line
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = await asyncio.to_thread(scrape, url)
        async with LedgerClient(f"127.0.0.1:{int(match.group(2))}", caller="t") as ledger:
            for w in ("m-a", "m-b"):
                await ledger.create_wallet(w, "CNY", idempotency_key="c-" + w)
            await ledger.deposit("m-a", 1_000, "CNY", idempotency_key="d-m-a")
            for i in range(TRANSFERS):
                await ledger.transfer("m-a", "m-b", 1, "CNY", idempotency_key=f"t{i}")
            # A retry is answered from the record: no new commit.
            await ledger.transfer("m-a", "m-b", 1, "CNY", idempotency_key="t0")
        # View rows are written behind the journal (at most ROWS_BEHIND_MS later): scrape
        # until none waits, so that the rows of these transfers are counted.
        deadline = asyncio.get_running_loop().time() + ROWS_WRITTEN_TIMEOUT_S
        after = await asyncio.to_thread(scrape, url)
        while after["ledger_store_rows_behind"] > 0:
            assert asyncio.get_running_loop().time() < deadline, after["ledger_store_rows_behind"]
            after = await asyncio.to_thread(scrape, url)
        moved = {k: after[k] - before.get(k, 0.0) for k in after}
        assert moved["ledger_transfers_committed_total"] == TRANSFERS
        for counter in ("ledger_store_appends_total", "ledger_store_rows_written_total",
                        "ledger_store_statements_total", "ledger_store_transactions_total"):
            assert moved[counter] > 0, counter
        # Every transfer's answer waited for an append that held it; appends are counted
        # once each, never more than the store calls carrying them.
        assert moved["ledger_store_appends_total"] <= moved["ledger_store_statements_total"]
        assert after["ledger_store_lwt_total"] == 0  # SQLite has no lightweight transactions
        # The process collector of prometheus_client comes with the endpoint.
        assert after["process_cpu_seconds_total"] > 0
        assert SQLITE_STORE_THREAD in _thread_names(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()


def test_taken_metrics_port_refuses_to_start(tmp_path: Path) -> None:
    from ledger.cli.ledgerd import EXIT_REFUSED

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(_ledgerd_dev(tmp_path, port), capture_output=True, text=True,
                              timeout=SERVER_START_TIMEOUT_S)
    assert done.returncode == EXIT_REFUSED, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "--metrics-port" in done.stderr
