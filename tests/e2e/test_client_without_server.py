"""A program that only calls the ledger installs the client distribution alone.

In a virtualenv of its own, ``pip install clients/python`` (redledger-client: the client
library and the generated stubs) brings none of the server: the Cassandra driver, the etcd
client and the server's packages cannot be imported there. A small program run in that
virtualenv, isolated from this checkout (``python -I``, no PYTHONPATH), creates two wallets
and moves money against a ``ledgerd dev`` server started by the test.

The virtualenv is cached under ``~/.cache/redledger/client-venv/<hash>`` (never in the
repository), keyed by the interpreter version and the contents of ``clients/python``: a run
whose inputs did not change reuses it (a fresh build takes a pip install from the package
index or pip's cache, about half a minute).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIST = REPO / "clients" / "python"
CACHE_DIR = Path.home() / ".cache" / "redledger" / "client-venv"
# Files under clients/python that are build output, not inputs of the installed distribution.
_NOT_INPUTS = ("__pycache__", ".egg-info", "build")
# pip install of the client distribution into a fresh virtualenv, at most (s).
INSTALL_TIMEOUT_S = 600
# ledgerd dev printing its address, at most (s).
SERVER_START_TIMEOUT_S = 120
# The client program, at most (s).
PROGRAM_TIMEOUT_S = 120
# A cached virtualenv no run has used for this long is deleted (about 50 MB each; every change
# of the client's files makes a new one).
UNUSED_VENV_S_MAX = 7 * 24 * 3600

# Top-level modules the client virtualenv must not have: the server's dependencies and
# packages. Those it must have: the library, the stubs and their dependencies.
ABSENT = ("cassandra", "pyetcd", "etcd3", "ledger", "coordinator", "shard_router", "clients")
PRESENT = ("redledger_client", "ledgerpb", "grpc", "google.protobuf", "tenacity")

FIND_MODULES = """
import importlib.util, json, sys
print(json.dumps({name: importlib.util.find_spec(name) is not None for name in sys.argv[1:]}))
"""

LIST_DISTRIBUTIONS = """
import importlib.metadata, json
print(json.dumps(sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())))
"""
# Distributions of the server that must not come with the client.
SERVER_DISTRIBUTIONS = {"redledger", "cassandra-driver", "etcd-sdk-python",
                        "grpcio-health-checking", "grpcio-reflection"}

CLIENT_PROGRAM = """
import asyncio, json, sys
from redledger_client import LedgerClient, LedgerRefused

async def main(target):
    async with LedgerClient(target, caller="client-only") as ledger:
        await ledger.create_wallet("alice", "CNY")
        await ledger.create_wallet("bob", "CNY")
        await ledger.deposit("alice", 10_000, "CNY", idempotency_key="dep-1")
        moved = await ledger.transfer("alice", "bob", 2_500, "CNY", idempotency_key="tx-1")
        again = await ledger.transfer("alice", "bob", 2_500, "CNY", idempotency_key="tx-1")
        try:
            await ledger.transfer("alice", "bob", 1_000_000, "CNY")
            refused = ""
        except LedgerRefused as exc:
            refused = exc.status
        alice, bob = await ledger.get_wallet("alice"), await ledger.get_wallet("bob")
        print(json.dumps({"transfer_id": moved.transfer.transfer_id,
                          "replayed": again.replayed, "refused": refused,
                          "alice": alice.balance_minor, "bob": bob.balance_minor}))

asyncio.run(main(sys.argv[1]))
"""


def _inputs_hash() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in sorted(CLIENT_DIST.rglob("*")):
        relative = path.relative_to(CLIENT_DIST)
        if path.is_dir() or any(p.endswith(_NOT_INPUTS) for p in relative.parts):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _isolated_env() -> dict[str, str]:
    """The environment of a program outside this checkout: no PYTHONPATH, no virtualenv."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
            "LANG": "C.UTF-8"}


def client_venv() -> Path:
    """The cached virtualenv holding only redledger-client, built if its inputs changed."""
    venv = CACHE_DIR / _inputs_hash()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Concurrent test runs (other checkouts) build one virtualenv at a time.
    with open(CACHE_DIR / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete = venv / ".complete"
        if complete.exists():
            complete.touch()  # marks it used, see _prune
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       env=_isolated_env(), timeout=INSTALL_TIMEOUT_S)
        # Install from a copy: setuptools writes build output next to the sources it builds.
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "redledger-client"
            shutil.copytree(CLIENT_DIST, source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", str(source)],
                           check=True, env=_isolated_env(), timeout=INSTALL_TIMEOUT_S)
        complete.touch()
    _prune(keep=venv)
    return venv


def _prune(keep: Path) -> None:
    """Delete cached virtualenvs that no run has used for ``UNUSED_VENV_S_MAX``."""
    now_s = time.time()
    for marker in CACHE_DIR.glob("*/.complete"):
        venv = marker.parent
        if venv != keep and now_s - marker.stat().st_mtime > UNUSED_VENV_S_MAX:
            shutil.rmtree(venv, ignore_errors=True)
            (CACHE_DIR / f"{venv.name}.lock").unlink(missing_ok=True)


def _run_isolated(venv: Path, code: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", code, *args],
                            cwd=cwd, env=_isolated_env(), capture_output=True, text=True,
                            timeout=PROGRAM_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _start_ledgerd_dev(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger.cli.ledgerd", "dev", "--port", "0", "--shards", "4",
        "--data-dir", str(data_dir),
        # No /metrics: tests run beside other ledgerd processes on the default port.
        "--metrics-port", "0", stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(process.stdout.readline(), SERVER_START_TIMEOUT_S)
    match = re.search(rb"serving ledger\.v1 on (\S+):(\d+)", line)
    assert match, line
    return process, f"{match.group(1).decode()}:{match.group(2).decode()}"


async def test_a_client_program_needs_only_the_client_distribution(tmp_path):
    venv = await asyncio.to_thread(client_venv)
    found = json.loads(await asyncio.to_thread(
        _run_isolated, venv, FIND_MODULES, *ABSENT, *PRESENT, cwd=tmp_path))
    assert {name for name in ABSENT if found[name]} == set()
    assert {name for name in PRESENT if not found[name]} == set()
    installed = set(json.loads(await asyncio.to_thread(
        _run_isolated, venv, LIST_DISTRIBUTIONS, cwd=tmp_path)))
    assert "redledger-client" in installed and not installed & SERVER_DISTRIBUTIONS

    process, target = await _start_ledgerd_dev(tmp_path / "data")
    try:
        output = await asyncio.to_thread(_run_isolated, venv, CLIENT_PROGRAM, target,
                                         cwd=tmp_path)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), SERVER_START_TIMEOUT_S)
    result = json.loads(output)
    assert result["alice"] == 7_500 and result["bob"] == 2_500
    assert result["replayed"] is True and result["transfer_id"]
    assert result["refused"] == "RESULT_STATUS_INSUFFICIENT_FUNDS"
