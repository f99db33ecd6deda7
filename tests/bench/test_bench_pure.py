"""The pure parts of ledger-bench: /proc stat parsing, /metrics parsing and differences, the
per-transfer figures, and the per-second series. No ledger runs here."""

from __future__ import annotations

import pytest

from clients.bench import probe, series
from clients.bench.probe import CLOCK_TICKS_PER_S, Probe, Sample


def _stat(comm: str, utime: int, stime: int) -> str:
    # Fields 1-2, then state (3) ... utime (14), stime (15), as in proc(5).
    fields = ["S", "1", "2", "3", "4", "-1", "4194560", "10", "0", "0", "0",
              str(utime), str(stime), "0", "0", "20", "0", "3"]
    return f"4242 ({comm}) " + " ".join(fields) + "\n"


def test_parse_stat_reads_utime_plus_stime_in_seconds() -> None:
    comm, cpu = probe.parse_stat(_stat("sqlite-store", 150, 50))
    assert comm == "sqlite-store"
    assert cpu == pytest.approx(200 / CLOCK_TICKS_PER_S)


def test_parse_stat_survives_spaces_and_parentheses_in_the_name() -> None:
    comm, cpu = probe.parse_stat(_stat("a) b (c", 7, 3))
    assert comm == "a) b (c"
    assert cpu == pytest.approx(10 / CLOCK_TICKS_PER_S)


def test_parse_stat_of_this_process_grows_with_work() -> None:
    import os

    before = probe.process_cpu_s(os.getpid())
    total = 0
    while probe.process_cpu_s(os.getpid()) - before < 3 / CLOCK_TICKS_PER_S:
        total += sum(range(10_000))  # burn CPU until the kernel's counter moves
    assert probe.process_cpu_s(os.getpid()) > before


EXPOSITION = """\
# HELP ledger_store_appends_total Journal appends.
# TYPE ledger_store_appends_total counter
ledger_store_appends_total 12.0
# HELP ledger_store_appends_created Created.
# TYPE ledger_store_appends_created gauge
ledger_store_appends_created 1.7e9
# HELP x_requests_total Requests.
# TYPE x_requests_total counter
x_requests_total{code="200"} 3.0
x_requests_total{code="500"} 1.0
"""


def test_parse_metrics_by_sample_name_with_labels_summed() -> None:
    values = probe.parse_metrics(EXPOSITION)
    assert values["ledger_store_appends_total"] == 12.0
    assert values["x_requests_total"] == 4.0


def test_diff_counts_a_counter_absent_before_from_zero() -> None:
    assert probe.diff({"a": 2.0}, {"a": 5.0, "b": 1.0}) == {"a": 3.0, "b": 1.0}


def _sample(ledger: float, store: float, **counters: float) -> Sample:
    return Sample(ledger_cpu_s=ledger, store_cpu_s=store, bench_cpu_s=0.0, load_1m=0.5,
                  counters=dict(counters))


def test_costs_per_transfer_embedded_store_thread_counted_once() -> None:
    p = Probe(ledger_pids=[1], store_thread="sqlite-store", metrics_urls=["u"])
    before = _sample(10.0, 2.0, ledger_store_appends_total=100,
                     ledger_store_rows_written_total=1000, ledger_transfers_committed_total=0)
    after = _sample(12.0, 2.5, ledger_store_appends_total=300,
                    ledger_store_rows_written_total=5000, ledger_transfers_committed_total=1000)
    row = probe.costs(before, after, committed=1000, seconds=2.0, probe=p)
    assert row["cpu_us_per_transfer"] == 2000.0        # 2 s of CPU / 1000 transfers
    assert row["store_cpu_us_per_transfer"] == 500.0
    assert row["ledger_cpu_pct"] == 100.0               # 2 s of CPU in 2 s: one core
    assert row["store_cpu_share"] == 0.25               # 0.5 of the ledger's 2.0, not of 2.5
    assert row["appends_per_transfer"] == 0.2
    assert row["rows_per_transfer"] == 4.0
    assert row["lwt_per_transfer"] is None              # not exposed in these scrapes
    assert row["server_committed"] == 1000


