"""Benchmark the TestRun phase machine and pool admission; prints one JSON object.

    PYTHONPATH=operator python3 bench/bench_phases.py

One TestRun of RUNS runs in a pool of WORKERS workers is driven to its end as the operator
would: each round the pool's admission counts its usage from the pods and grants room; the
machine decides with the pods (read from Pod-shaped dicts with `observe_pod`), the results and
heartbeats; its creates become running pods, its status patch is merged, its deletes remove
pods. Each round BATCH pods post their result. Measured per decision (admission excluded, then
admission alone): the median and 99th percentile, and the largest status written, for 1,000,
10,000 and 100,000 runs. The status is bounded and a decision costs what changed plus the runs
active, so the figures must not grow with RUNS. Targets: median decision at most 2 ms, growth
100,000 over 1,000 at most 2x, status at most 300 kB. Also: one admission round over 5,000
queued TestRuns, and what the run metrics add to each status write
(`run_metrics.after_status_write`: the runs ended, their cases and durations).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import types

from testlooper.cluster import run_metrics
from testlooper.cluster.metrics import OperatorMetrics
from testlooper.decisions.phases import (
    CreatePod, DeletePod, Observations, RunResult, decide, format_time, merged, observe_pod, queued_demand,
)
from testlooper.decisions.pools import Demand, Usage, admit, pool_usage

RUN_COUNTS = (1_000, 10_000, 100_000)
WORKERS = 200
BATCH = 50
T0 = 1_800_000_000.0
POOL = {"metadata": {"name": "p"}, "spec": {"provider": "kubernetes", "maxWorkers": WORKERS, "maxCores": 400}}


def pod(run: int, attempt: int, now: float) -> dict:
    stamp = format_time(now)
    return {"metadata": {"namespace": "ns", "creationTimestamp": stamp,
                         "labels": {"testlooper.dev/testrun": "t", "testlooper.dev/run-index": str(run),
                                    "testlooper.dev/attempt": str(attempt), "testlooper.dev/worker-pool": "p"}},
            "status": {"phase": "Running", "startTime": stamp,
                       "containerStatuses": [{"name": "test", "state": {"running": {"startedAt": stamp}}}]}}


def drive(runs: int) -> dict:
    testrun = {"metadata": {"name": "t", "namespace": "ns", "creationTimestamp": format_time(T0)},
               "spec": {"kind": "test", "runs": runs, "definition": {"min_cores": 1}}, "status": {}}
    pods: dict[tuple[int, int], dict] = {}
    results: dict[tuple[int, int], RunResult] = {}
    decide_seconds: list[float] = []
    metrics_seconds: list[float] = []
    context = types.SimpleNamespace(metrics=OperatorMetrics(), flaky_cases=None)
    admit_seconds: list[float] = []
    largest_status = 0
    now = T0
    while testrun["status"].get("phase") not in ("Succeeded", "Failed", "Error"):
        now += 1
        for key in list(pods)[:BATCH]:
            results[key] = RunResult("passed" if key[0] % 7 else "failed", failed_cases=("c",) if key[0] % 7 == 0 else ())
        started = time.perf_counter()
        usage = pool_usage(pods.values(), {("ns", "t"): ("p", 1.0, 0.0)})
        demand = queued_demand(testrun, now)
        granted = admit([POOL], usage, [demand] if demand else []).get(("ns", "t"), 0)
        admit_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        observed = Observations(now=now, pools=[POOL], pods=[observe_pod(p) for p in pods.values()],
                                results=results, heartbeats={key: now for key in pods}, admitted=granted,
                                operator_started=T0)
        decision = decide(testrun, observed)
        before = testrun["status"]
        testrun["status"] = merged(testrun["status"], decision.status_patch)
        decide_seconds.append(time.perf_counter() - started)
        if decision.status_patch:
            posted = {key: {"result": result.result, "received_at": now, "cases": [
                {"name": "c", "success": result.result == "passed"}]} for key, result in results.items()}
            started = time.perf_counter()
            run_metrics.after_status_write(context, {**testrun, "status": before}, decision.status_patch, observed,
                                           posted)
            metrics_seconds.append(time.perf_counter() - started)
        largest_status = max(largest_status, len(json.dumps(testrun["status"])))
        for action in decision.actions:
            if isinstance(action, CreatePod):
                pods[(action.run, action.attempt)] = pod(action.run, action.attempt, now)
            elif isinstance(action, DeletePod):
                pods.pop((action.run, action.attempt), None)
                results.pop((action.run, action.attempt), None)  # the operator asks only for active runs'
        assert sum(1 for p in pods.values()) <= WORKERS
    counts = testrun["status"]["runCounts"]
    assert counts["passed"] + counts["failed"] == runs, counts
    decide_seconds.sort()
    return {
        "decisions": len(decide_seconds),
        "decide_median_ms": round(statistics.median(decide_seconds) * 1e3, 3),
        "decide_p99_ms": round(decide_seconds[int(len(decide_seconds) * 0.99)] * 1e3, 3),
        "decide_total_seconds": round(sum(decide_seconds), 3),
        "microseconds_per_run": round(sum(decide_seconds) / runs * 1e6, 1),
        "admission_median_ms": round(statistics.median(admit_seconds) * 1e3, 3),
        "status_write_metrics_median_ms": round(statistics.median(metrics_seconds) * 1e3, 3),
        "largest_status_bytes": largest_status,
        "result": testrun["status"]["result"],
    }


def admission_of_many(testruns: int = 5_000) -> float:
    pools = [{"metadata": {"name": f"p{i}"}, "spec": {"provider": "kubernetes", "maxWorkers": 100, "maxCores": 200,
                                                       "maxRamGb": 400.0}} for i in range(5)]
    demands = [Demand(("ns", f"t{i}"), f"p{i % 5}", i % 4, format_time(T0 + i), 1 + i % 3, 0.5 * (i % 5), 1 + i % 50)
               for i in range(testruns)]
    usage = {f"p{i}": Usage(50, 90.0, 100.0) for i in range(5)}
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        admit(pools, usage, demands)
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1e3, 2)


def main() -> None:
    results = {str(runs): drive(runs) for runs in RUN_COUNTS}
    smallest, largest = results[str(RUN_COUNTS[0])], results[str(RUN_COUNTS[-1])]
    growth = largest["decide_median_ms"] / max(smallest["decide_median_ms"], 1e-9)
    print(json.dumps({
        "bench": "phases", "workers": WORKERS, "results_per_round": BATCH, "python": platform.python_version(),
        "runs": results,
        "decide_median_growth_100000_over_1000": round(growth, 2),
        "admission_of_5000_testruns_ms": admission_of_many(),
        "targets": {"decide_median_ms": 2.0, "growth": 2.0, "largest_status_bytes": 300_000},
        "meets_targets": largest["decide_median_ms"] <= 2.0 and growth <= 2.0
        and max(r["largest_status_bytes"] for r in results.values()) <= 300_000,
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
