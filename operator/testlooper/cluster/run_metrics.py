"""Where the run metrics of cluster/metrics.py come from.

Each is counted at one place of the operator's own flow, so that it is counted once:

- `testlooper_runs_finished_total`, `testlooper_test_cases_total` and
  `testlooper_run_duration_seconds`: from a decision's status write (`after_status_write`).
  The phase machine counts a run's result in the same write that takes the run out of
  `active`, so comparing the status before and after that write says which runs ended and
  how; a RESULT seen twice, or again after a restart, changes nothing the second time, and
  neither does the metric.
- `testlooper_run_queue_wait_seconds`: when a run's pod is created (`pod_created`), from when
  the run became runnable (`status.runnableSince`, or when a retry became due).
- `testlooper_infra_retries_total`: one per `RecordAttempt` of an infrastructure failure.
- The gauges (`Figures`): `testlooper_testruns` from each listing of a namespace's TestRuns
  (the admission loop lists them every round), the pools' from the same counting of their
  pods that admission and the WorkerPool status use, and `testlooper_flaky_cases` from the
  store's statistics (`FlakyCases`: recomputed when a branch head moves or a TestRun ends,
  at most every FLAKY_REFRESH_SECONDS per Repo, never per scrape).

The functions above the glue are pure (tests/test_run_metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable, Mapping, Sequence

from testlooper.cluster.metrics import TESTRUN_PHASES
from testlooper.decisions import phases
from testlooper.decisions.pools import Usage, pool_status
from testlooper.decisions.repo import ENDED_PHASES

logger = logging.getLogger(__name__)

FLAKY_REFRESH_SECONDS = 5.0  # a Repo's flaky cases are read from the store at most this often


# -- pure ------------------------------------------------------------------------------------

def phase_counts(testruns: Iterable[dict]) -> dict[str, int]:
    """TestRuns by phase, every phase present (0 included); one with no status yet is Pending."""
    counts = dict.fromkeys(TESTRUN_PHASES, 0)
    for testrun in testruns:
        phase = (testrun.get("status") or {}).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def pool_figures(pools: Sequence[dict], testruns: Sequence[dict],
                 usage: Mapping[str, Usage]) -> dict[str, tuple[int, float, int]]:
    """pool -> (workers, cores, queued runs), exactly as the pools' statuses say them
    (`pool_status`, from the usage admission counted)."""
    figures = {}
    for pool in pools:
        name = pool["metadata"]["name"]
        status = pool_status(pool, list(pools), testruns, usage.get(name, Usage()))
        figures[name] = (status["workers"], round(usage.get(name, Usage()).cores, 3), status["queued"])
    return figures


def run_endings(before: dict, patch: dict | None) -> dict[str, int]:
    """result -> how many runs ended in the status write `patch` applied to `before`.

    The run counts move by exactly the results of the runs that left `active` (passed,
    failed, timeout, error); runs that left `active` without a count moving were cancelled. A
    reused result (nothing ran) counts nothing."""
    if not patch or patch.get("resultFrom"):
        return {}
    return _endings(before, phases.merged(before, patch))


def _endings(before: dict, after: dict) -> dict[str, int]:
    old, new = before.get("runCounts") or {}, after.get("runCounts") or {}

    def moved(key: str) -> int:
        return max(0, int(new.get(key) or 0) - int(old.get(key) or 0))

    timeouts = moved("timedOut")
    endings = {"passed": moved("passed"), "failed": max(0, moved("failed") - timeouts), "timeout": timeouts,
               "error": moved("errored")}
    if after.get("phase") == "Cancelled":
        left = len(set(before.get("active") or {}) - set(after.get("active") or {}))
        endings["cancelled"] = max(0, left - sum(endings.values()))
    return {result: count for result, count in endings.items() if count}


def consumed_results(before: dict, patch: dict | None, results: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (run, attempt)s whose RESULT this status write counted: those whose run was on that
    attempt before and is not any more (ended, or a build retried on its verdict). A RESULT
    `cancelled` is not a verdict (its agent was stopped), nor is one under a cancel."""
    if not patch:
        return []
    return _consumed(before, phases.merged(before, patch), results)