def test_costs_separate_store_process_adds_to_the_server_side() -> None:
    p = Probe(ledger_pids=[1], store_pids=[2], metrics_urls=["u"])
    row = probe.costs(_sample(0, 0, ledger_store_lwt_total=0),
                      _sample(1.0, 3.0, ledger_store_lwt_total=50),
                      committed=100, seconds=1.0, probe=p)
    assert row["store_cpu_share"] == 0.75
    assert row["store_cpu_pct"] == 300.0
    assert row["lwt_per_transfer"] == 0.5


def test_costs_without_sources_or_commits_are_none_not_zero() -> None:
    row = probe.costs(_sample(0, 0), _sample(1, 1), committed=0, seconds=1.0, probe=Probe())
    assert row["cpu_us_per_transfer"] is None
    assert row["store_cpu_share"] is None
    assert row["appends_per_transfer"] is None


def test_per_second_buckets_by_finish_time_and_joins_a_partial_last_second() -> None:
    samples = [(0.2, 10.0, 100), (0.9, 30.0, 100), (1.5, 20.0, 50), (2.1, 40.0, 10)]
    rows = series.per_second(samples, seconds=2.5)
    assert [r["second"] for r in rows] == [1, 2]
    assert [r["committed"] for r in rows] == [200, 60]
    assert [r["per_s"] for r in rows] == [200.0, 40.0]  # 60 in the last 1.5 s
    assert rows[0]["p50_ms"] == 30.0 and rows[0]["p99_ms"] == 30.0
    assert rows[1]["calls"] == 2


def test_per_second_a_second_without_calls_has_no_latency() -> None:
    rows = series.per_second([(2.5, 5.0, 1)], seconds=3.0)
    assert rows[0]["p50_ms"] is None and rows[0]["committed"] == 0
    assert rows[2]["p50_ms"] == 5.0


def test_per_second_run_shorter_than_a_second_is_one_row_over_its_length() -> None:
    rows = series.per_second([(0.4, 5.0, 10)], seconds=0.5)
    assert len(rows) == 1 and rows[0]["per_s"] == 20.0


def test_per_second_late_calls_go_to_the_last_second() -> None:
    rows = series.per_second([(3.7, 5.0, 4)], seconds=3.0)
    assert len(rows) == 3 and rows[-1]["committed"] == 4


def test_plot_writes_png_and_html(tmp_path) -> None:
    from clients.bench import plot

    rows = series.per_second([(0.5, 10.0, 5), (1.5, 12.0, 7)], seconds=2.0)
    for name in ("b.png", "b.html"):
        plot.write(str(tmp_path / name), {"batch": rows, "single x64": rows}, "test")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "b.html").read_text()


def test_store_thread_without_ledger_pids_is_not_measured() -> None:
    p = Probe(store_thread="sqlite-store", metrics_urls=["u"])  # --target without --ledger-pid
    row = probe.costs(_sample(0, 0, process_cpu_seconds_total=1.0),
                      _sample(2.0, 0, process_cpu_seconds_total=3.0),
                      committed=10, seconds=1.0, probe=p)
    assert row["store_cpu_us_per_transfer"] is None and row["store_cpu_share"] is None
    assert row["cpu_us_per_transfer"] == 200000.0


# --- red envelopes: the credit probes and the verdict --------------------------------------

def _grab(envelope: str, position: int, receiver: str, amount: int = 1):
    from ledgerpb import ledger_pb2 as pb

    return pb.Grab(envelope_id=envelope, position=position, receiver_wallet_id=receiver,
                   amount_minor=amount, transfer_id=f"t-{envelope}-{position}")


def test_credit_probes_highest_position_per_envelope_and_receiver_shard() -> None:
    from clients.bench.envelopes import credit_probes

    shards = {"a": 1, "b": 1, "c": 2, "d": 1}
    grabs = [_grab("e1", 3, "a"), _grab("e1", 0, "b"), _grab("e1", 1, "c"),
             _grab("e1", 2, "d"), _grab("e2", 0, "a"), _grab("e2", 1, "c")]
    probes = credit_probes(grabs, shards)
    # e1's positions follow its shard's journal: position 3 covers 0 and 2 on shard 1.
    assert sorted((g.envelope_id, g.position) for g in probes) == [
        ("e1", 1), ("e1", 3), ("e2", 0), ("e2", 1)]


