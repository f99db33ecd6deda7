"""``ledgerctl top``: one frame of the live view from a running ledger's ``/metrics`` (a real
scrape, a subprocess), the rates it derives from two scrapes, and a clear exit when no
endpoint answers."""

from __future__ import annotations

import asyncio
import sys

import grpc
from prometheus_client import start_http_server
from rich.console import Console

from ledger import server
from ledger.cli import top
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc

SHARDS = 4


async def ledgerctl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli.ledgerctl", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_one_frame_of_a_running_ledger(tmp_path):
    running = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    httpd, thread = start_http_server(0, addr="127.0.0.1")
    url = f"http://127.0.0.1:{httpd.server_port}/metrics"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.LedgerServiceStub(ch)
            await stub.CreateWallet(pb.CreateWalletRequest(idempotency_key="w", wallet_id="tw",
                                                           currency="CNY"))
        views, down = await asyncio.to_thread(top.scrape_all, [url])
        assert not down and views["dev"].region == "dev" and views["dev"].shards == SHARDS
        assert views["dev"].commands > 0 and views["dev"].calls >= 1
        code, out = await ledgerctl("top", "--metrics", url, "--once", "--interval", "0.2")
        assert code == 0, out
        row = next(line for line in out.splitlines() if " dev " in line)
        assert f" {SHARDS} " in row
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
        await running.close()


def test_rates_come_from_two_scrapes_and_a_restart_shows_none():
    before = {"n1": top.NodeView("n1", "r1", 8, commands=100, appends=10, append_s=0.05,
                                 calls=50)}
    after = {"n1": top.NodeView("n1", "r1", 8, commands=300, appends=30, append_s=0.15,
                                calls=90, owed=3, lag_s=0.4)}
    console = Console(width=200, record=True)
    console.print(top.frame(before, after, 2.0, [], before))
    row = next(line for line in console.export_text().splitlines() if "n1" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    # shards, cmds/s, appends/s, cmds/append, append ms, calls/s, failed/s, queued, owed,
    # oldest owed s, takeovers, store errors
    assert cells[:2] == ["r1", "n1"]
    assert [float(c.replace(",", "")) for c in cells[2:12]] == [
        8, 100, 10, 10, 5.0, 20, 0, 0, 3, 0.4]
    restarted = {"n1": top.NodeView("n1", "r1", 8, commands=5, appends=1, append_s=0.01)}
    console = Console(width=200, record=True)
    console.print(top.frame(after, restarted, 2.0, [], after))
    row = next(line for line in console.export_text().splitlines() if "n1" in line)
    assert [c.strip() for c in row.split("│") if c.strip()][3:5] == ["-", "-"]


async def test_no_endpoint_answering_exits_1():
    code, out = await ledgerctl("top", "--metrics", "http://127.0.0.1:9/metrics", "--once")
    assert code == 1 and "no metrics endpoint answered" in out
