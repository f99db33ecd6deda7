"""Run simulation seeds from the command line and print what they found.

    .venv/bin/python -m tests.sim 17            one seed, with the end of its trace if it fails
    .venv/bin/python -m tests.sim 0-199         a range of seeds, one line each
    .venv/bin/python -m tests.sim 17 --trace    the whole trace of a seed
    .venv/bin/python -m tests.sim 17 --digest   only the SHA-256 of the seed's trace
    .venv/bin/python -m tests.sim 0-99 --set store.append_timeout_unavailable=0.1 \\
        --set workload.reuse=0 --set strict_durability=False
                                                change what the seed drew (``SimConfig``)
"""

from __future__ import annotations

import ast
import sys
import time

from tests.sim.simulator import SimConfig, simulate


def configure(seed: int, overrides: list[str]) -> SimConfig:
    """The seed's config with ``name=value`` / ``part.name=value`` overrides applied."""
    config = SimConfig.from_seed(seed)
    for override in overrides:
        path, _, text = override.partition("=")
        value = ast.literal_eval(text)
        *parents, name = path.split(".")
        target: object = config
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(target, dict):
            target[name] = value
        else:
            setattr(target, name, value)
    return config


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    spec = argv[0]
    first, _, last = spec.partition("-")
    seeds = range(int(first), int(last or first) + 1)
    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    failed = 0
    for seed in seeds:
        started = time.perf_counter()
        result = simulate(seed, configure(seed, overrides))
        took = time.perf_counter() - started
        if "--digest" in argv:
            print(result.digest())
            continue
        if "--trace" in argv:
            print("\n".join(result.trace))
        status = "FAIL " + result.failure if result.failure else "ok"
        print(f"seed {seed}: {status} ({took:.2f}s, {result.virtual_s:.0f}s virtual, "
              f"{result.appends} appends, {result.ops_done} ops, {result.retries} retries)",
              flush=True)
        if result.failure:
            failed += 1
            if len(seeds) == 1 and "--trace" not in argv:
                print(result.explain())
    if "--digest" not in argv:
        print(f"{failed} of {len(seeds)} seeds failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
