"""Chaos drills of the real system (``clients.chaos``) on the session's three-region cluster.

Proves, each under the bank workload through every node:
  * kill-owner: a SIGKILLed owner's shards are served again by other nodes under higher
    epochs, and nothing acknowledged is lost (replay check, reconcile clean);
  * pause-owner: an owner paused past its lease is taken over under higher epochs while it
    sleeps; once resumed it holds none of its old epochs, its old epoch appends nothing more,
    and a direct append with its old epoch is refused by the journal fence;
  * kill-region: with every process of one region killed (ledger nodes and its Cassandra
    node), every shard that region owned answers again through a surviving node, owned by
    another region, and the failover time is measured;
  * every drill writes its JSON report and its self-contained picture, and leaves the cluster
    as it found it (every Cassandra node and etcd running).

Each drill starts its own deployment (keyspace and etcd prefix), so they are independent.
"""

from __future__ import annotations

import json

import pytest

from clients.chaos import FAILOVER_TARGET_S, DrillConfig, run_drills

# Generous: on an idle machine a drill takes about a minute, but a Cassandra restart under
# load (other suites sharing two cores) was seen to take two minutes.
pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

# Short drills: warm-up, the fault, the heal and a recovery window.
SECONDS = 15.0


@pytest.fixture
def three_regions(local_cluster):
    if len(local_cluster.regions) < 3:
        pytest.skip("drills need three regions (LEDGER_TEST_REGIONS)")
    return local_cluster


async def drill(cluster, name: str, out_dir, seed: int):
    run = await run_drills(cluster, [name], DrillConfig(out_dir=out_dir, seconds=SECONDS,
                                                        warmup_s=4.0, seed=seed))
    [report] = run.scenarios
    # The outputs exist and say what the run said.
    doc = json.loads((out_dir / "report.json").read_text())
    assert doc["scenarios"][0]["name"] == name
    assert doc["scenarios"][0]["verdict"] == report.verdict
    assert doc["commit_path"]["journal_cas_serial_consistency"] == "SERIAL"
    assert doc["commit_path"]["commit_consistency"] == "QUORUM"
    page = (out_dir / "chaos.html").read_text()
    assert page.count("<svg") == 2 and name in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    # The cluster is left healthy.
    assert all(s["running"] for s in cluster.status().values()), cluster.status()
    assert report.verdict == "PASS", report.problems
    assert report.counts_final["ok"] > 0 and report.counts_final["unknown"] == 0
    assert report.reconcile["clean"]
    assert report.evidence["journal_epochs_monotonic"]
    return report


def fault_window(report, fault: str):
    [window] = [w for w in report.windows if w.fault == fault]
    assert window.end_s is not None and window.end_s > window.start_s
    return window


async def test_kill_owner(three_regions, tmp_path):
    report = await drill(three_regions, "kill-owner", tmp_path, seed=11)
    window = fault_window(report, "kill-owner")
    owners = window.notes["owners_during_fault"]
    assert set(owners) == {str(s) for s in window.notes["shards"]}
    for shard, (node, _region, epoch) in owners.items():
        assert node != window.target
        assert epoch > window.notes["epochs_before"][shard]
    assert report.measured["failover_s"]["max"] is not None


async def test_pause_owner(three_regions, tmp_path):
    report = await drill(three_regions, "pause-owner", tmp_path, seed=12)
    evidence = report.evidence["pause-owner"]
    assert evidence["paused_s"] > 3.0  # longer than the 3 s lease
    assert evidence["epochs_changed"], evidence["owners_while_paused"]
    before = {int(s): e for s, e in evidence["epochs_before"].items()}
    assert all(int(s) not in before or e > before[int(s)]
               for s, e in evidence["owns_after_resume"].items())
    assert evidence["stale_append_probe"]["refused"], evidence["stale_append_probe"]
    assert "epoch" in evidence["stale_append_probe"]["error"]
    assert evidence["old_epoch_appends_after_resume"] == 0
    assert report.measured["failover_s"]["max"] is not None


async def test_kill_region(three_regions, tmp_path):
    report = await drill(three_regions, "kill-region", tmp_path, seed=13)
    window = fault_window(report, "kill-region")
    evidence = report.evidence["kill-region"]
    assert evidence["shards"], "the killed region owned no shard"
    assert evidence["served_elsewhere"], evidence["owners_during_fault"]
    assert all(region != evidence["region"]
               for _node, region, _epoch in evidence["owners_during_fault"].values())
    failover_s = report.measured["failover_s"]["max"]
    assert failover_s is not None and window.notes["served_again_s"] == failover_s
    # Reported, not asserted: the target is for an unloaded machine.
    print(f"kill-region failover {failover_s:.2f} s (target {FAILOVER_TARGET_S:.0f} s)")
