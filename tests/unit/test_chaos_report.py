"""The pure part of a chaos drill's verdict and its picture, fed recorded data: per-second
series, gaps without acknowledgements, the per-window summary, the journal checks on what
``ledgerctl journal --json`` printed, and the report files (report.json and a self-contained
chaos.html) rendered from a recorded run. No cluster, no processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

from clients.chaos import checks
from clients.chaos.model import FaultWindow, RunReport, ScenarioReport
from clients.chaos.report import latency_svg, render_html, summary_line, throughput_svg, write_report

# (started, finished, result) of a recorded bank run: acks every 0.5 s but for a gap from
# 10.0 to 13.0 s (a failover), two refusals, one request unanswered during the run.
OPS = ([(t / 2 - 0.05, t / 2, "ok") for t in range(1, 20)]          # 0.5 .. 9.5 s
       + [(t / 2 - 0.05, t / 2, "ok") for t in range(26, 40)]       # 13.0 .. 19.5 s
       + [(4.0, 4.2, "refused"), (15.0, 15.1, "refused"), (10.5, 0.0, "unknown")])


def op(key: str, started: float, finished: float, result: str = "ok"):
    return SimpleNamespace(key=key, started=started, finished=finished, result=result)


def journal(runs: dict[int, list[list[int]]]) -> dict:
    """What ``ledgerctl journal --json`` prints for these epoch runs per shard."""
    return {"shards": {str(s): {"last_seq": sum(n for _, n in r), "epoch_runs": r,
                                "epochs_monotonic": True} for s, r in runs.items()},
            "epochs_monotonic": True}


def recorded_scenario() -> ScenarioReport:
    report = ScenarioReport("kill-owner")
    report.windows = [FaultWindow("kill-owner", "r2-n0", 10.0, 14.0,
                                  notes={"served_again_s": 3.1}),
                      FaultWindow("failback", "default homes", 15.0, 16.0)]
    report.ops_plot = list(OPS)
    report.series = checks.series(report.ops_plot)
    report.measured = {"failover_s": [3.1], "failback_s": [None, 1.2]}
    report.counts_run = {"ok": 33, "refused": 2, "unknown": 1}
    report.counts_final = {"ok": 34, "refused": 2, "unknown": 0}
    report.reconcile = {"clean": True, "findings": [], "transfers_committed": 58}
    return report


def test_series_counts_per_second_and_latency():
    s = checks.series(OPS)
    assert s["seconds"] == 21
    assert sum(s["ok"]) == 33 and sum(s["refused"]) == 2 and sum(s["unknown"]) == 1
    assert s["unknown"][10] == 1                      # counted at the second it started
    assert s["ok"][11] == 0 and s["p50_ms"][11] is None  # the gap has no answers
    assert s["p50_ms"][1] == 50.0 and s["p99_ms"][1] == 50.0
    assert checks.series([]) == {"seconds": 0, "ok": [], "refused": [], "unknown": [],
                                 "p50_ms": [], "p99_ms": []}


def test_ack_gap_is_the_longest_stretch_without_an_ack():
    assert checks.ack_gap(OPS, 10.0, 19.0) == 3.0     # 9.5 -> 13.0, measured from 10.0
    assert checks.ack_gap(OPS, 0.0, 5.0) == 0.5
    assert checks.ack_gap([], 2.0, 7.5) == 5.5        # nothing acknowledged at all


def test_pct_of_sorted_values():
    assert checks.pct([], 0.99) == 0.0
    assert checks.pct([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0
    assert checks.pct([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


def test_summarize_folds_measurements_and_counts_losses_per_window():
    report = recorded_scenario()
    bank = [op("b1", 9.0, 11.0), op("b2", 12.0, 13.5), op("b3", 1.0, 1.1)]
    load = [op("l1", 10.0, 10.5), op("l2", 11.0, 12.0), op("l3", 11.0, 12.5, "refused")]
    report.load_plot = [(o.started, o.finished, o.result) for o in load]
    checks.summarize(report, bank, ["b2"], load, ["l2"])
    assert report.measured["failover_s"] == {"each": [3.1], "max": 3.1}
    assert report.measured["failback_s"] == {"each": [1.2], "max": 1.2}
    assert report.measured["failover_within_target"] is True
    assert report.measured["lost"] == 2
    fault = report.windows[0].notes
    assert fault["lost"] == 2                 # b2 (bank) and l2 (load) finished inside it
    assert fault["load_acked"] == 2 and fault["load_lost"] == 1
    assert fault["ack_gap_max_s"] == 3.0
    assert fault["load_ack_gap_max_s"] == 7.0  # 12.0 -> window end 14.0 + RECOVERY_MIN_S 5
    assert fault["latency_ms_p99_in_window"] == 50.0   # the unanswered one is left out
    assert report.windows[1].notes["lost"] == 0


def test_summarize_without_load_leaves_load_figures_out():
    report = recorded_scenario()
    checks.summarize(report, [op("b1", 1.0, 2.0)], [])
    assert report.measured["lost"] == 0
    assert "load_acked" not in report.windows[0].notes


def test_journal_checks():
    ok = journal({0: [[1, 4], [3, 2]], 1: [], 2: [[2, 5]]})
    assert checks.epoch_problems(ok) == []
    assert checks.batches_of_epoch(ok, 0, 1) == 4
    assert checks.batches_of_epoch(ok, 0, 2) == 0
    assert checks.batches_of_epoch(ok, 9, 1) == 0     # a shard not in the output
    back = journal({0: [[1, 4], [3, 2], [1, 1]], 1: [[5, 1]]})
    assert checks.epoch_problems(back) == ["shard 0: writer epochs go back along the journal"]
    # The paused owner held shard 0 at epoch 1 (4 batches when it woke) and shard 2 at 2.
    late, problems = checks.late_appends({0: 1, 2: 2}, {0: 4, 2: 5}, ok)
    assert (late, problems) == (0, [])
    late, problems = checks.late_appends({0: 1}, {0: 4}, back)
    assert late == 1 and problems == ["shard 0: old epoch 1 appended 1 batches after resume"]


def test_commit_count_and_verdict():
    assert checks.commit_count_problem(58, 58) is None
    assert "hold 57 committed" in checks.commit_count_problem(58, 57)
    report = recorded_scenario()
    assert checks.verdict(report) == "PASS"
    report.problems.append("kill-owner: something")
    assert checks.verdict(report) == "FAIL"
    report.problems.clear()
    report.reconcile = {"clean": False}
    assert checks.verdict(report) == "FAIL"


def test_charts_draw_the_recorded_run():
    report = recorded_scenario()
    svg = throughput_svg(report)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "kill-owner r2-n0" in svg and "failback default homes" in svg
    assert "?1" in svg                                # the unanswered request
    assert "served again 3.10 s after the fault" in svg
    lat = latency_svg(report)
    assert lat.count("<polyline") >= 2 and "p99 per second" in lat


def test_report_files_from_a_recorded_run(tmp_path):
    report = recorded_scenario()
    report.verdict = "PASS"
    checks.summarize(report, [], [])
    report.load = {"counts": {"ok": 120}, "ok_per_s": 6.0,
                   "series": checks.series([(1.0, 1.2, "ok")])}
    run = RunReport([report], {"out_dir": str(tmp_path), "seconds": 20.0},
                    {"journal_cas_serial_consistency": "SERIAL", "commit_consistency": "QUORUM",
                     "read_consistency": "QUORUM"}, "2026-11-26 20:00:00", "abc1234")
    write_report(run)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["passed"] is True and doc["git_commit"] == "abc1234"
    assert doc["scenarios"][0]["name"] == "kill-owner"
    assert "ops_plot" not in doc["scenarios"][0]
    page = (tmp_path / "chaos.html").read_text()
    assert page == render_html(run)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3  # bank, load, latency
    assert "<b>SERIAL</b>" in page and "class='v PASS'" in page and "120 (6.0)" in page
    line = summary_line(report)
    assert line.startswith("kill-owner") and "PASS" in line and "failover_s=3.10" in line
    assert "load ok=120 (6.0/s)" in line and "reconcile=clean" in line


def test_throughput_by_committing_region_follows_the_owner_timeline():
    # Wallet a on shard 0, b on shard 1. Shard 0 moves from r1 to r2 at 5.0 s (a failover);
    # shard 1 stays in r2. Unanswered and refused requests are not acknowledgements.
    ops = [SimpleNamespace(src="a", finished=t, result="ok") for t in (1.2, 4.9, 5.1, 7.5)]
    ops += [SimpleNamespace(src="b", finished=t, result="ok") for t in (2.0, 6.0)]
    ops += [SimpleNamespace(src="a", finished=3.0, result="refused"),
            SimpleNamespace(src="b", finished=0.0, result="unknown"),
            SimpleNamespace(src="c", finished=1.0, result="ok")]       # no owner on record
    changes = [(0.1, 0, "r1-n0", "r1", 10), (0.1, 1, "r2-n0", "r2", 11),
               (5.0, 0, None, None, 0), (5.05, 0, "r2-n0", "r2", 20)]
    lines = checks.by_region(ops, changes, {"a": 0, "b": 1, "c": 2}, seconds=8)
    assert lines == {"?": [0, 1, 0, 0, 0, 0, 0, 0],
                     "r1": [0, 1, 0, 0, 1, 0, 0, 0],
                     "r2": [0, 0, 1, 0, 0, 1, 1, 1]}
    report = recorded_scenario()
    report.series["by_region"] = lines
    svg = throughput_svg(report)
    assert svg.count('<polyline class="region"') == 3
    assert "region r1" in svg and "region r2" in svg


def test_shard_ack_gaps_per_moved_shard_and_over_all_of_them():
    ops = [SimpleNamespace(src=src, finished=f, result=r) for src, f, r in [
        ("a", 1.0, "ok"), ("a", 2.5, "ok"), ("b", 1.5, "ok"), ("b", 1.8, "refused"),
        ("b", 4.0, "ok"), ("c", 3.0, "ok"), ("a", 9.0, "ok")]]
    shard_of = {"a": 1, "b": 2, "c": 3}
    gaps = checks.shard_ack_gaps(ops, shard_of, [1, 2], 0.0, 5.0)
    # Shard 1: 0 -> 1.0 -> 2.5 -> 5.0; shard 2: 0 -> 1.5 -> 4.0 (the refusal is no ack).
    assert gaps["per_shard_s"] == {"1": 2.5, "2": 2.5}
    assert gaps["max_s"] == 2.5
    # Any of them: 0 -> 1.0 -> 1.5 -> 2.5 -> 4.0 -> 5.0; shard 3's ack at 3.0 does not count.
    assert gaps["any_s"] == 1.5
    # A shard with no ack at all in the stretch is unserved for all of it.
    assert checks.shard_ack_gaps(ops, shard_of, [3], 3.5, 8.0)["max_s"] == 4.5


def test_drain_gap_is_reported_against_its_target():
    from clients.chaos.constants import DRAIN_GAP_TARGET_S

    report = ScenarioReport("drain-region")
    report.measured["drain_gap_s"] = [0.4, DRAIN_GAP_TARGET_S + 0.2]
    checks.summarize(report, [], [])
    assert report.measured["drain_gap_s"]["max"] == DRAIN_GAP_TARGET_S + 0.2
    assert report.measured["drain_gap_within_target"] is False
