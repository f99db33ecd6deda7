"""One data directory, one port, one server (issue 7, defect 10).

gRPC sets SO_REUSEPORT by default, so a second ``ledgerd dev`` bound the same port and two
processes believed they owned every shard of one SQLite journal. A second server on a taken
port, or on a data directory another process serves, must refuse to start and say why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import LedgerClient
from ledger import server
from ledger.cli.ledgerd import EXIT_REFUSED

SHARDS = 8
LEDGERD = str(Path(sys.executable).parent / "ledgerd")
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _still_serves(port: int) -> None:
    async with LedgerClient(f"127.0.0.1:{port}", caller="single", retries=False) as client:
        await client.create_wallet("still-here", "CNY", idempotency_key="still-here")
        assert (await client.get_wallet("still-here")).wallet_id == "still-here"


async def test_second_server_on_a_taken_port_refuses(tmp_path):
    first = await server.start_dev(tmp_path / "a", port=0, shard_count=SHARDS)
    try:
        with pytest.raises(server.PortInUse) as refused:
            second = await server.start_dev(tmp_path / "b", port=first.port,
                                            shard_count=SHARDS)
            await second.close(grace_s=0)  # only reached when the defect is back
        message = str(refused.value)
        assert f"127.0.0.1:{first.port}" in message and "already in use" in message, message
        await _still_serves(first.port)
        # The refused start left nothing behind: its data directory is free again.
        other = await server.start_dev(tmp_path / "b", port=0, shard_count=SHARDS)
        await other.close(grace_s=0)
    finally:
        await first.close(grace_s=0.5)


async def test_second_dev_server_on_a_locked_data_dir_refuses(tmp_path):
    first = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    try:
        with pytest.raises(server.DataDirLocked) as refused:
            second = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
            await second.close(grace_s=0)  # only reached when the defect is back
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {os.getpid()}" in message, message
        await _still_serves(first.port)
    finally:
        await first.close(grace_s=0.5)
    # Closing the first releases the directory.
    again = await server.start_dev(tmp_path, port=0, shard_count=SHARDS)
    await again.close(grace_s=0.5)


def _ledgerd(port: int, data_dir: Path) -> list[str]:
    return [LEDGERD, "dev", "--port", str(port), "--data-dir", str(data_dir), "--shards",
            str(SHARDS), "--log-level", "WARNING",
            # No /metrics: tests run beside other ledgerd processes on the default port.
            "--metrics-port", "0"]


def _wait_serving(port: int, proc: subprocess.Popen) -> None:
    """Block until the server's health service says SERVING (a watch, not a poll loop)."""
    # Reconnect quickly while the process is starting (the default backoff grows to minutes).
    options = [("grpc.initial_reconnect_backoff_ms", 100),
               ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for answer in stub.Watch(health_pb2.HealthCheckRequest(service=""),
                                     wait_for_ready=True, timeout=STARTUP_TIMEOUT_S):
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise AssertionError(f"ledgerd on {port} never served (exit code {proc.poll()}): "
                                 f"{exc.code().name}") from exc
    raise AssertionError(f"ledgerd on {port} ended its health watch without serving")


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def _refused(port: int, data_dir: Path) -> subprocess.CompletedProcess:
    """Run a second ledgerd; it must exit by itself (a server that starts hangs: timeout)."""
    try:
        return subprocess.run(_ledgerd(port, data_dir), capture_output=True, text=True,
                              timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"a second ledgerd on port {port}, {data_dir} kept running "
                             f"instead of refusing to start") from exc


@pytest.mark.timeout(300)
def test_second_ledgerd_dev_refuses_with_a_clear_message(tmp_path):
    data_dir, other_dir = tmp_path / "data", tmp_path / "other"
    port, other_port = free_port(), free_port()
    first = subprocess.Popen(_ledgerd(port, data_dir), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_serving(port, first)

        same_port = _refused(port, other_dir)
        assert same_port.returncode == EXIT_REFUSED, same_port
        assert f"127.0.0.1:{port}" in same_port.stderr, same_port.stderr
        assert "already in use" in same_port.stderr, same_port.stderr
        assert "Traceback" not in same_port.stderr, same_port.stderr

        same_dir = _refused(other_port, data_dir)
        assert same_dir.returncode == EXIT_REFUSED, same_dir
        assert f"data directory {data_dir} is in use" in same_dir.stderr, same_dir.stderr
        assert f"pid {first.pid}" in same_dir.stderr, same_dir.stderr
        assert "Traceback" not in same_dir.stderr, same_dir.stderr

        assert _serving(port)  # the first one is untouched
    finally:
        # A crash (SIGKILL) must release the data directory and the port by itself.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    restarted = subprocess.Popen(_ledgerd(port, data_dir), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    try:
        _wait_serving(port, restarted)
    finally:
        restarted.send_signal(signal.SIGTERM)
        _, stderr = restarted.communicate(timeout=30)
    assert restarted.returncode == 0, stderr
