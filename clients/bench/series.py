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
    that second), ``calls`` (that ended in it), ``per_s`` (committed over the row's length:
    the last row also holds the fraction of a second the run went on for), ``p50_ms``,
    ``p99_ms`` (None in a second where no call ended: there is no latency to tell).

    Args:
        samples: (finished_s, latency_ms, committed) per call; ``finished_s`` since the start.
        seconds: How long the workload ran; calls that ended after it (the last calls in
            flight) go to the last second.
    """
    # A partial last second joins the one before it (a 10.3 s run has 10 rows, the last
    # 1.3 s long): alone, a few calls ending in a sliver of a second read as a huge rate.
    count = max(1, math.floor(seconds))
    committed = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    for finished_s, latency_ms, n in samples:
        i = min(count - 1, max(0, int(finished_s)))
        committed[i] += n
        latencies[i].append(latency_ms)
    rows = []
    for i in range(count):
        width = seconds - i if i == count - 1 and seconds > i else 1.0
        ended = latencies[i]
        rows.append({"second": i + 1, "committed": committed[i], "calls": len(ended),
                     "per_s": round(committed[i] / width, 1),
                     "p50_ms": round(percentile(ended, 0.50), 2) if ended else None,
                     "p99_ms": round(percentile(ended, 0.99), 2) if ended else None})
    return rows
