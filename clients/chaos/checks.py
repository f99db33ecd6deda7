"""The pure part of a drill's verdict: figures and checks computed from recorded data.

Nothing here talks to a process or a server: each function takes what a drill recorded
(its requests as ``(started, finished, result)`` tuples, the JSON that ``ledgerctl``
printed) and returns figures or problems. The unit tier feeds them recorded data.
"""

from __future__ import annotations

import bisect

import math
from collections import Counter
from typing import Iterable

from clients.chaos.constants import DRAIN_GAP_TARGET_S, FAILOVER_TARGET_S, RECOVERY_MIN_S
from clients.chaos.model import ScenarioReport


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of already sorted ``values`` (0.0 for none)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def _longest_gap(times: Iterable[float], start: float, end: float) -> float:
    """Longest stretch of [start, end] between consecutive ``times`` (all within it)."""
    points = [start, *sorted(times), end]
    return round(max(b - a for a, b in zip(points, points[1:])), 3)


def ack_gap(ops: list, start: float, end: float) -> float:
    """Longest stretch of [start, end] without an acknowledged transfer (s)."""
    return _longest_gap((f for _, f, r in ops if r == "ok" and start <= f <= end), start, end)


def shard_ack_gaps(ops: Iterable, shard_of: dict[str, int], shards: Iterable[int],
                   start: float, end: float) -> dict:
    """How long transfers debiting ``shards`` went unacknowledged within [start, end]: the
    longest stretch without an acknowledgement on any of them (``any_s``) and, per shard,
    without one on that shard (``per_shard_s``, and its ``max_s``).

    Args:
        ops: Requests with ``src`` (the debited wallet), ``finished`` and ``result``.
        shard_of: Wallet id -> shard.
    """
    wanted = set(shards)
    acks: dict[int, list[float]] = {s: [] for s in wanted}
    for op in ops:
        shard = shard_of.get(op.src, -1)
        if op.result == "ok" and shard in wanted and start <= op.finished <= end:
            acks[shard].append(op.finished)

    per_shard = {s: _longest_gap(t, start, end) for s, t in sorted(acks.items())}
    return {"any_s": _longest_gap((t for times in acks.values() for t in times), start, end),
            "per_shard_s": {str(s): g for s, g in per_shard.items()},
            "max_s": max(per_shard.values(), default=None)}


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


def by_region(ops: list, changes: list, shard_of: dict[str, int], seconds: int) -> dict:
    """Acknowledged transfers per second by the region that committed them: the region of
    the node that owned the transfer's debit shard when it was answered, from the owner
    timeline polled from etcd (``changes``: (t, shard, node, region, epoch), in time order).
    Transfers whose shard had no owner on record then count under "?".

    Args:
        ops: Requests with ``src``, ``finished`` and ``result``.
        shard_of: Wallet id -> shard.
        seconds: Length of the series (the bank's, so that the lines share its axis).
    """
    timeline: dict[int, list[tuple[float, str]]] = {}
    for t, shard, _node, region, _epoch in changes:
        timeline.setdefault(shard, []).append((t, region or "?"))
    out: dict[str, list[int]] = {}
    for op in ops:
        if op.result != "ok" or op.finished <= 0:
            continue
        marks = timeline.get(shard_of.get(op.src, -1), [])
        at = bisect.bisect_right(marks, (op.finished, "\uffff")) - 1
        region = marks[at][1] if at >= 0 else "?"
        sec = min(max(seconds, 1) - 1, int(op.finished))
        out.setdefault(region, [0] * max(seconds, 1))[sec] += 1
    return dict(sorted(out.items()))


