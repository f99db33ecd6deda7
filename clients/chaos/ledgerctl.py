"""What a drill asks of the operator CLI, ``ledgerctl``, run as a subprocess.

A drill checks the ledger from the outside, as an operator would: the shard map through
etcd, the journals' writer epochs and fencing, and reconciliation, each through a
``ledgerctl`` command with ``--json`` output. Nothing here imports the ledger's code.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from clients.chaos.constants import LEDGERCTL_TIMEOUT_S, PROBE_CANDIDATES_PER_SHARD


class LedgerctlError(RuntimeError):
    """``ledgerctl`` could not answer: it failed, timed out, or printed no JSON."""


def _command(args: list[str]) -> list[str]:
    # The interpreter running the drill, so the same installation (and PYTHONPATH) serves.
    return [sys.executable, "-m", "ledger.cli.ledgerctl", *args]


async def run_json(args: list[str], timeout_s: float = LEDGERCTL_TIMEOUT_S,
                   ok_codes: tuple[int, ...] = (0, 1)) -> dict:
    """Run ``ledgerctl ARGS --json`` and return what it printed.

    Args:
        args: The subcommand and its flags (``--json`` is added).
        timeout_s: Deadline of the whole call; past it the process is killed.
        ok_codes: Exit codes whose output is a verdict rather than a failure (reconcile
            and journal exit 1 when they find something, and still print their report).

    Raises:
        LedgerctlError: another exit code, a timeout, or output that is not JSON.
    """
    return (await run_json_code(args, timeout_s, ok_codes))[1]


async def run_json_code(args: list[str], timeout_s: float = LEDGERCTL_TIMEOUT_S,
                        ok_codes: tuple[int, ...] = (0, 1)) -> tuple[int, dict]:
    """``run_json``, with the exit code: ``(code, what it printed)``."""
    proc = await asyncio.create_subprocess_exec(
        *_command([*args, "--json"]), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        raise LedgerctlError(f"ledgerctl {args[0]}: no answer within {timeout_s:.0f} s") from None
    finally:
        # Timed out, or the drill was cancelled: the call must not outlive it.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode("utf-8", "replace")
    code = proc.returncode
    assert code is not None  # communicate() returned: the process has exited
    if code not in ok_codes:
        raise LedgerctlError(f"ledgerctl {args[0]} exited {code}: "
                             f"{err.decode('utf-8', 'replace')[-2000:]}")
    try:
        return code, json.loads(text)
    except ValueError:
        raise LedgerctlError(f"ledgerctl {args[0]} printed no JSON: {text[-500:]!r} "
                             f"{err.decode('utf-8', 'replace')[-2000:]}") from None


async def shard_of(wallets: list[str], shards: int) -> dict[str, int]:
    """The shard each wallet id hashes to, as the router hashes it (``ledgerctl shard-of``).
    An envelope lives on the shard of its escrow wallet (``Envelope.escrow_wallet_id``)."""
    return await run_json(["shard-of", "--shards", str(shards), *wallets], ok_codes=(0,))


def store_args(contact_point: str, cql_port: int, dc: str, keyspace: str,
               shards: int) -> list[str]:
    """The flags that point a store command at one deployment's keyspace."""
    return ["--cassandra", f"{contact_point}:{cql_port}", "--dc", dc, "--keyspace", keyspace,
            "--shards", str(shards)]


def etcd_args(endpoint: str, prefix: str, regions: list[str], shards: int) -> list[str]:
    """The flags that point a shard-map command at one deployment's etcd prefix."""
    return ["--etcd", endpoint, "--etcd-prefix", prefix, "--regions", ",".join(regions),
            "--shards", str(shards)]


def probe_wallets(shards: int) -> dict[int, str]:
    """One wallet id per shard (read with GetWallet to tell whether the shard is served).

    The ids are ``probe-<i>`` with the smallest ``i`` that hashes to each shard, as the
    router hashes them (``ledgerctl shard-of``).

    Raises:
        LedgerctlError: ``ledgerctl shard-of`` failed.
    """
    out: dict[int, str] = {}
    first = 0
    while len(out) < shards:
        count = PROBE_CANDIDATES_PER_SHARD * shards
        wallets = [f"probe-{i}" for i in range(first, first + count)]
        done = subprocess.run(_command(["shard-of", "--shards", str(shards), "--json",
                                        *wallets]),
                              capture_output=True, text=True, timeout=LEDGERCTL_TIMEOUT_S)
        if done.returncode != 0:
            raise LedgerctlError(f"ledgerctl shard-of exited {done.returncode}: "
                                 f"{done.stderr[-2000:]}")
        shard_of = json.loads(done.stdout)
        for wallet in wallets:  # in order: the smallest i wins, as before
            out.setdefault(shard_of[wallet], wallet)
        first += count
    return out
