"""Chaos drills of the real system (``clients.chaos``) on the session's three-region cluster.

Proves, each under the bank workload through every node:
  * kill-owner, with a transfer load beside the bank (``--load``: Transfer and BatchTransfer
    calls on wallets of their own): a SIGKILLed owner's shards are served again by other
    nodes under higher epochs, the load keeps being acknowledged during the fault, and nothing
    acknowledged is lost (bank and load replay checks, every acknowledged transfer read back
    COMMITTED, one commit per acknowledged transfer in the journals, reconcile clean);
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


# The load of the kill-owner drill (transfers/s, items per BatchTransfer call): modest, so
# the drill stays short on a shared 2-core machine.
LOAD_RATE = 150.0
LOAD_BATCH = 50


async def drill(cluster, name: str, out_dir, seed: int, load_rate: float = 0.0):
    run = await run_drills(cluster, [name], DrillConfig(
        out_dir=out_dir, seconds=SECONDS, warmup_s=4.0, seed=seed, load_rate=load_rate,
        load_batch=LOAD_BATCH, load_wallets=64))
    [report] = run.scenarios
    # The outputs exist and say what the run said.
    doc = json.loads((out_dir / "report.json").read_text())
    assert doc["scenarios"][0]["name"] == name
    assert doc["scenarios"][0]["verdict"] == report.verdict
    assert doc["commit_path"]["journal_cas_serial_consistency"] == "SERIAL"
    assert doc["commit_path"]["commit_consistency"] == "QUORUM"
    page = (out_dir / "chaos.html").read_text()
    assert page.count("<svg") == (3 if load_rate else 2) and name in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    # The cluster is left healthy.
    assert all(s["running"] for s in cluster.status().values()), cluster.status()
    assert report.verdict == "PASS", report.problems
    assert report.counts_final["ok"] > 0 and report.counts_final["unknown"] == 0
    assert report.reconcile["clean"]
    assert report.evidence["journal_epochs_monotonic"]
    # Exactly once, counted in the journals: a commit per funding deposit and acknowledged
    # transfer, nothing more.
    assert report.evidence["commits_in_journals"] == report.evidence["commits_expected"]
    assert report.measured["lost"] == 0
    return report


def fault_window(report, fault: str):
    [window] = [w for w in report.windows if w.fault == fault]
    assert window.end_s is not None and window.end_s > window.start_s
    return window


async def test_kill_owner(three_regions, tmp_path):
    report = await drill(three_regions, "kill-owner", tmp_path, seed=11, load_rate=LOAD_RATE)
    window = fault_window(report, "kill-owner")
    # The load ran, was acknowledged during the fault, and lost nothing.
    load = report.load
    assert load["counts"]["ok"] > 0 and load["counts"]["unknown"] == 0, load["counts"]
    assert load["transfer"]["ok"] > 0 and load["batch"]["ok"] > 0, load
    assert load["lost"] == 0 and window.notes["load_lost"] == 0
    assert window.notes["load_acked"] > 0, window.notes
    assert window.notes["load_ack_gap_max_s"] is not None
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
    assert before, "the paused node owned no shard"
    # Once awake, every shard it owned when paused is owned under a higher epoch (by
    # another node, or by it after a fresh election), never under the epoch it slept with.
    after = {int(s): o for s, o in evidence["owners_after_resume"].items()}
    assert set(after) == set(before), evidence["owners_after_resume"]
    for shard, owner in after.items():
        assert owner is not None, f"shard {shard} has no owner after the resume"
        assert owner[2] > before[shard], (shard, owner, before[shard])
    # And of what it owns itself after waking, nothing is one of its old epochs.
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
