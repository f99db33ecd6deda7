"""``ledger-chaos``: fault drills of a real deployment under the bank workload (Jepsen style).

    ledger-chaos [SCENARIO ...] [--regions r1,r2,r3] [--seconds N] [--out DIR]
                 [--cassandra-ports CQL[,STORAGE]] [--etcd-ports CLIENT[,PEER]]
                 [--run-dir DIR] [--keep-cluster] [--keep-data] [--seed N]
                 [--nodes-per-region N] [--coordinators N] [--shards N]
                 [--load RATE] [--load-single-share F] [--load-batch N] [--load-wallets N]
                 [--envelope-shares N] [--envelope-receivers N] [--envelope-expiry-s S]

Scenarios (default: every one but ``random``):

* ``kill-owner``: SIGKILL a ledger node that owns shards; restart it after the hold.
* ``pause-owner``: SIGSTOP an owner longer than its lease, then SIGCONT. Its shards must be
  taken over under higher epochs while it sleeps; once awake it must neither append (a direct
  append with its old epoch is refused by the journal fence, and no batch of its old epoch
  appears after the takeover) nor answer as owner (its log shows it stepping down).
* ``kill-coordinator``: SIGKILL the coordinator-only node(s) while clients use them.
* ``kill-cassandra-node``: SIGKILL one region's Cassandra node; restart it after the hold.
* ``kill-region``: SIGKILL every process of one region (its ledger nodes and its Cassandra
  node); measures the time from the kill until every shard it owned answers GetWallet again,
  owned by another region, through a surviving node.
* ``restart-etcd``: stop etcd longer than a lease, start it again.
* ``hot-envelope``: one LUCKY red envelope of ``--envelope-shares`` shares (2,000; its nodes
  run with ``--envelope-shares-max`` that high) expiring ``--envelope-expiry-s`` later,
  grabbed once by each of ``--envelope-receivers`` distinct wallets (fewer than the shares),
  paced evenly through every node (GrabEnvelope and GrabEnvelopes batches, transient answers
  resent with the same key) until shortly before the expiry, while the drill SIGKILLs the
  owner of the envelope's shard (restarted after the hold) and then kills the whole region
  that owns the shard (restarted after the hold). After the expiry the owners' sweep must
  refund the rest. Checked (``clients.chaos.envelope``): no share granted twice (GetEnvelope's
  positions are 0..n-1, its receivers distinct, n = acknowledged grabs + unanswered grabs
  the ledger holds), no acknowledged grab lost (each is in GetEnvelope with its amount and
  position), every grab credited exactly once (each receiver's balance is its share,
  GetTransfer says credited), the rest refunded exactly (REFUNDED, refunded = total -
  grabbed, the sender holds initial - total + refunded), one commit per envelope transfer in
  the journals, and ``ledgerctl envelope show`` exits 0 and agrees.
* ``drain-region``: a planned drain and return of one region under a transfer load (at
  ``--load``, or 60 transfers/s without it; some of its callers send through the client
  library with its own retries): ``ledgerctl failover --from R --to S``, held, then
  ``ledgerctl failback --region R``. Measured: the time until every moved shard is served in
  S and back in R, and the longest stretch without an acknowledged transfer on the moved
  shards (against 1 s, reported), beside the same per-shard figure over a calm stretch before.
  Any error that reaches a library caller is a problem: a planned drain shows clients none.
* ``random``: a seeded mix of three of the single faults above, one after the other.

Each scenario starts a fresh ``Deployment`` (its own keyspace and etcd prefix) on the running
``LocalCluster`` (started here unless one is running in ``--run-dir``), runs the bank workload
through every node, warms up, injects its fault while the workload runs, heals (restarts what
was killed), waits until every shard is served again, keeps the workload running for a
recovery window, then settles every unanswered request, runs the bank's replay check, checks
that writer epochs never go back in any journal, and reconciles the store.

With ``--load RATE`` a transfer load (``clients.load``) runs beside the bank on wallets of its
own: concurrent ``Transfer`` calls and ``BatchTransfer`` calls at RATE transfers a second
together (``--load-single-share`` of it as single calls), every request resent with its key
until answered. After the run every acknowledged load transfer is read back with
``GetTransfer`` (COMMITTED, its amount and wallets: otherwise it is *lost*), the load's
wallets must hold their initial balances plus the acknowledged transfers, and reconcile must
count exactly one commit per funding deposit and acknowledged transfer (bank and load: nothing
committed twice, nothing committed that was refused). Per fault window the report gives the
load's acknowledged transfers during the window, how many of them are lost (must be 0), and
the longest gap without an acknowledged transfer.

Verdict: PASS iff the bank check found no problem (no acknowledged transfer lost, none applied
twice, nothing left unanswered), reconcile is clean, the journals are fenced, and the fault was
observed to happen. Output in ``--out``: ``report.json`` (per scenario: verdict, fault windows,
counts, measured failover/recovery times, problems, reconcile summary) and ``chaos.html`` (one
self-contained page, inline SVG: acknowledged transfers per second and latency p50/p99 per
second, fault windows shaded), plus the nodes' logs. Exit code 0 iff every scenario passed.

A drill sees the ledger only as a user or operator could: the client library and the gRPC
stubs, ``ledgerctl`` (as a subprocess, ``--json``) for what only the store and the shard map
show, etcd's owner keys, and process control (``clients.harness``, ``clients.localcluster``).

Modules, one job each: ``drills`` (the scenarios and their fault injection), ``envelope``
(the hot envelope's grabbers and their checks), ``observe``
(etcd owners), ``ledgerctl`` (the operator CLI calls), ``checks`` (the pure figures and
checks of a verdict), ``report`` (report.json, the SVG/HTML page, the summary line),
``runner`` (a run of scenarios), ``gitinfo`` (the commit under test), ``cli``
(``ledger-chaos``), ``constants`` and ``model`` (the run's limits and plain data).

Library use (tests): ``await run_drills(cluster, ["kill-owner"], DrillConfig(out_dir=...))``
on an already running cluster; every Cassandra node and etcd it stopped is running again when
it returns.
"""


from clients.chaos.cli import main
from clients.chaos.constants import ALL_SCENARIOS, FAILOVER_TARGET_S, SCENARIOS
from clients.chaos.drills import Drill, plan_steps
from clients.chaos.ledgerctl import probe_wallets
from clients.chaos.model import DrillConfig, FaultWindow, RunReport, ScenarioReport
from clients.chaos.observe import OwnerWatcher
from clients.chaos.report import render_html, summary_line, write_report
from clients.chaos.runner import run_drills

__all__ = ["ALL_SCENARIOS", "FAILOVER_TARGET_S", "SCENARIOS", "Drill", "DrillConfig",
           "FaultWindow", "OwnerWatcher", "RunReport", "ScenarioReport", "main", "plan_steps",
           "probe_wallets", "render_html", "run_drills", "summary_line", "write_report"]
