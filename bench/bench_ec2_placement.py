"""Benchmark EC2 placement as the operator makes it (decisions/); prints one JSON object.

    PYTHONPATH=operator python3 bench/bench_ec2_placement.py [--tasks 200] [--repeat 20]

One round for TASKS queued runs (Linux and Windows, from 1 core to 5000 GB, some with
max_cores, one TestRun each) against 3 EC2 pools (Linux general, Linux large-RAM, Windows) that
already hold 40 instances (pending, running, orphaned): for each TestRun the placement its first
decision makes (`pools.pool_for`, else `ec2.unschedulable_on_ec2`); then the admission round
(what the instances hold, `ec2.usage`; each run at its instance type's size,
`ec2.sized_for_instances`; `pools.admit` within the caps, by priority); and the sweep's
`ec2.orphans`. The figure is the median and the worst of REPEAT rounds. Target: at most 1 s.
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
    Ec2Pool, Instance, orphans, sized_for_instances, unschedulable_on_ec2, usage,
)
from testlooper.decisions.pools import Demand, Usage, admit, pool_for

T0 = 1_800_000_000.0
TARGET_SECONDS = 1.0
GENERAL = [{"type": "t3.medium", "cores": 2, "ramGb": 4, "hourlyPrice": 0.04},
           {"type": "m5.xlarge", "cores": 4, "ramGb": 16, "hourlyPrice": 0.19},
           {"type": "m5.4xlarge", "cores": 16, "ramGb": 64, "hourlyPrice": 0.77},
           {"type": "c5.9xlarge", "cores": 36, "ramGb": 72, "hourlyPrice": 1.53}]
LARGE_RAM = [{"type": "r5.8xlarge", "cores": 32, "ramGb": 256, "hourlyPrice": 2.02},
             {"type": "r5.24xlarge", "cores": 96, "ramGb": 768, "hourlyPrice": 6.05},
             {"type": "x1.16xlarge", "cores": 64, "ramGb": 976, "hourlyPrice": 6.67}]


def ec2_pool(name, platform_name, types, priority, **caps):
    ami = "windowsAmi" if platform_name == "windows" else "linuxAmi"
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"provider": "ec2", "platform": platform_name, "priority": priority, **caps,
                     "ec2": {"region": "us-east-1", ami: "ami-11111111", "instanceTypes": types}}}


POOLS = [ec2_pool("linux", "linux", GENERAL, 10, maxWorkers=40, maxCores=400, maxRamGb=1600),
         ec2_pool("linux-ram", "linux", LARGE_RAM, 5, maxWorkers=6, maxCores=300, maxRamGb=4000),
         ec2_pool("windows", "windows", GENERAL, 10, maxWorkers=12, maxCores=120, maxRamGb=400)]


def world(tasks: int, rng: random.Random):
    testruns = []
    for n in range(tasks):
        windows = rng.random() < 0.3
        ram = rng.choice([1, 2, 8, 16, 60] + ([] if windows else [200, 500]) + [5000] * (n % 50 == 0))
        definition = {"platform": "windows" if windows else "linux", "min_cores": rng.choice([1, 2, 4, 8, 16]),
                      "min_ram_gb": ram, **({"max_cores": 8} if rng.random() < 0.25 else {})}
        testruns.append({"metadata": {"namespace": "ns", "name": f"t{n}",
                                      "creationTimestamp": f"2026-12-01T08:{n // 60:02d}:{n % 60:02d}Z"},
                         "spec": {"runs": 1, "priority": rng.randint(0, 3), "definition": definition}})
    instances = []
    for n in range(40):
        pool = POOLS[n % 3]
        types = pool["spec"]["ec2"]["instanceTypes"]
        # every tenth instance carries a run no TestRun has: an orphan
        run_id = f"ns.old{n}.1.1" if n % 10 == 9 else f"ns.t{n}.1.1"
        instances.append(Instance(f"i-{n:04d}", types[n % len(types)]["type"], "pending" if n % 5 == 0 else "running",
                                  run_id, T0 - 600 - n * 10, pool["metadata"]["name"]))
    return testruns, instances


def place_round(testruns, instances, now: float) -> dict:
    placed, demands, unschedulable_runs = {}, [], 0
    for testrun in testruns:
        definition = testrun["spec"]["definition"]
        pool = pool_for(definition, "", POOLS)
        if pool is None:
            unschedulable_runs += unschedulable_on_ec2(definition, POOLS) is not None
            continue
        placed[testrun["metadata"]["name"]] = pool
        demands.append(Demand(("ns", testrun["metadata"]["name"]), pool, testrun["spec"]["priority"],
                              testrun["metadata"]["creationTimestamp"], definition["min_cores"],
                              definition["min_ram_gb"], 1))
    held = {}
    for pool in POOLS:
        workers, cores, ram = usage(Ec2Pool.from_resource(pool), instances)
        held[pool["metadata"]["name"]] = Usage(workers, cores, ram)
    admitted = admit(POOLS, held, sized_for_instances(demands, POOLS, testruns))
    live = {f"ns.{name}.1.1" for name in placed}
    reaped = sum(len(orphans([i for i in instances if i.pool == pool["metadata"]["name"]], live, now))
                 for pool in POOLS)
    return {"launches": sum(admitted.values()), "queued": len(demands) - sum(admitted.values()),
            "orphans": reaped, "unschedulable": unschedulable_runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args(argv)
    testruns, instances = world(options.tasks, random.Random(10))
    timings, outcome = [], {}
    for _ in range(options.repeat):
        started = time.perf_counter()
        outcome = place_round(testruns, instances, T0)
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