def _consumed(before: dict, after: dict, results: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    if after.get("phase") == "Cancelled":
        return []
    old, new = before.get("active") or {}, after.get("active") or {}
    consumed = []
    for run, attempt in results:
        entry = old.get(str(run))
        if entry is None or int(entry.get("attempt") or 0) != attempt:
            continue
        later = new.get(str(run))
        if later is None or int(later.get("attempt") or 0) != attempt:
            consumed.append((run, attempt))
    return sorted(consumed)


def case_counts(result: dict) -> tuple[int, int]:
    """(passed, failed) cases of a RESULT."""
    passed = failed = 0
    for case in result.get("cases") or ():
        if isinstance(case, dict):
            if case.get("success"):
                passed += 1
            else:
                failed += 1
    return passed, failed


def run_duration(result: dict, pod: phases.PodObservation | None) -> float | None:
    """From the pod running (its last container started; else the kubelet taking it) to the
    RESULT's arrival; without the pod, the duration the agent measured."""
    received = result.get("received_at")
    began = None if pod is None else (pod.running_since or pod.started)
    if received is not None and began is not None and float(received) >= began:
        return float(received) - began
    measured = result.get("duration_seconds")
    return float(measured) if measured is not None else None


def queue_wait_start(testrun: dict, run: int, attempt: int) -> float | None:
    """When run `run` on `attempt` became runnable, from the TestRun's status before the pod
    was created: a retry when it became due (its wait, if any, ended), a run's first attempt
    when the TestRun became runnable (its builds had passed, or spec.runs was raised)."""
    status = testrun.get("status") or {}
    entry = (status.get("active") or {}).get(str(run))
    stamps = []
    if entry is not None and int(entry.get("attempt") or 0) == attempt and attempt > 1:
        stamps = [entry.get("since"), entry.get("notBefore")]
    else:
        stamps = [status.get("runnableSince") or (testrun.get("metadata") or {}).get("creationTimestamp")]
    known = [phases.parse_time(stamp) for stamp in stamps if stamp]
    return max(known) if known else None


# -- glue, called from cluster/runs.py and the handlers ---------------------------------------

def after_status_write(context, testrun: dict, patch: dict | None, observed: phases.Observations | None = None,
                       posted: Mapping[tuple[int, int], dict] | None = None) -> None:
    """A status write of `testrun` landed: count the runs it ended and, given what the decision
    observed and the RESULTs behind it, their cases and durations."""
    metrics = context.metrics
    observed = observed or phases.Observations(now=0.0)
    posted = posted or {}
    try:
        spec, status = testrun.get("spec") or {}, testrun.get("status") or {}
        namespace, repo = testrun["metadata"]["namespace"], spec.get("repo", "")
        if not patch:
            return
        after = phases.merged(status, patch)  # once: it copies the active runs
        if not patch.get("resultFrom"):
            for result, count in _endings(status, after).items():
                metrics.runs_finished.labels(namespace, repo, result).inc(count)
        verdicts = [key for key, result in observed.results.items() if result.result != "cancelled"]
        consumed = _consumed(status, after, verdicts) if verdicts else []
        pods = {(pod.run, pod.attempt): pod for pod in observed.pods} if consumed else {}
        kind = spec.get("kind") or "test"
        for key in consumed:
            result = posted.get(key)
            if result is None:
                continue
            passed, failed = case_counts(result)
            if passed:
                metrics.test_cases.labels(namespace, repo, "passed").inc(passed)
            if failed:
                metrics.test_cases.labels(namespace, repo, "failed").inc(failed)
            duration = run_duration(result, pods.get(key))
            if duration is not None:
                metrics.run_duration.labels(namespace, repo, kind).observe(duration)
        if (patch or {}).get("phase") in ENDED_PHASES and context.flaky_cases is not None:
            context.flaky_cases.refresh_soon(namespace, repo)  # its results are in the store
    except Exception as exc:  # a metric never stops a decision
        logger.warning("run metrics not counted: %s: %s", type(exc).__name__, exc)


def pod_created(context, testrun: dict, action, pool: str | None, now: float | None = None) -> None:
    """A run's pod was created (not found existing): how long the run waited for it."""
    if not isinstance(action, phases.CreatePod) or not pool:
        return
    started = queue_wait_start(testrun, action.run, action.attempt)
    if started is not None:
        wait = max(0.0, (time.time() if now is None else now) - started)
        context.metrics.queue_wait.labels(testrun["metadata"]["namespace"], pool).observe(wait)


def attempt_recorded(context, namespace: str, action) -> None:
    if getattr(action, "infrastructure", False):
        context.metrics.infra_retries.labels(namespace, action.reason).inc()


def testruns_listed(context, namespace: str, testruns: Sequence[dict]) -> None:
    context.metrics.figures.phases[namespace] = phase_counts(testruns)


def pools_counted(context, namespace: str, pools: Sequence[dict], testruns: Sequence[dict],
                  usage: Mapping[str, Usage]) -> None:
    """The namespace's pools as just counted; pools no longer listed drop out."""
    context.metrics.figures.pools[namespace] = pool_figures(pools, testruns, usage)


class FlakyCases:
    """testlooper_flaky_cases: each tested branch's flaky cases over its last tested commits
    (history.branch_flakiness, as `testlooper flaky --repo` reads them), recomputed in a thread
    when the branch head moves or one of the Repo's TestRuns ends, at most every
    FLAKY_REFRESH_SECONDS per Repo."""

    def __init__(self, context, refresh_seconds: float = FLAKY_REFRESH_SECONDS):
        self.context = context
        self.refresh_seconds = refresh_seconds
        self._branches: dict[tuple[str, str], dict[str, str]] = {}  # (namespace, repo) -> tested branch -> head
        self._pending: dict[tuple[str, str], asyncio.Task] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._dirty: set[tuple[str, str]] = set()  # asked again while a count was under way

    def branches_tested(self, namespace: str, repo: str, heads: Mapping[str, str]) -> None:
        """A poll read the Repo's tested branches and their heads (their lines are in the store)."""
        key = (namespace, repo)
        changed = self._branches.get(key) != dict(heads)
        self._branches[key] = dict(heads)
        if changed or key not in self.context.metrics.figures.flaky:
            self.refresh_soon(namespace, repo)

    def refresh_soon(self, namespace: str, repo: str) -> None:
        key = (namespace, repo)
        if key not in self._branches or self.context.store is None:
            return
        if key in self._pending:
            self._dirty.add(key)
            return
        delay = max(0.0, self._last.get(key, 0.0) + self.refresh_seconds - time.monotonic())
        task = asyncio.get_running_loop().create_task(self._refresh(key, delay))
        self._pending[key] = task

    def forget(self, namespace: str, repo: str) -> None:
        key = (namespace, repo)
        self._branches.pop(key, None)
        self._last.pop(key, None)
        self._dirty.discard(key)
        task = self._pending.pop(key, None)
        if task is not None:
            task.cancel()
        self.context.metrics.figures.flaky.pop(key, None)

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _refresh(self, key: tuple[str, str], delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            self._last[key] = time.monotonic()
            self._dirty.discard(key)
            branches = sorted(self._branches.get(key, {}))
            counts = await asyncio.to_thread(self._count, key, branches)
            if key in self._branches and self._polled(key):  # not deleted meanwhile
                self.context.metrics.figures.flaky[key] = counts
        except asyncio.CancelledError:
            self._dirty.discard(key)  # stopping, or the Repo forgotten: not asked again
            raise
        except Exception as exc:  # the store down: the next head move or ended TestRun tries again
            logger.warning("Repo %s/%s: flaky cases not counted: %s: %s", *key, type(exc).__name__, exc)
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]
                if key in self._dirty:
                    self.refresh_soon(*key)

    def _polled(self, key: tuple[str, str]) -> bool:
        """The Repo's daemon still runs (a poll that ends after the Repo's deletion must not bring
        its series back)."""
        return any(watched.name == key[1] for watched in self.context.repos.in_namespace(key[0]))

    def _count(self, key: tuple[str, str], branches: Sequence[str]) -> dict[str, int]:
        from testlooper.history import branch_flakiness

        store = self.context.store
        repo_id = f"{key[0]}/{key[1]}"
        return {branch: len(branch_flakiness(store, repo_id, store.branch_line(repo_id, branch) or []).flaky)
                for branch in branches}
