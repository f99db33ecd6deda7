"""A chaos run: scenarios one after the other on a running cluster, the report rewritten
after each."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path

from clients.chaos import ledgerctl
from clients.chaos.constants import ALL_SCENARIOS
from clients.chaos.drills import Drill, plan_steps
from clients.chaos.gitinfo import git_commit
from clients.chaos.model import DrillConfig, RunReport
from clients.chaos.report import summary_line, write_report


async def commit_path_consistency() -> dict:
    """The consistency levels of the commit path, as ``ledgerctl commit-path`` reports them."""
    return await ledgerctl.run_json(["commit-path"], ok_codes=(0,))


async def run_drills(cluster, scenarios: list[str], config: DrillConfig) -> RunReport:
    """Run ``scenarios`` one after the other on a running ``cluster``; write the report and
    the picture into ``config.out_dir``.

    Every Cassandra node and etcd a drill stopped is running again when it returns.

    Raises:
        ValueError: an unknown scenario name.
    """
    for name in scenarios:
        if name not in ALL_SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(ALL_SCENARIOS)}")
    config.out_dir = Path(config.out_dir)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    run = RunReport([], {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(config).items()},
                    await commit_path_consistency(), time.strftime("%Y-%m-%d %H:%M:%S"),
                    git_commit())
    for name in scenarios:
        drill = Drill(cluster, name, config, random.Random(rng.randrange(1 << 30)))
        report = await drill.run(plan_steps(name, drill.rng, config))
        run.scenarios.append(report)
        print(summary_line(report), flush=True)
        write_report(run)
    return run
