"""Which WorkerPool a TestRun goes to, what each pool holds, and which queued runs start now.

Placement (`pool_for`) picks the pool once per TestRun. Admission (`admit`) is the only place
that lets runs start: given the pools, what their live pods hold (`pool_usage`, counted from
the pods themselves, never from a running total kept somewhere that a crash could lose) and the
runs waiting (`Demand`, one per TestRun), it says how many runs of each TestRun start now,
never past a pool's maxWorkers, maxCores or maxRamGb. docs/operator.md ("Capacity") says how
the operator keeps that true under concurrent reconciles and a restart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from testlooper.decisions.repo import ENDED_PHASES
from testlooper.decisions.rules import fit, how_many_fit

TESTRUN_LABEL = "testlooper.dev/testrun"
POOL_LABEL = "testlooper.dev/worker-pool"
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})


def pool_for(task: dict, pool_name: str, pools: list[dict]) -> str | None:
    """The pool a TestRun goes to: the one it names, else the first pool by priority (higher
    first, then by name) whose platform matches and whose per-pod ceiling fits the task (an
    EC2 pool: one of its instance types holds it)."""
    if pool_name:
        return pool_name
    platform = (task or {}).get("platform") or "linux"
    cores = (task or {}).get("min_cores") or 0
    ram = (task or {}).get("min_ram_gb") or 0
    for pool in sorted(pools, key=lambda p: (-int(p["spec"].get("priority") or 0), p["metadata"]["name"])):
        spec = pool["spec"]
        if (spec.get("platform") or "linux") != platform:
            continue
        if spec.get("provider") == "ec2":
            from testlooper.decisions.ec2 import takes

            if takes(pool, task):  # an instance type holds it (maxPod* are for pods)
                return pool["metadata"]["name"]
            continue
        if spec.get("maxPodCores") and cores > spec["maxPodCores"]:
            continue
        if spec.get("maxPodRamGb") and ram > spec["maxPodRamGb"]:
            continue
        return pool["metadata"]["name"]
    return None


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a pool's live pods hold."""

    workers: int = 0
    cores: float = 0.0
    ram_gb: float = 0.0


@dataclasses.dataclass(frozen=True)
class Demand:
    """The runs of one TestRun that could start now, all of one size."""

    testrun: tuple[str, str]  # (namespace, name)
    pool: str
    priority: int
    created: str  # metadata.creationTimestamp: RFC 3339 sorts as time
    cores: float
    ram_gb: float
    count: int


@dataclasses.dataclass
class _Free:
    jobs: float
    cores: float
    ram_gb: float


def run_size(task: dict, pool: dict) -> tuple[float, float]:
    """The cores and GB one run of `task` holds in `pool`: its minimums, capped to the pool's
    totals (the shared `fit` rule: a run asking more than the pool has runs alone, not never)."""
    spec = pool.get("spec") or {}
    return (fit(float((task or {}).get("min_cores") or 0), spec.get("maxCores")),
            fit(float((task or {}).get("min_ram_gb") or 0), spec.get("maxRamGb")))


def admit(pools: Sequence[dict], usage: Mapping[str, Usage], demands: Iterable[Demand]) -> dict[tuple[str, str], int]:
    """How many runs of each TestRun start now: TestRuns by priority (higher first), then age,
    then name; each takes as many runs as fit what its pool has free; one that does not fit lets
    the next, smaller one go (as the local scheduler does). A demand's size is fitted to its
    pool's totals (`run_size`). Nothing is admitted to a pool that is not in `pools`. Costs
    O(TestRuns waiting), whatever their number of runs."""
    specs = {pool["metadata"]["name"]: pool.get("spec") or {} for pool in pools}
    free: dict[str, _Free] = {}
    for name, spec in specs.items():
        used = usage.get(name, Usage())
        free[name] = _Free(_left(spec.get("maxWorkers"), used.workers), _left(spec.get("maxCores"), used.cores),
                           _left(spec.get("maxRamGb"), used.ram_gb))
    granted: dict[tuple[str, str], int] = {}
    for demand in sorted(demands, key=lambda d: (-d.priority, d.created, d.testrun)):
        room = free.get(demand.pool)
        if room is None or demand.count <= 0:
            continue
        spec = specs[demand.pool]
        cores, ram = fit(demand.cores, spec.get("maxCores")), fit(demand.ram_gb, spec.get("maxRamGb"))
        count = how_many_fit(cores, ram, room, demand.count)
        if count <= 0:
            continue
        granted[demand.testrun] = granted.get(demand.testrun, 0) + count
        room.jobs -= count
        room.cores -= count * cores
        room.ram_gb -= count * ram
    return granted


def _left(limit, used: float) -> float:
    return math.inf if limit is None else limit - used


COUNTED_METADATA_KEYS = ("name", "namespace", "creationTimestamp", "resourceVersion")
COUNTED_ANNOTATIONS = ("testlooper.dev/result-from-testrun",)  # phases.RESULT_FROM_TESTRUN: not to be run
COUNTED_DEFINITION_KEYS = ("platform", "min_cores", "max_cores", "min_ram_gb")
COUNTED_STATUS_KEYS = ("phase", "workerPool", "active", "startedRuns", "runCounts")


