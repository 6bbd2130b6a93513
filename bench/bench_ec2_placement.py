"""Benchmark EC2 placement (decisions/ec2.py); prints one JSON object.

    PYTHONPATH=operator python3 bench/bench_ec2_placement.py [--tasks 200] [--repeat 20]

One placement round as the operator makes it for its EC2 pools: TASKS queued runs (Linux and
Windows, from 1 core to 500 GB, some with max_cores) against 3 pools (Linux general, Linux
large-RAM, Windows with reuse) that already hold 40 instances (pending, running, idle, ended,
orphaned). For each run: the pools of its platform by priority, the first whose types can hold
it, or Unschedulable; then, per pool, the launches within the caps and the terminations. The
figure is the median and the worst of REPEAT rounds. Target: at most 1 s a round.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

from testlooper.decisions.ec2 import (
    Ec2Demand, Ec2Pool, Instance, InstanceType, RunState, plan_launches, to_terminate, unschedulable,
)

T0 = 1_800_000_000.0
TARGET_SECONDS = 1.0
GENERAL = (InstanceType("t3.medium", 2, 4, 0.04), InstanceType("m5.xlarge", 4, 16, 0.19),
           InstanceType("m5.4xlarge", 16, 64, 0.77), InstanceType("c5.9xlarge", 36, 72, 1.53))
LARGE_RAM = (InstanceType("r5.8xlarge", 32, 256, 2.02), InstanceType("r5.24xlarge", 96, 768, 6.05),
             InstanceType("x1.16xlarge", 64, 976, 6.67))
POOLS = (
    Ec2Pool("linux", "linux", GENERAL, "ami-11111111", max_workers=40, max_cores=400, max_ram_gb=1600),
    Ec2Pool("linux-ram", "linux", LARGE_RAM, "ami-11111111", max_workers=6, max_cores=300, max_ram_gb=4000),
    Ec2Pool("windows", "windows", GENERAL, "ami-22222222", max_workers=12, max_cores=120, max_ram_gb=400,
            reuse=True, min_lifetime_seconds=3600),
)
PRIORITY = {"linux": 10, "linux-ram": 5, "windows": 10}


def world(tasks: int, rng: random.Random):
    demands = []
    for n in range(tasks):
        windows = rng.random() < 0.3
        ram = rng.choice([1, 2, 8, 16, 60] + ([] if windows else [200, 500]) + [5000] * (n % 50 == 0))
        demands.append(("windows" if windows else "linux",
                        Ec2Demand(f"run-{n}", rng.randint(0, 3), f"2026-12-01T08:{n // 60:02d}:{n % 60:02d}Z",
                                  rng.choice([1, 2, 4, 8, 16]), ram, rng.choice([None, None, None, 8]))))
    instances, runs = [], {}
    for n in range(40):
        pool = POOLS[n % 3]
        kind = pool.types[n % len(pool.types)]
        run_id = f"old-{n}"
        state = ["live", "live", "ended", "cancelled"][n % 4]
        if n % 10 != 9:  # every tenth instance's run is unknown: an orphan
            runs[run_id] = RunState(state, T0 - 30 if state == "live" else None)
        instances.append(Instance(f"i-{n:04d}", kind.type, "pending" if n % 5 == 0 else "running", run_id,
                                  T0 - 600 - n * 10, pool.name))
    for _platform, demand in demands:
        runs[demand.run_id] = RunState("live")
    return demands, instances, runs


def place_round(demands, instances, runs, now: float) -> dict:
    by_pool: dict[str, list[Ec2Demand]] = {pool.name: [] for pool in POOLS}
    unschedulable_runs = 0
    ordered = sorted(POOLS, key=lambda pool: (-PRIORITY[pool.name], pool.name))
    for platform_name, demand in demands:
        for pool in ordered:
            if pool.platform == platform_name and unschedulable(pool, demand) is None:
                by_pool[pool.name].append(demand)
                break
        else:
            unschedulable_runs += 1
    live = [run_id for run_id, state in runs.items() if state.phase == "live"]
    launches = reused = terminations = 0
    for pool in POOLS:
        planned = plan_launches(pool, instances, by_pool[pool.name], now=now, live_run_ids=live)
        launches += sum(1 for launch in planned if not launch.reuse_instance_id)
        reused += sum(1 for launch in planned if launch.reuse_instance_id)
        terminations += len(to_terminate(pool, instances, runs, now))
    return {"launches": launches, "reused": reused, "terminations": terminations, "unschedulable": unschedulable_runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args(argv)
    demands, instances, runs = world(options.tasks, random.Random(10))
    timings, outcome = [], {}
    for _ in range(options.repeat):
        started = time.perf_counter()
        outcome = place_round(demands, instances, runs, T0)
        timings.append(time.perf_counter() - started)
    median = statistics.median(timings)
    print(json.dumps({
        "bench": "ec2_placement", "python": platform.python_version(),
        "tasks": options.tasks, "pools": len(POOLS), "instances": len(instances), "repeat": options.repeat,
        "round_median_ms": round(median * 1e3, 3), "round_max_ms": round(max(timings) * 1e3, 3),
        "target_seconds": TARGET_SECONDS, "within_target": max(timings) <= TARGET_SECONDS,
        **outcome,
    }, indent=2))
    return 0 if max(timings) <= TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
