"""The pure part of a drill's verdict: figures and checks computed from recorded data.

Nothing here talks to a process or a server: each function takes what a drill recorded
(its requests as ``(started, finished, result)`` tuples, the JSON that ``ledgerctl``
printed) and returns figures or problems. The unit tier feeds them recorded data.
"""

from __future__ import annotations

import math
from typing import Iterable

from clients.chaos.constants import FAILOVER_TARGET_S, RECOVERY_MIN_S
from clients.chaos.model import ScenarioReport


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of already sorted ``values`` (0.0 for none)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def ack_gap(ops: list, start: float, end: float) -> float:
    """Longest stretch of [start, end] without an acknowledged transfer (s)."""
    acks = sorted(f for _, f, r in ops if r == "ok" and start <= f <= end)
    points = [start, *acks, end]
    return round(max(b - a for a, b in zip(points, points[1:])), 3)


def series(ops: list) -> dict:
    """Per second of the run: acknowledged transfers, refusals, unanswered, latency p50/p99
    (ms) of the answered requests that finished in that second."""
    if not ops:
        return {"seconds": 0, "ok": [], "refused": [], "unknown": [], "p50_ms": [],
                "p99_ms": []}
    end = int(math.ceil(max(max(f, s) for s, f, _ in ops))) + 1
    ok, refused, unknown = [0] * end, [0] * end, [0] * end
    lat: list[list[float]] = [[] for _ in range(end)]
    for s, f, r in ops:
        if r == "unknown" or f <= 0:
            unknown[min(end - 1, int(s))] += 1
            continue
        sec = min(end - 1, int(f))
        (ok if r == "ok" else refused)[sec] += 1
        lat[sec].append((f - s) * 1000)
    p50 = [round(pct(sorted(v), 0.5), 1) if v else None for v in lat]
    p99 = [round(pct(sorted(v), 0.99), 1) if v else None for v in lat]
    return {"seconds": end, "ok": ok, "refused": refused, "unknown": unknown,
            "p50_ms": p50, "p99_ms": p99}


def summarize(report: ScenarioReport, bank_ops: list, bank_lost: Iterable[str],
              load_ops: list | None = None, load_lost: Iterable[str] = ()) -> None:
    """Fold the measured lists into max figures and add per-window figures, in place.

    Args:
        report: The scenario's report; ``measured``, ``ops_plot``, ``load_plot`` and the
            windows are read, ``measured`` and the windows' ``notes`` are written.
        bank_ops: The bank's requests (objects with ``key``, ``started``, ``finished`` and
            ``result``).
        bank_lost: Keys of acknowledged bank transfers the ledger does not hold.
        load_ops: The transfer load's requests, or None when the drill ran without load.
        load_lost: Keys of acknowledged load transfers the ledger does not hold.
    """
    for key, values in list(report.measured.items()):
        if isinstance(values, list):
            values = [v for v in values if v is not None]
            report.measured[key] = {"each": values,
                                    "max": max(values) if values else None}
    failover = report.measured.get("failover_s")
    if failover and failover["max"] is not None:
        report.measured["failover_target_s"] = FAILOVER_TARGET_S
        report.measured["failover_within_target"] = failover["max"] <= FAILOVER_TARGET_S
    lost_bank = set(bank_lost)
    lost_load = set(load_lost)
    report.measured["lost"] = len(lost_bank) + (len(lost_load) if load_ops is not None else 0)
    for window in report.windows:
        end = window.end_s if window.end_s is not None else window.start_s
        window.notes["ack_gap_max_s"] = ack_gap(report.ops_plot, window.start_s,
                                                end + RECOVERY_MIN_S)
        window.notes["lost"] = sum(1 for op in bank_ops if op.key in lost_bank
                                   and window.start_s <= op.finished <= end)
        if load_ops is not None:
            acked = [op for op in load_ops
                     if op.result == "ok" and window.start_s <= op.finished <= end]
            window.notes["load_acked"] = len(acked)
            window.notes["load_lost"] = sum(1 for op in acked if op.key in lost_load)
            window.notes["lost"] += window.notes["load_lost"]
            window.notes["load_ack_gap_max_s"] = ack_gap(
                report.load_plot, window.start_s, end + RECOVERY_MIN_S)
            window.notes["any_ack_gap_max_s"] = ack_gap(
                report.ops_plot + report.load_plot, window.start_s, end + RECOVERY_MIN_S)
        lat = sorted((f - s) * 1000 for s, f, r in report.ops_plot
                     if r != "unknown" and window.start_s <= s <= end)
        window.notes["latency_ms_p99_in_window"] = (round(pct(lat, 0.99), 1)
                                                    if lat else None)


def batches_of_epoch(journal: dict, shard: int, epoch: int) -> int:
    """Journal batches of ``shard`` written by ``epoch``, from ``ledgerctl journal --json``."""
    row = journal["shards"].get(str(shard), {"epoch_runs": []})
    return sum(n for e, n in row["epoch_runs"] if e == epoch)


def epoch_problems(journal: dict) -> list[str]:
    """One problem per shard whose writer epochs go back along its journal (a deposed
    writer appended after a newer one), from ``ledgerctl journal --json``."""
    problems = []
    for shard, row in sorted(journal["shards"].items(), key=lambda kv: int(kv[0])):
        epochs = [e for e, _ in row["epoch_runs"]]
        if any(b < a for a, b in zip(epochs, epochs[1:])):
            problems.append(f"shard {shard}: writer epochs go back along the journal")
    return problems


def late_appends(paused: dict[int, int], at_resume: dict[int, int],
                 journal: dict) -> tuple[int, list[str]]:
    """Batches the paused owner's old epochs appended after it woke up (must be none).

    Args:
        paused: Shard -> the epoch the paused owner held.
        at_resume: Shard -> batches of that epoch in the journal when it was resumed.
        journal: ``ledgerctl journal --json`` read after the run.

    Returns:
        The number of late batches and one problem per shard that has any.
    """
    late, problems = 0, []
    for shard, epoch in paused.items():
        now = batches_of_epoch(journal, shard, epoch)
        if now != at_resume[shard]:
            late += now - at_resume[shard]
            problems.append(f"shard {shard}: old epoch {epoch} appended "
                            f"{now - at_resume[shard]} batches after resume")
    return late, problems


def commit_count_problem(expected: int, committed: int) -> str | None:
    """Exactly once, counted by the store: one commit per funding deposit and per
    acknowledged transfer, and nothing else (every request was answered by then)."""
    if committed == expected:
        return None
    return (f"the journals hold {committed} committed transfers, the acknowledged ones "
            f"(and funding deposits) are {expected}")


def verdict(report: ScenarioReport) -> str:
    """PASS iff no problem was found and reconcile is clean."""
    return "PASS" if not report.problems and report.reconcile.get("clean") else "FAIL"