def summarize(report: ScenarioReport, bank_ops: list, bank_lost: Iterable[str],
              load_ops: list | None = None, load_lost: Iterable[str] = ()) -> None:
    """Fold the measured lists into max figures and add per-window figures, in place.

    Args:
        report: The scenario's report; ``measured``, ``ops_plot``, ``load_plot``,
            ``envelope_plot`` and the windows are read, ``measured`` and the windows'
            ``notes`` are written.
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
    drain = report.measured.get("drain_gap_s")
    if drain and drain["max"] is not None:
        report.measured["drain_gap_target_s"] = DRAIN_GAP_TARGET_S
        report.measured["drain_gap_within_target"] = drain["max"] <= DRAIN_GAP_TARGET_S
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
        if report.envelope_plot:
            # hot-envelope: grabs acknowledged during the window, and the longest stretch
            # without one (until RECOVERY_MIN_S after the heal).
            window.notes["grabs_acked"] = sum(1 for _, f, r in report.envelope_plot
                                              if r == "ok" and window.start_s <= f <= end)
            window.notes["grab_ack_gap_max_s"] = ack_gap(report.envelope_plot, window.start_s,
                                                         end + RECOVERY_MIN_S)
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


# -- hot-envelope ------------------------------------------------------------------------------

def grab_problems(ledger_grabs: list[dict], acked: dict[str, dict], unanswered: set[str],
                  settled: dict[str, dict], receivers: set[str],
                  shown: int = 20) -> tuple[list[str], dict]:
    """No share granted twice, and no acknowledged grab lost.

    Args:
        ledger_grabs: The envelope's grabs as GetEnvelope lists them: dicts with
            ``position``, ``receiver``, ``amount`` and ``transfer_id``.
        acked: Receiver -> the grab its OK answer during the run named (same keys).
        unanswered: Receivers whose grab got no definitive answer during the run (its
            outcome was unknown when the run ended).
        settled: Receiver -> the grab named by an OK answer after the run (a grab of
            ``unanswered`` asked again with its key).
        receivers: Every receiver of the drill (nobody else grabs this envelope).
        shown: Receivers named per problem at most.

    Returns:
        The problems, and the figures (JSON evidence).
    """
    problems: list[str] = []
    n = len(ledger_grabs)
    positions = [g["position"] for g in ledger_grabs]
    twice = sorted(p for p, count in Counter(positions).items() if count > 1)
    missing = sorted(set(range(n)) - set(positions))
    if twice or missing:
        problems.append(f"grab positions are not 0..{n - 1}: granted twice {twice[:shown]}, "
                        f"missing {missing[:shown]}")
    by_receiver: dict[str, dict] = {}
    again = []
    for g in ledger_grabs:
        if g["receiver"] in by_receiver:
            again.append(g["receiver"])
        by_receiver[g["receiver"]] = g
    if again:
        problems.append(f"{len(again)} receivers hold two shares: {sorted(again)[:shown]}")
    strangers = sorted(set(by_receiver) - receivers)
    if strangers:
        problems.append(f"grabs by wallets that never grabbed: {strangers[:shown]}")

    def compare(answers: dict[str, dict], what: str) -> tuple[list[str], list[str]]:
        lost, differ = [], []
        for receiver, answer in sorted(answers.items()):
            held = by_receiver.get(receiver)
            if held is None:
                lost.append(receiver)
            elif any(held[k] != answer[k] for k in ("position", "amount", "transfer_id")):
                differ.append(f"{receiver}: answered {answer}, the ledger has {held}")
        if lost:
            problems.append(f"{len(lost)} {what} grabs lost (not in GetEnvelope): "
                            f"{lost[:shown]}")
        if differ:
            problems.append(f"{len(differ)} {what} grabs differ from GetEnvelope: "
                            f"{differ[:shown]}")
        return lost, differ

    lost, differ = compare(acked, "acknowledged")
    settled_lost, settled_differ = compare(settled, "settled")
    unknown_held = sorted(set(by_receiver) & unanswered)
    unexplained = sorted(set(by_receiver) - set(acked) - unanswered - set(strangers))
    if unexplained:
        problems.append(f"{len(unexplained)} grabs granted although their request was "
                        f"refused: {unexplained[:shown]}")
    expected_n = len(acked) + len(unknown_held)
    if n != expected_n:
        problems.append(f"the envelope has {n} grabs; acknowledged {len(acked)} + unanswered "
                        f"that it holds {len(unknown_held)} = {expected_n}")
    figures = {
        "grabs_in_ledger": n, "acknowledged": len(acked), "unanswered_in_run": len(unanswered),
        "unanswered_held_by_ledger": len(unknown_held), "settled_ok": len(settled),
        "positions_0_to_n_minus_1": not (twice or missing), "granted_twice": twice[:shown],
        "receivers_distinct": not again, "strangers": strangers[:shown],
        "acknowledged_lost": len(lost) + len(settled_lost), "lost": (lost + settled_lost)[:shown],
        "differ": (differ + settled_differ)[:shown], "granted_unacknowledged": unexplained[:shown],
        "grabbed_minor": sum(g["amount"] for g in ledger_grabs),
    }
    return problems, figures


def credit_problems(ledger_grabs: list[dict], balances: dict[str, int],
                    transfers: dict[str, dict], shown: int = 20) -> tuple[list[str], dict]:
    """Every grab credited exactly once: each receiver's balance is its share (0 without one;
    the receivers are used for nothing else), and GetTransfer of the grab's transfer says
    COMMITTED, credited, its amount, escrow -> receiver.

    Args:
        ledger_grabs: As for ``grab_problems``.
        balances: Receiver -> its balance (every receiver).
        transfers: Transfer id -> ``state``, ``credited``, ``amount``, ``to``, ``kind`` as
            GetTransfer answered (a grab's transfer that it does not know is missing).
    """
    problems: list[str] = []
    share = {g["receiver"]: g["amount"] for g in ledger_grabs}
    wrong = [f"{r}: {b} (share {share.get(r, 0)})" for r, b in sorted(balances.items())
             if b != share.get(r, 0)]
    if wrong:
        problems.append(f"{len(wrong)} receivers' balances are not their shares: "
                        f"{wrong[:shown]}")
    bad = []
    for g in ledger_grabs:
        t = transfers.get(g["transfer_id"])
        if (t is None or t["state"] != "TRANSFER_STATE_COMMITTED" or not t["credited"]
                or t["amount"] != g["amount"] or t["to"] != g["receiver"]
                or t["kind"] != "TRANSFER_KIND_ENVELOPE_GRAB"):
            bad.append(f"position {g['position']} {g['transfer_id']}: {t}")
    if bad:
        problems.append(f"{len(bad)} grabs' transfers are not committed and credited as "
                        f"grabbed: {bad[:shown]}")
    return problems, {"balances_are_shares": not wrong, "balances_wrong": wrong[:shown],
                      "transfers_credited": len(ledger_grabs) - len(bad),
                      "transfers_bad": bad[:shown]}


def refund_problems(envelope: dict, grabbed_minor: int, sender_initial: int,
                    sender_balance: int, refund: dict | None) -> tuple[list[str], dict]:
    """The rest refunded exactly once: REFUNDED, ``refunded_minor == total - grabbed``,
    nothing left in escrow, the refund transfer committed and credited for that amount, and
    the sender's balance ``initial - total + refunded``.

    Args:
        envelope: GetEnvelope's envelope: ``state``, ``total_minor``, ``refunded_minor``,
            ``amount_left_minor``.
        grabbed_minor: The sum of the grabs GetEnvelope lists.
        sender_initial: The sender's balance before it funded the envelope.
        sender_balance: The sender's balance now.
        refund: GetTransfer of ``refund_transfer_id`` (as in ``credit_problems``), or None.
    """
    problems: list[str] = []
    total, refunded = envelope["total_minor"], envelope["refunded_minor"]
    if envelope["state"] != "ENVELOPE_STATE_REFUNDED":
        problems.append(f"the envelope is {envelope['state']} after its expiry, not REFUNDED")
    if refunded != total - grabbed_minor:
        problems.append(f"refunded {refunded}, but total {total} - grabbed {grabbed_minor} = "
                        f"{total - grabbed_minor}")
    if envelope["amount_left_minor"] != 0:
        problems.append(f"{envelope['amount_left_minor']} left in escrow after the refund")
    if refunded and (refund is None or refund["state"] != "TRANSFER_STATE_COMMITTED"
                     or not refund["credited"] or refund["amount"] != refunded
                     or refund["kind"] != "TRANSFER_KIND_ENVELOPE_REFUND"):
        problems.append(f"the refund transfer is not committed and credited for {refunded}: "
                        f"{refund}")
    expected = sender_initial - total + refunded
    if sender_balance != expected:
        problems.append(f"the sender holds {sender_balance}, initial {sender_initial} - total "
                        f"{total} + refunded {refunded} = {expected}")
    return problems, {"state": envelope["state"], "total_minor": total,
                      "grabbed_minor": grabbed_minor, "refunded_minor": refunded,
                      "refund_exact": refunded == total - grabbed_minor,
                      "sender_initial_minor": sender_initial,
                      "sender_balance_minor": sender_balance,
                      "sender_balance_exact": sender_balance == expected}
