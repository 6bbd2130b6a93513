"""Which WorkerPool a TestRun goes to, and what each pool has queued and in use.

Part 1 places nothing yet (pods come in part 2), so a pool's usage is what it has queued: the
runs of unended TestRuns that name it, or that name none and would go to it first.
"""

from __future__ import annotations

from typing import Iterable

from testlooper.decisions.repo import ENDED_PHASES


def pool_for(task: dict, pool_name: str, pools: list[dict]) -> str | None:
    """The pool a TestRun goes to: the one it names, else the first pool by priority (higher
    first, then by name) whose platform matches and whose per-pod ceiling fits the task."""
    if pool_name:
        return pool_name
    platform = (task or {}).get("platform") or "linux"
    cores = (task or {}).get("min_cores") or 0
    ram = (task or {}).get("min_ram_gb") or 0
    for pool in sorted(pools, key=lambda p: (-int(p["spec"].get("priority") or 0), p["metadata"]["name"])):
        spec = pool["spec"]
        if (spec.get("platform") or "linux") != platform:
            continue
        if spec.get("maxPodCores") and cores > spec["maxPodCores"]:
            continue
        if spec.get("maxPodRamGb") and ram > spec["maxPodRamGb"]:
            continue
        return pool["metadata"]["name"]
    return None


def pool_status(pool: dict, pools: list[dict], testruns: Iterable[dict]) -> dict:
    """status of `pool` counted from the namespace's TestRuns."""
    name = pool["metadata"]["name"]
    queued = 0
    for testrun in testruns:
        status = testrun.get("status") or {}
        spec = testrun.get("spec") or {}
        if status.get("phase") in ENDED_PHASES or spec.get("cancel"):
            continue
        if pool_for(spec.get("definition") or {}, spec.get("workerPool") or "", pools) != name:
            continue
        counts = status.get("runCounts") or {}
        queued += int(counts.get("queued", spec.get("runs") or 1))
    max_workers = pool["spec"].get("maxWorkers")
    limit = str(max_workers) if max_workers is not None else "-"
    return {"workers": 0, "cores": 0, "ramGb": 0, "queued": queued, "workersSummary": f"0/{limit}",
            "observedGeneration": pool["metadata"].get("generation", 0)}
