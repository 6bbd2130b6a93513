"""The scheduling rules both shells share: the local runner (local/schedule.py) and the cluster
operator (decisions/phases.py, decisions/pools.py). Plain functions over plain values, so each
shell keeps its own state machine and neither can drift from the other on what a retry, a
block, a fit or a task's result means.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

# Results of a build's attempt that are worth another attempt (per its max_retries).
RETRIED_RESULTS = ("failed", "timeout", "error")
# When no run passed, the task's result is the first of these that some run had.
WORST_FIRST = ("error", "timeout", "failed", "blocked", "cancelled")


def fit(need, available):
    """A task asking more than the machine (or pool) has runs alone rather than never."""
    return min(need, available) if available else need


def retry_wait(task: dict, kind: str, attempt: int, result: str) -> float | None:
    """Seconds before the next attempt of a build whose `attempt` ended with `result`, or None
    when it is not retried. Only builds are retried: a test's failures are what is measured.
    `attempt` counts the attempts that reached a verdict (infrastructure failures, which the
    cluster retries on their own budget, are not among them)."""
    if kind != "build" or result not in RETRIED_RESULTS or attempt > int(task.get("max_retries") or 0):
        return None
    return float(task.get("retry_wait_seconds") or 0)


def build_verdict(result: str) -> str | None:
    """What a build's final attempt means for its consumers: "passed", "failed", or None for a
    cancelled build (it decided nothing)."""
    if result == "cancelled":
        return None
    return "passed" if result == "passed" else "failed"


def blocked_reason(failed_builds: list[str]) -> str:
    return "needs build " + ", ".join(failed_builds) + ", which failed"


def fits(cores: float, ram_gb: float, free) -> bool:
    """Whether a run of this size fits what is free (`free` has jobs, cores and ram_gb). Needs
    are capped to the capacity first (`fit`), so an idle machine or pool fits any run."""
    return free.jobs > 0 and cores <= free.cores and ram_gb <= free.ram_gb


def how_many_fit(cores: float, ram_gb: float, free, wanted: int) -> int:
    """How many runs of one size fit what is free, at most `wanted`: the count for which `fits`
    holds again after each is taken (what admitting them one by one would give), computed
    without the loop. `free` fields may be `math.inf` (no limit)."""
    count = min(wanted, free.jobs)
    if cores > 0:
        count = min(count, _floor_share(free.cores, cores))
    elif free.cores < 0:
        count = 0
    if ram_gb > 0:
        count = min(count, _floor_share(free.ram_gb, ram_gb))
    elif free.ram_gb < 0:
        count = 0
    return max(0, int(count))


def _floor_share(available: float, size: float) -> float:
    if available == float("inf"):
        return available
    # A hair of tolerance so that 3 x 0.1 GB fit in 0.3 GB despite binary fractions.
    return (available + 1e-9) // size


def task_result_of_counts(counts: Mapping[str, int]) -> str:
    """A task's result from its runs' final results, counted by result: passed when every run
    passed, flaky when some did, else the worst result some run had (error, timeout, failed,
    blocked, cancelled, in that order)."""
    ended = sum(counts.values())
    passed = counts.get("passed", 0)
    if ended and passed == ended:
        return "passed"
    if passed:
        return "flaky"
    for result in WORST_FIRST:
        if counts.get(result):
            return result
    return next((result for result, count in counts.items() if count), "error")


def task_result(results: Iterable[str]) -> str:
    """`task_result_of_counts` for a list of runs' final results."""
    return task_result_of_counts(Counter(results))