def test_credit_probes_without_shards_poll_every_grab() -> None:
    from clients.bench.envelopes import credit_probes

    grabs = [_grab("e1", 0, "a"), _grab("e1", 1, "b"), _grab("e2", 0, "a")]
    assert len(credit_probes(grabs, None)) == 3


def test_naive_double_mean_shares_sum_to_the_total_and_keep_the_minimum() -> None:
    import random

    from clients.bench.naive import double_mean_share

    rng = random.Random(7)
    left, shares = 1_000, 50
    amounts = []
    for n in range(shares, 0, -1):
        amounts.append(double_mean_share(rng, n, left))
        left -= amounts[-1]
    assert sum(amounts) == 1_000 and min(amounts) >= 1 and left == 0


def test_check_grabs_accepts_a_sold_out_envelope() -> None:
    from clients.bench.envelopes import check_grabs
    from ledgerpb import ledger_pb2 as pb

    envelope = pb.Envelope(envelope_id="e1", total_minor=10, shares=3)
    grabs = [_grab("e1", 0, "a", 5), _grab("e1", 2, "c", 1), _grab("e1", 1, "b", 4)]
    final = {"e1": pb.Envelope(state=pb.ENVELOPE_STATE_SOLD_OUT)}
    correct, check = check_grabs({"e1": envelope}, grabs, {}, final)
    assert correct, check


@pytest.mark.parametrize("grabs, refused, final_state, why", [
    ([("a", 0, 5), ("b", 1, 4)], {}, "SOLD_OUT", "2 grabs of 3 shares"),
    ([("a", 0, 5), ("b", 1, 4), ("c", 1, 1)], {}, "SOLD_OUT", "duplicate positions"),
    ([("a", 0, 5), ("a", 1, 4), ("c", 2, 1)], {}, "SOLD_OUT", "duplicate receivers"),
    ([("a", 0, 5), ("b", 1, 4), ("c", 2, 2)], {}, "SOLD_OUT", "sum to 11, total 10"),
    ([("a", 0, 5), ("b", 1, 4), ("c", 2, 1)], {"RESULT_STATUS_X": 1}, "SOLD_OUT", "not OK"),
    ([("a", 0, 5), ("b", 1, 4), ("c", 2, 1)], {}, "ACTIVE", "GetEnvelope says"),
])
def test_check_grabs_names_what_is_wrong(grabs, refused, final_state, why) -> None:
    from clients.bench.envelopes import check_grabs
    from ledgerpb import ledger_pb2 as pb

    envelope = pb.Envelope(envelope_id="e1", total_minor=10, shares=3)
    final = {"e1": pb.Envelope(state=pb.EnvelopeState.Value(f"ENVELOPE_STATE_{final_state}"))}
    correct, check = check_grabs({"e1": envelope}, [_grab("e1", p, r, a) for r, p, a in grabs],
                                 refused, final)
    assert not correct and why in check, check


def test_a_wrong_envelope_result_makes_the_bench_exit_non_zero(monkeypatch, capsys) -> None:
    from clients.bench import cli
    from clients.bench.workloads import Result

    wrong = Result("hot-envelope", family="envelope", committed=3, seconds=1.0)
    wrong.fields.update(grabs=3, envelopes=1, credited_s=1.5, credits_per_s=2.0,
                        correct=False, check="e1: amounts sum to 9, total 10")

    class NoServer:
        regions = ["r1"]

        def __init__(self, args) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    async def measured(server, args):
        return [wrong]
    monkeypatch.setattr(cli, "Server", NoServer)
    monkeypatch.setattr(cli, "measure", measured)
    assert cli.main(["--workloads", "hot-envelope"]) == cli.EXIT_WRONG_RESULT
    out = capsys.readouterr()
    assert "WRONG: e1: amounts sum to 9, total 10" in out.out
    assert "WRONG RESULT in hot-envelope" in out.err
