"""Benchmark the local scheduler's own cost; prints one JSON object.

    PYTHONPATH=operator python3 bench/bench_schedule.py

Drives `testlooper.local.schedule.Schedule` as the local runner does, with no process behind
any run: 16 jobs on a 16-core machine, a build that fails once and is retried, and three tests
of different sizes (1, 4 and 0 cores) sharing RUNS runs after it. Every loop asks for the next
actions, then finishes the oldest running run, and asks the queue's counts and whether the
plan is done, as the runner does after every event. `seconds` is the median of REPEATS of the
whole plan, for 2,000, 8,000 and 32,000 runs. Target: linear growth, at most 1 s for 32,000.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time

from testlooper.local.schedule import Capacity, Schedule

RUN_COUNTS = (2_000, 8_000, 32_000)
JOBS = 16
REPEATS = 3


def plan_of(runs: int) -> tuple[list[dict], dict[str, dict]]:
    tasks = {
        "build": {"min_cores": 0, "min_ram_gb": 0, "max_retries": 1, "retry_wait_seconds": 0},
        "unit": {"min_cores": 1, "min_ram_gb": 0.5},
        "integration": {"min_cores": 4, "min_ram_gb": 4},
        "lint": {},
    }
    share = runs // 3
    plan = [
        {"name": "build", "kind": "build", "runs": 1, "depends_on": []},
        {"name": "unit", "kind": "test", "runs": runs - 2 * share, "depends_on": ["build"]},
        {"name": "integration", "kind": "test", "runs": share, "depends_on": ["build"]},
        {"name": "lint", "kind": "test", "runs": share, "depends_on": []},
    ]
    return plan, tasks


def schedule_everything(runs: int) -> tuple[float, int]:
    plan, tasks = plan_of(runs)
    started = time.perf_counter()
    schedule = Schedule(plan, tasks, Capacity(jobs=JOBS, cores=16, ram_gb=64.0))
    running: list = []
    finished = 0
    now = 0.0
    while True:
        actions = schedule.next_actions(now)
        running.extend(actions.start)
        for _ in actions.start:
            schedule.queue_counts()  # the runner warms agents up after every start
        if schedule.done:
            break
        now += 0.001
        run = running.pop(0)
        # The build's first attempt fails, so the retry path is measured too.
        schedule.finished(run, "failed" if run.kind == "build" and run.attempt == 1 else "passed", now)
        finished += 1
        schedule.queue_counts()
        schedule.seconds_until_next_retry(now)
    return time.perf_counter() - started, finished


def main() -> None:
    results = {}
    for runs in RUN_COUNTS:
        timings, finished = [], 0
        for _ in range(REPEATS):
            seconds, finished = schedule_everything(runs)
            timings.append(seconds)
        results[str(runs)] = {"seconds": round(statistics.median(timings), 4), "runs_finished": finished,
                              "microseconds_per_run": round(statistics.median(timings) / finished * 1e6, 2)}
    smallest, largest = str(RUN_COUNTS[0]), str(RUN_COUNTS[-1])
    growth = results[largest]["seconds"] / max(results[smallest]["seconds"], 1e-9)
    print(json.dumps({
        "bench": "schedule", "jobs": JOBS, "python": platform.python_version(), "runs": results,
        "growth_32000_over_2000": round(growth, 1), "linear_growth_would_be": RUN_COUNTS[-1] / RUN_COUNTS[0],
        "target_seconds_for_32000": 1.0, "meets_target": results[largest]["seconds"] <= 1.0,
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
