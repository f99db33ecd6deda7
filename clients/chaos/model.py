"""The plain data of a chaos run: its configuration and what each scenario saw."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DrillConfig:
    """What every scenario of a run uses."""

    out_dir: Path = Path("chaos-out")
    seconds: float = 30.0            # workload time per scenario (warm-up included), at least
    warmup_s: float = 5.0
    hold_s: float | None = None      # how long a fault lasts; default seconds / 3
    nodes_per_region: int = 1
    coordinators: int = 1            # coordinator-only nodes, spread over the regions
    shards: int = 16
    # 3 s / 1 s. etcd's shortest lease (2 s, grace 0.5 s: ``--lease-ttl-s 2
    # --takeover-grace-s 0.5``) failed over faster at load (2.3-4.5 s against 4.7-5.0 s) but
    # lost a lease it should have kept once, when a region came back (README, "Failover at
    # load").
    lease_ttl_s: float = 3.0
    takeover_grace_s: float = 1.0
    # ``ledgerd node --catch-up-wait-s``; None: ledgerd's default (300 s).
    catch_up_wait_s: float | None = None
    wallets: int = 24
    workers: int = 8
    seed: int = 1
    keep_data: bool = False          # keep a passed drill's keyspace (failed ones are kept)
    # Transfer load beside the bank (clients.load); 0 = none.
    load_rate: float = 0.0           # transfers/s, Transfer + BatchTransfer items together
    load_single_share: float = 0.2   # share of load_rate sent as single Transfer calls
    load_single_concurrency: int = 32
    load_batch: int = 200            # items per BatchTransfer call
    load_batch_inflight: int = 4
    load_wallets: int = 256
    # Callers of the load that send through the client library's own retries (one node
    # each); errors that reach them are counted (clients.load, "Library callers").
    load_library_callers: int = 4
    # hot-envelope: one LUCKY envelope of ``envelope_shares`` shares holding
    # ``envelope_total_minor``, open ``envelope_expiry_s`` (long enough to outlast both faults
    # and their heals, short enough to expire during the drill); ``envelope_receivers``
    # distinct wallets (fewer than the shares: it never sells out) grab it once each, paced
    # evenly until shortly before the expiry, ``envelope_single_share`` of them through
    # GrabEnvelope and the rest in GrabEnvelopes batches of ``envelope_batch``.
    envelope_shares: int = 2000
    envelope_total_minor: int = 200_000
    envelope_receivers: int = 1800
    envelope_expiry_s: float = 180.0
    envelope_single_share: float = 0.3
    envelope_singles: int = 8            # GrabEnvelope calls in flight at most
    envelope_batch: int = 20             # items per GrabEnvelopes call
    envelope_batches_inflight: int = 2

    @property
    def fault_hold_s(self) -> float:
        return self.hold_s if self.hold_s is not None else max(5.0, self.seconds / 3)


@dataclass
class FaultWindow:
    """One fault, from its injection to its heal, in seconds since the workload's t0."""

    fault: str
    target: str
    start_s: float
    end_s: float | None = None
    notes: dict = field(default_factory=dict)


@dataclass
class ScenarioReport:
    """What one scenario saw, and its verdict."""

    name: str
    verdict: str = "FAIL"
    deployment: dict = field(default_factory=dict)
    windows: list[FaultWindow] = field(default_factory=list)
    counts_run: dict = field(default_factory=dict)     # at the end of the run
    counts_final: dict = field(default_factory=dict)   # after settle
    measured: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reconcile: dict = field(default_factory=dict)
    ownership_changes: list = field(default_factory=list)
    series: dict = field(default_factory=dict)         # per-second figures (checks.series)
    duration_s: float = 0.0
    ops_plot: list = field(default_factory=list)       # (started, finished, result), for the picture
    load: dict = field(default_factory=dict)           # the transfer load's figures (--load)
    load_plot: list = field(default_factory=list)      # (started, finished, result) of load ops
    envelope: dict = field(default_factory=dict)       # hot-envelope: the grabs' figures
    envelope_plot: list = field(default_factory=list)  # (started, finished, result) of grabs

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("ops_plot")
        out.pop("load_plot")
        out.pop("envelope_plot")
        return out


@dataclass
class RunReport:
    """Every scenario of one run, and where its report and picture were written."""

    scenarios: list[ScenarioReport]
    config: dict
    commit_path: dict
    started_at: str
    git_commit: str
    report_path: Path | None = None
    html_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(s.verdict == "PASS" for s in self.scenarios)