def counting_view(testrun: dict) -> dict:
    """What admission (phases.queued_demand, `run_sizes`) and `pool_status` read of a TestRun,
    and no more: not its definition's stages nor its status' history, which are most of its
    size (the shell reduces each TestRun of a long listing to this as it arrives)."""
    metadata, spec, status = testrun.get("metadata") or {}, testrun.get("spec") or {}, testrun.get("status") or {}
    definition = spec.get("definition") or {}
    annotations = {key: value for key, value in (metadata.get("annotations") or {}).items() if key in COUNTED_ANNOTATIONS}
    return {"metadata": {**{key: metadata[key] for key in COUNTED_METADATA_KEYS if key in metadata},
                         **({"annotations": annotations} if annotations else {})},
            "spec": {**{key: value for key, value in spec.items() if key != "definition"},
                     "definition": {key: definition[key] for key in COUNTED_DEFINITION_KEYS if key in definition}},
            "status": {key: status[key] for key in COUNTED_STATUS_KEYS if key in status}}


def run_sizes(testruns: Iterable[dict], pools: Sequence[dict]) -> dict[tuple[str, str], tuple[str, float, float]]:
    """(namespace, name) -> (pool, cores, GB of one run) for the TestRuns placed in a pool, as
    `pool_usage` wants them. A TestRun never decided on counts in the pool it would be placed
    in: admission may start it before its first status write, and a crash in between leaves
    its pods to be counted at their size (phases.py `leave_to_admission`)."""
    by_name = {pool["metadata"]["name"]: pool for pool in pools}
    sizes = {}
    for testrun in testruns:
        status, spec = testrun.get("status") or {}, testrun.get("spec") or {}
        definition = spec.get("definition") or {}
        placed = status.get("workerPool") or (
            None if status.get("phase") else pool_for(definition, spec.get("workerPool") or "", list(pools)))
        if placed in by_name:
            metadata = testrun.get("metadata") or {}
            sizes[(metadata.get("namespace", ""), metadata.get("name", ""))] = (placed, *run_size(definition, by_name[placed]))
    return sizes


def pool_usage(pods: Iterable[dict], testruns: Mapping[tuple[str, str], tuple[str, float, float]]) -> dict[str, Usage]:
    """What each pool's live pods hold, counted from the pods: `testruns` maps (namespace, name)
    to (pool, cores, ram_gb) of one run. A pod holds its share until it is terminal (Succeeded
    or Failed); one being deleted still holds it. A pod whose TestRun is not known (deleted, its
    pods not collected yet) counts in the pool its label names, else nowhere."""
    totals: dict[str, list[float]] = {}
    for pod in pods:
        if ((pod.get("status") or {}).get("phase") or "Pending") in TERMINAL_POD_PHASES:
            continue
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        known = testruns.get(_testrun_of(metadata))
        pool, cores, ram = known if known is not None else (labels.get(POOL_LABEL, ""), 0.0, 0.0)
        pool = labels.get(POOL_LABEL) or pool
        if not pool:
            continue
        total = totals.setdefault(pool, [0, 0.0, 0.0])
        total[0] += 1
        total[1] += cores
        total[2] += ram
    return {pool: Usage(int(w), c, r) for pool, (w, c, r) in totals.items()}


RUN_ID_ANNOTATION = "testlooper.dev/run-id"  # kube/pods.py's: "<namespace>.<TestRun>.<run>.<attempt>"


def _testrun_of(metadata: dict) -> tuple[str, str]:
    """(namespace, name) of a run pod's TestRun: from its run id, since a pool with
    spec.namespace runs its pods in another namespace than the TestRun's; else from its
    namespace and TestRun label."""
    parts = ((metadata.get("annotations") or {}).get(RUN_ID_ANNOTATION) or "").split(".")
    if len(parts) == 4:
        return parts[0], parts[1]
    return metadata.get("namespace", ""), (metadata.get("labels") or {}).get(TESTRUN_LABEL, "")


def pool_status(pool: dict, pools: list[dict], testruns: Iterable[dict], usage: Usage | None = None) -> dict:
    """status of `pool`: what its pods hold (`usage`), and the runs queued for it, counted from
    the namespace's TestRuns: those placed in it, and the unplaced ones that would go to it."""
    name = pool["metadata"]["name"]
    queued = 0
    for testrun in testruns:
        status = testrun.get("status") or {}
        spec = testrun.get("spec") or {}
        if status.get("phase") in ENDED_PHASES or spec.get("cancel"):
            continue
        placed = status.get("workerPool") or pool_for(spec.get("definition") or {}, spec.get("workerPool") or "", pools)
        if placed != name:
            continue
        counts = status.get("runCounts") or {}
        queued += int(counts.get("queued", spec.get("runs") or 1))
    usage = usage or Usage()
    max_workers = pool["spec"].get("maxWorkers")
    limit = str(max_workers) if max_workers is not None else "-"
    return {"workers": usage.workers, "cores": int(math.ceil(usage.cores)), "ramGb": round(usage.ram_gb, 3),
            "queued": queued, "workersSummary": f"{usage.workers}/{limit}",
            "observedGeneration": pool["metadata"].get("generation", 0)}
