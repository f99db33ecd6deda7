"""What the bench reads from outside the ledger: process and thread CPU from ``/proc``, and the
ledger's Prometheus counters from its ``/metrics`` endpoint, each before and after a workload.

Why ``/proc`` and not psutil: psutil gives a process's CPU times but not a thread's name, and
the embedded store is a thread of the ledger process (``sqlite-store``, named in the kernel by
the ledger): its share needs ``/proc/<pid>/task/<tid>/stat`` anyway, so one small parser
serves both. The parsing is pure (``parse_stat``) and unit-tested.

Why ``prometheus_client.parser``: it is the reference parser of the exposition format the
ledger serves (the same distribution the ledger uses to serve it).
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# Kernel clock ticks per second: the unit of utime/stime in /proc/<pid>/stat.
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Deadline of one /metrics scrape (s): the endpoint answers from memory.
SCRAPE_TIMEOUT_S = 10.0
# The ledger's embedded store thread, as the kernel names it (ledger/store/sqlite.py).
SQLITE_STORE_THREAD = "sqlite-store"
# The counters the bench turns into "per committed transfer" figures: result field -> the
# sample name the ledger exposes (ledger/metrics.py).
PER_TRANSFER_COUNTERS = {
    "appends_per_transfer": "ledger_store_appends_total",
    "rows_per_transfer": "ledger_store_rows_written_total",
    "lwt_per_transfer": "ledger_store_lwt_total",
    "statements_per_transfer": "ledger_store_statements_total",
    "transactions_per_transfer": "ledger_store_transactions_total",
}
# The server's own count of committed transfers (a cross-check of the bench's count).
COMMITTED_COUNTER = "ledger_transfers_committed_total"
# The process CPU the ledger reports itself (prometheus_client's process collector): the CPU
# source against a running ledger whose pid the bench was not given.
PROCESS_CPU_COUNTER = "process_cpu_seconds_total"


def parse_stat(text: str) -> tuple[str, float]:
    """(comm, user + system CPU seconds) from the text of a ``/proc/.../stat`` file.

    The command name is in parentheses and may itself hold spaces and parentheses, so the
    fields are counted from the last ``)``: after it come state (field 3), ..., utime (14)
    and stime (15).
    """
    open_at, close_at = text.index("("), text.rindex(")")
    comm = text[open_at + 1:close_at]
    rest = text[close_at + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])
    return comm, (utime + stime) / CLOCK_TICKS_PER_S


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used, all its threads together."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())[1]


def thread_cpu_s(pid: int, name: str) -> float:
    """CPU seconds of the threads of ``pid`` that the kernel names ``name`` (0.0 if none).

    A thread that ended between listing and reading is skipped: its time is gone from
    ``/proc`` (a store thread lives as long as the ledger).
    """
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm, cpu = parse_stat((task / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm == name:
            total += cpu
    return total


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, by sample name, labels summed over.

    ``ledger_store_appends_total`` is a sample of the family ``ledger_store_appends``; the
    bench only needs totals, so samples that differ only by labels are added up.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def scrape(url: str) -> dict[str, float]:
    """Fetch and parse one ``/metrics`` endpoint."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return parse_metrics(response.read().decode())


