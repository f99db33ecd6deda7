"""``ledgerctl top``: a live terminal view of the cluster, from the nodes' ``/metrics``.

One row per node, grouped by region: shards served, commands and appends per second (and so
the group-commit size), mean append latency, queued commands, credits owed to other shards
and the oldest one's age, takeovers and store errors since the view started; a total row per
region. It refreshes every ``--interval`` seconds (``rich``'s live display); ``--once`` prints
one frame (two scrapes ``--interval`` apart) and exits, for scripts and for the README.

Rates are differences of counters between two scrapes; a node that restarted in between
(counters went back) shows no rate for that frame.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

SCRAPE_TIMEOUT_S = 5.0


@dataclass
class NodeView:
    """What one scrape says of one node."""

    node: str
    region: str = "?"
    shards: int = 0
    commands: float = 0.0
    appends: float = 0.0
    append_s: float = 0.0
    queue: float = 0.0
    owed: float = 0.0
    lag_s: float = 0.0
    takeovers: float = 0.0
    store_errors: float = 0.0
    calls: float = 0.0
    failed_calls: float = 0.0


def scrape(url: str) -> dict[str, NodeView]:
    """One ``/metrics`` endpoint, by node (a process normally serves one)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    nodes: dict[str, NodeView] = {}
    process: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            node = s.labels.get("node")
            if node is None:
                if s.name == "ledger_grpc_server_handled_total":
                    process["calls"] = process.get("calls", 0.0) + s.value
                    if s.labels.get("grpc_code") not in ("OK", "CANCELLED"):
                        process["failed"] = process.get("failed", 0.0) + s.value
                elif s.name in ("ledger_takeovers_total", "ledger_store_errors_total"):
                    process[s.name] = process.get(s.name, 0.0) + s.value
                continue
            v = nodes.setdefault(node, NodeView(node))
            if s.name == "ledger_node_info":
                v.region = s.labels.get("region", "?")
            elif s.name == "ledger_shard_owned":
                v.shards += int(s.value)
            elif s.name == "ledger_shard_commands_total":
                v.commands += s.value
            elif s.name == "ledger_shard_appends_total":
                v.appends += s.value
            elif s.name == "ledger_shard_append_seconds_total":
                v.append_s += s.value
            elif s.name == "ledger_shard_queue_commands":
                v.queue += s.value
            elif s.name == "ledger_shard_outbox_credits":
                v.owed += s.value
            elif s.name == "ledger_shard_credit_lag_seconds":
                v.lag_s = max(v.lag_s, s.value)
    # Process-wide counters belong to the process's node (one node per ledgerd process).
    if len(nodes) == 1:
        (v,) = nodes.values()
        v.calls, v.failed_calls = process.get("calls", 0.0), process.get("failed", 0.0)
        v.takeovers = process.get("ledger_takeovers_total", 0.0)
        v.store_errors = process.get("ledger_store_errors_total", 0.0)
    return nodes


def scrape_all(urls: list[str]) -> tuple[dict[str, NodeView], list[str]]:
    """Every endpoint; the ones that did not answer are named, not fatal."""
    views: dict[str, NodeView] = {}
    down = []
    for url in urls:
        try:
            views.update(scrape(url))
        except OSError as exc:
            down.append(f"{url}: {exc}")
    return views, down


def frame(before: dict[str, NodeView], after: dict[str, NodeView], dt_s: float,
          down: list[str], first: dict[str, NodeView]) -> Table:
    """The table of one refresh: rates between ``before`` and ``after``; takeovers and
    store errors since ``first``."""
    table = Table(title=f"redledger  {time.strftime('%H:%M:%S')}  "
                        f"{len(after)} node(s)" + (f", {len(down)} not answering" if down
                                                  else ""))
    for name, justify in (("region", "left"), ("node", "left"), ("shards", "right"),
                          ("cmds/s", "right"), ("appends/s", "right"), ("cmds/append", "right"),
                          ("append ms", "right"), ("calls/s", "right"), ("failed/s", "right"),
                          ("queued", "right"), ("owed credits", "right"),
                          ("oldest owed s", "right"), ("takeovers", "right"),
                          ("store errors", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    regions: dict[str, list[tuple]] = {}
    for node, v in sorted(after.items(), key=lambda kv: (kv[1].region, kv[0])):
        b = before.get(node)
        f = first.get(node, v)

        cmds, appends, secs, calls, failed = (
            _rate(b, v, attr, dt_s)
            for attr in ("commands", "appends", "append_s", "calls", "failed_calls"))
        row = (v.shards, cmds, appends, (cmds / appends) if cmds is not None and appends
               else None, (secs / appends * 1000) if secs is not None and appends else None,
               calls, failed, v.queue, v.owed, v.lag_s, v.takeovers - f.takeovers,
               v.store_errors - f.store_errors)
        regions.setdefault(v.region, []).append((node, row))
    for region, rows in regions.items():
        for node, row in rows:
            table.add_row(region, node, *_cells(row))
        if len(rows) > 1:
            totals = tuple(_sum([r[i] for _, r in rows]) for i in range(len(rows[0][1])))
            table.add_row(region, "[b]all[/b]", *_cells(totals), style="bold")
    for line in down:
        table.caption = (table.caption or "") + f"not answering: {line}\n"
    return table


def _rate(before: NodeView | None, after: NodeView, attr: str, dt_s: float) -> float | None:
    """A counter's rate between two scrapes; None if unknown (no earlier scrape, or the
    node restarted and its counters went back)."""
    if before is None or dt_s <= 0 or getattr(after, attr) < getattr(before, attr):
        return None
    return (getattr(after, attr) - getattr(before, attr)) / dt_s


def _sum(values: list) -> float | None:
    known = [x for x in values if x is not None]
    return sum(known) if known else None


def _cells(row: tuple) -> list[str]:
    out = []
    for x in row:
        if x is None:
            out.append("-")
        elif isinstance(x, float) and not x.is_integer():
            out.append(f"{x:,.1f}")
        else:
            out.append(f"{int(x):,}")
    return out


def run(urls: list[str], interval_s: float, once: bool, console: Console | None = None) -> int:
    """Show the view until interrupted (or one frame with ``once``). Exit 1 if no endpoint
    ever answered."""
    console = console or Console()
    first, down = scrape_all(urls)
    if not first:
        console.print("ledgerctl top: no metrics endpoint answered:\n  " + "\n  ".join(down))
        return 1
    before, at = first, time.monotonic()
    if once:
        time.sleep(interval_s)
        after, down = scrape_all(urls)
        console.print(frame(before, after, time.monotonic() - at, down, first))
        return 0
    with Live(frame(before, before, 0.0, down, first), console=console,
              refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval_s)
                after, down = scrape_all(urls)
                now = time.monotonic()
                live.update(frame(before, after, now - at, down, first))
                before, at = after, now
        except KeyboardInterrupt:
            return 0
