"""Owner memory per idempotency key, before and after the keys leave memory (issue 9, item 3).

    python -m tests.tools.keymem --transfers 200000

Runs the pure core as an owner does (``ledger.core.step``): ``--transfers`` transfers decided
on one debit shard (each keeps a key record and its transfer) and their key claims on another
shard, then ``SpillIdempotency`` on both. Prints the traced Python memory per key held by the
two shard states before and after the spill (tracemalloc, after a full collection, plus the
filters' bits, which live outside Python's allocator). Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

from ledger.core.ids import transfer_id_for
from ledger.core.model import ClaimKey, CreateWallet, Post, SpillIdempotency, settlement_wallet_id
from ledger.core.shard import ShardState, transfer_fingerprint
from ledger.core.step import step

DEBIT, KEYS = 7, 8
NOW = 1_700_000_000_000
CHUNK = 2_000


def measure(transfers: int, wallets: int) -> dict:
    debit, claims = ShardState(DEBIT), ShardState(KEYS)
    step(debit, [CreateWallet("bench", f"c{i}", f"w{i}", "CNY", False, NOW)
                 for i in range(wallets)])
    step(debit, [Post("bench", f"d{i}", transfer_id_for(DEBIT, "bench", f"d{i}"), "DEPOSIT",
                      settlement_wallet_id("CNY", DEBIT), f"w{i}", 10**12, "CNY", "", DEBIT, NOW)
                 for i in range(wallets)])
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, transfers, CHUNK):
        keys = [f"key-{i:012d}" for i in range(start, min(start + CHUNK, transfers))]
        step(debit, [Post("bench", k, transfer_id_for(DEBIT, "bench", k), "TRANSFER",
                          f"w{i % wallets}", f"w{(i + 1) % wallets}", 1, "CNY", "", DEBIT, NOW)
                     for i, k in enumerate(keys)])
        step(claims, [ClaimKey("bench", k, transfer_fingerprint("TRANSFER", "wa", "wb", 1,
                                                                  "CNY", ""),
                               transfer_id_for(DEBIT, "bench", k), NOW) for k in keys])
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    step(debit, [SpillIdempotency(NOW + 1)])
    step(claims, [SpillIdempotency(NOW + 1)])
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    filters = debit.spilled.size_bytes() + claims.spilled.size_bytes()
    return {"transfers": transfers, "bytes_per_key_in_memory": round(held / transfers),
            "gib_per_million_keys_in_memory": round(held / transfers * 1e6 / 2**30, 3),
            # The filters live in rbloom's (Rust) memory, which tracemalloc does not see.
            "bytes_per_key_after_spill": round((after + filters) / transfers, 2),
            "mib_per_million_keys_after_spill": round((after + filters) / transfers * 1e6
                                                      / 2**20, 2),
            "of_which_filter_bytes_per_key": round(filters / transfers, 2),
            "records_left_in_memory": len(debit.idempotency) + len(claims.claims)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keymem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=200_000)
    parser.add_argument("--wallets", type=int, default=1_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.transfers, args.wallets), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
