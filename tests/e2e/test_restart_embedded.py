"""``ledgerd dev`` keeps everything across restarts: a clean stop (snapshot) and a SIGKILL
(journal replay) both come back with the same balances and history."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from clients import LedgerClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ledgerd(data_dir, port) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", str(port), "--data-dir",
         str(data_dir), "--shards", "32", "--log-level", "WARNING",
         # No /metrics: tests run beside other ledgerd processes on the default port.
         "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()  # printed once every shard is served
    assert "serving ledger.v1" in line, line
    return proc


async def balances_and_history(client, wallets):
    return {w: ((await client.get_wallet(w)).balance_minor,
                [(e.version, e.amount_minor) for e in await client.all_entries(w)])
            for w in wallets}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "kill"])
async def test_restart_keeps_balances_and_history(tmp_path, stop_signal):
    port = free_port()
    proc = start_ledgerd(tmp_path, port)
    wallets = [f"rw-{i}" for i in range(6)]
    try:
        async with LedgerClient(f"127.0.0.1:{port}", caller="restart") as client:
            for w in wallets:
                await client.create_wallet(w, "CNY")
                await client.deposit(w, 1_000, "CNY")
            for i in range(20):
                await client.transfer(wallets[i % 6], wallets[(i + 1) % 6], 7 + i, "CNY",
                                      idempotency_key=f"k-{i}")
            before = await balances_and_history(client, wallets)
    finally:
        proc.send_signal(stop_signal)
        proc.wait(timeout=30)
    proc = start_ledgerd(tmp_path, port)
    try:
        async with LedgerClient(f"127.0.0.1:{port}", caller="restart") as client:
            assert await balances_and_history(client, wallets) == before
            # The idempotency keys survived too: a retry replays, money moves once.
            again = await client.transfer(wallets[0], wallets[1], 7, "CNY", idempotency_key="k-0")
            assert again.replayed
            assert await balances_and_history(client, wallets) == before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # The server has exited; nothing else runs on the loop.
    assert os.path.exists(tmp_path / "ledger.sqlite3")  # noqa: ASYNC240