def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each counter moved between two scrapes (absent before counts as 0)."""
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


@dataclass
class Sample:
    """One reading of everything the bench watches, taken at one moment."""

    ledger_cpu_s: float = 0.0           # the ledger processes, all threads
    store_cpu_s: float = 0.0            # store processes, or the embedded store thread
    bench_cpu_s: float = 0.0            # this load generator
    load_1m: float = 0.0                # the machine's 1-minute load average
    counters: dict[str, float] = field(default_factory=dict)


@dataclass
class Probe:
    """Where to read: the ledger's pids, the store's pids (Cassandra's java processes), the
    name of a store thread inside the ledger (embedded), and the /metrics URLs (one per
    ledger process; their counters are added up)."""

    ledger_pids: list[int] = field(default_factory=list)
    store_pids: list[int] = field(default_factory=list)
    store_thread: str | None = None
    metrics_urls: list[str] = field(default_factory=list)

    def sample(self) -> Sample:
        counters: dict[str, float] = {}
        for url in self.metrics_urls:
            for name, value in scrape(url).items():
                counters[name] = counters.get(name, 0.0) + value
        store = sum(process_cpu_s(p) for p in self.store_pids)
        if self.store_thread:
            store += sum(thread_cpu_s(p, self.store_thread) for p in self.ledger_pids)
        ledger = sum(process_cpu_s(p) for p in self.ledger_pids)
        if not self.ledger_pids and PROCESS_CPU_COUNTER in counters:
            # A running ledger whose pid was not given: its own report of its CPU.
            ledger = counters[PROCESS_CPU_COUNTER]
        return Sample(ledger, store, process_cpu_s(os.getpid()), os.getloadavg()[0], counters)

    @property
    def has_ledger_cpu(self) -> bool:
        return bool(self.ledger_pids or self.metrics_urls)

    @property
    def has_store_cpu(self) -> bool:
        # A store thread is read inside the ledger processes: only if their pids are known.
        return bool(self.store_pids or (self.store_thread and self.ledger_pids))


def costs(before: Sample, after: Sample, committed: int, seconds: float, probe: Probe) -> dict:
    """The per-transfer and CPU figures of one workload, from the samples around it.

    * ``cpu_us_per_transfer``: ledger process CPU (every thread, the embedded store's too)
      per committed transfer, in microseconds;
    * ``ledger_cpu_pct`` / ``store_cpu_pct`` / ``bench_cpu_pct``: CPU used during the
      workload, in percent of one core (200 = both cores of a 2-core machine);
    * ``store_cpu_share``: the store's part of the server side's CPU (ledger processes plus
      store processes; an embedded store thread is counted once, as the store's);
    * ``<counter>_per_transfer``: store work per committed transfer (``PER_TRANSFER_COUNTERS``);
    * ``load_1m``: the machine's 1-minute load average at the end (on a shared machine, a
      load well above what the ledger, its store and the bench use says others were busy).

    A figure that cannot be measured (no pid, no metrics, nothing committed) is None.
    """
    row: dict = {}
    ledger = after.ledger_cpu_s - before.ledger_cpu_s
    store = after.store_cpu_s - before.store_cpu_s
    bench = after.bench_cpu_s - before.bench_cpu_s

    def pct(cpu_s: float) -> float | None:
        return round(100 * cpu_s / seconds, 1) if seconds > 0 else None
    row["ledger_cpu_pct"] = pct(ledger) if probe.has_ledger_cpu else None
    row["store_cpu_pct"] = pct(store) if probe.has_store_cpu else None
    row["bench_cpu_pct"] = pct(bench)
    row["cpu_us_per_transfer"] = (round(ledger * 1e6 / committed, 1)
                                  if committed and probe.has_ledger_cpu else None)
    row["store_cpu_us_per_transfer"] = (round(store * 1e6 / committed, 1)
                                        if committed and probe.has_store_cpu else None)
    # The embedded store thread's time is inside the ledger's: do not count it twice.
    server = ledger + (0.0 if probe.store_thread else store)
    row["store_cpu_share"] = (round(store / server, 3)
                              if server > 0 and probe.has_store_cpu and probe.has_ledger_cpu
                              else None)
    moved = diff(before.counters, after.counters)
    for key, counter in PER_TRANSFER_COUNTERS.items():
        row[key] = (round(moved[counter] / committed, 3)
                    if committed and counter in moved else None)
    row["load_1m"] = round(after.load_1m, 2)
    row["server_committed"] = int(moved[COMMITTED_COUNTER]) if COMMITTED_COUNTER in moved \
        else None
    return row
