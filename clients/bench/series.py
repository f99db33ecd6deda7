"""Per-second series of a workload: committed transfers and call latency in each second.

A workload records one sample per finished call: (seconds since the workload started when
the call finished, its latency in ms, transfers it committed). A BatchTransfer call commits
all of its transfers at the moment it answers, so throughput is counted in the second a call
finished, and latency percentiles are those of the calls that finished in that second.
Pure functions: unit-tested without a ledger.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank rule (0.0 for none).

    The same rule as the workload totals (``Result.pct``), so a second's figure and the
    run's figure are comparable.
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def per_second(samples: list[tuple[float, float, int]], seconds: float) -> list[dict]:
    """One row per second of the workload: ``second`` (its end, 1-based), ``committed`` (in
    that second), ``calls`` (that ended in it), ``per_s`` (committed over the second's
    length: the last second may be shorter), ``p50_ms``, ``p99_ms`` (None in a second where
    no call ended: there is no latency to tell).

    Args:
        samples: (finished_s, latency_ms, committed) per call; ``finished_s`` since the start.
        seconds: How long the workload ran; calls that ended after it (the last calls in
            flight) go to the last second.
    """
    count = max(1, math.ceil(seconds))
    committed = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    for finished_s, latency_ms, n in samples:
        i = min(count - 1, max(0, int(finished_s)))
        committed[i] += n
        latencies[i].append(latency_ms)
    rows = []
    for i in range(count):
        # The last second may be partial (a workload of 10.3 s): its rate is over its length.
        width = min(1.0, seconds - i) if seconds > i else 1.0
        ended = latencies[i]
        rows.append({"second": i + 1, "committed": committed[i], "calls": len(ended),
                     "per_s": round(committed[i] / width, 1),
                     "p50_ms": round(percentile(ended, 0.50), 2) if ended else None,
                     "p99_ms": round(percentile(ended, 0.99), 2) if ended else None})
    return rows
