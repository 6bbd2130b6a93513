"""The run metrics' pure parts (cluster/run_metrics.py) against the real phase machine, and the
gauges as /metrics shows them (cluster/metrics.py). The operator's own /metrics after real runs:
tests/test_operator_metrics_e2e.py."""

from __future__ import annotations

import asyncio
import copy
import types

from phases_helpers import T0, Driver, a_testrun, pool, running_pod
from prometheus_client import generate_latest

from testlooper.cluster import run_metrics
from testlooper.cluster.context import RepoRegistry
from testlooper.cluster.metrics import OperatorMetrics
from testlooper.decisions.phases import CreatePod, Observations, PodObservation, RunResult, format_time
from testlooper.decisions.pools import Usage, pool_status
from testlooper.store import open_store
from testlooper.store.base import CaseResult, RunRecord

PASSED, FAILED = RunResult("passed"), RunResult("failed")


class Counting(Driver):
    """A Driver that counts, after each decision, what the operator's hook would count."""

    def __init__(self, obj, pools=None):
        super().__init__(obj, pools)
        self.endings: dict[str, int] = {}
        self.consumed: list[tuple[int, int]] = []

    def decide(self, now=T0, **observed):
        before = copy.deepcopy(self.obj["status"])
        decision = super().decide(now, **observed)
        for result, count in run_metrics.run_endings(before, decision.status_patch).items():
            self.endings[result] = self.endings.get(result, 0) + count
        self.consumed += run_metrics.consumed_results(before, decision.status_patch, observed.get("results", {}))
        return decision


def started(runs=1, **spec):
    d = Counting(a_testrun(runs=runs, **spec))
    d.decide()
    d.decide(admitted=runs)
    return d


def test_each_run_ends_once_with_its_result_even_when_its_result_is_seen_again():
    d = started(runs=4)
    pods = [running_pod(run) for run in (1, 2, 3, 4)]
    d.decide(T0 + 5, pods=pods, results={(1, 1): PASSED, (2, 1): RunResult("timeout")})
    d.decide(T0 + 6, pods=pods, results={(1, 1): PASSED, (2, 1): RunResult("timeout"), (3, 1): FAILED})
    d.decide(T0 + 7, pods=pods, results={(1, 1): PASSED, (3, 1): FAILED, (4, 1): RunResult("error", "boom")})
    assert d.endings == {"passed": 1, "timeout": 1, "failed": 1, "error": 1}
    assert d.consumed == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert d.status["result"] == "flaky"
    # The whole TestRun again (a restart reads the same RESULTs): nothing more.
    d.decide(T0 + 8, pods=pods, results={(1, 1): PASSED, (3, 1): FAILED})
    assert sum(d.endings.values()) == 4 and len(d.consumed) == 4


def test_infrastructure_losses_end_no_run_until_given_up_and_their_result_is_an_error():
    d = started()
    d.decide(T0 + 1, pods=[PodObservation(1, 1, "Failed", created=T0, reason="Evicted")])
    assert d.endings == {}
    for attempt in (2, 3, 4):
        d.decide(T0 + attempt, admitted=1)
        d.decide(T0 + attempt + 0.5, pods=[PodObservation(1, attempt, "Failed", created=T0, reason="Evicted")])
    assert d.endings == {"error": 1} and d.consumed == []


def test_a_cancel_ends_the_active_runs_as_cancelled_and_a_build_retry_consumes_its_result():
    d = started(runs=3)
    d.decide(T0 + 1, pods=[running_pod(1), running_pod(2), running_pod(3)], results={(1, 1): PASSED})
    d.obj["spec"]["cancel"] = True
    d.decide(T0 + 2, pods=[running_pod(2), running_pod(3)], results={(2, 1): PASSED})
    assert d.endings == {"passed": 1, "cancelled": 2}
    assert d.consumed == [(1, 1)]  # a RESULT under a cancel is not a verdict

    build = started(kind="build", definition={"max_retries": 1})
    build.decide(T0 + 3, pods=[running_pod(1)], results={(1, 1): FAILED})
    assert build.endings == {} and build.consumed == [(1, 1)]  # retried: its cases counted, the run goes on
    build.decide(T0 + 4, admitted=1)
    build.decide(T0 + 5, pods=[running_pod(1, 2)], results={(1, 1): FAILED, (1, 2): PASSED})
    assert build.endings == {"passed": 1} and build.consumed == [(1, 1), (1, 2)]


def test_a_reused_result_and_a_blocked_testrun_end_no_run():
    reused = Counting(a_testrun(runs=3, annotations={"testlooper.dev/result-from-testrun": "old",
                                                     "testlooper.dev/result-from-commit": "1" * 40}))
    reused.decide()
    assert reused.status["runCounts"]["passed"] == 3 and reused.endings == {}
    blocked = Counting(a_testrun(dependsOn=["b"]))
    blocked.decide(builds={"b": ("Failed", "failed")})
    assert blocked.status["result"] == "blocked" and blocked.endings == {}


def test_phase_counts_show_every_phase_and_a_testrun_without_status_is_pending():
    testruns = [a_testrun(), a_testrun(status={"phase": "Running"}), a_testrun(status={"phase": "Running"})]
    counts = run_metrics.phase_counts(testruns)
    assert counts == {"Pending": 1, "Blocked": 0, "Queued": 0, "Running": 2, "Succeeded": 0, "Failed": 0,
                      "Error": 0, "Cancelled": 0}


def test_cases_and_duration_of_a_result():
    result = {"result": "failed", "received_at": T0 + 30, "duration_seconds": 12.5,
              "cases": [{"name": "a", "success": True}, {"name": "b", "success": False},
                        {"name": "c", "success": True}, "not a case"]}
    assert run_metrics.case_counts(result) == (2, 1)
    assert run_metrics.run_duration(result, running_pod(1, at=T0 + 10)) == 20
    assert run_metrics.run_duration(result, PodObservation(1, 1, "Running", created=T0, started=T0 + 4)) == 26
    assert run_metrics.run_duration(result, None) == 12.5  # the pod gone: what the agent measured
    assert run_metrics.run_duration({"result": "error"}, None) is None


def test_the_queue_wait_starts_when_the_testrun_became_runnable_or_a_retry_became_due():
    d = Counting(a_testrun(runs=2, dependsOn=["b"], kind="build", definition={"max_retries": 1,
                                                                           "retry_wait_seconds": 30}))
    d.decide(T0, builds={"b": ("Running", "")})
    assert "runnableSince" not in d.status
    d.decide(T0 + 50, builds={"b": ("Succeeded", "passed")})
    assert d.status["runnableSince"] == format_time(T0 + 50)
    assert run_metrics.queue_wait_start(d.obj, 2, 1) == T0 + 50
    d.decide(T0 + 60, admitted=1)
    d.decide(T0 + 70, pods=[running_pod(1)], results={(1, 1): FAILED})  # retried after 30 s
    assert run_metrics.queue_wait_start(d.obj, 1, 2) == T0 + 100  # its notBefore, not its failure
    assert run_metrics.queue_wait_start(d.obj, 2, 1) == T0 + 50
    # A TestRun from before runnableSince existed: from its creation.
    assert run_metrics.queue_wait_start(a_testrun(created=T0 - 5), 1, 1) == T0 - 5


def test_runs_added_to_an_ended_testrun_are_runnable_from_then():
    d = started()
    d.decide(T0 + 5, pods=[running_pod(1)], results={(1, 1): PASSED})
    d.obj["spec"]["runs"] = 3
    d.decide(T0 + 500)
    assert run_metrics.queue_wait_start(d.obj, 2, 1) == T0 + 500


def test_pool_figures_are_what_the_pool_status_says():
    pools = [pool("a", maxWorkers=4), pool("b")]
    testruns = [a_testrun(runs=3, name="x", status={"phase": "Queued", "workerPool": "a",
                                                     "runCounts": {"queued": 3}})]
    usage = {"a": Usage(2, 3.5, 1.0)}
    figures = run_metrics.pool_figures(pools, testruns, usage)
    assert figures == {"a": (2, 3.5, 3), "b": (0, 0.0, 0)}
    status = pool_status(pools[0], pools, testruns, usage["a"])
    assert (status["workers"], status["queued"]) == (figures["a"][0], figures["a"][2])


def scrape(metrics: OperatorMetrics) -> dict[str, float]:
    """name{labels} -> value, as /metrics says them."""
    samples = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def test_the_hooks_count_into_the_metrics_and_a_deleted_repo_or_pool_leaves_no_series():
    metrics = OperatorMetrics()
    context = types.SimpleNamespace(metrics=metrics, flaky_cases=None)
    testrun = a_testrun(runs=1, repo="demo", status={
        "phase": "Running", "workerPool": "p", "startedRuns": 1, "runnableSince": format_time(T0),
        "runCounts": {"total": 1, "passed": 0, "failed": 0, "running": 1, "queued": 0, "errored": 0, "timedOut": 0},
        "active": {"1": {"attempt": 1, "state": "Placed", "since": format_time(T0)}}})
    from testlooper.decisions.phases import decide

    observed = Observations(now=T0 + 40, pools=[pool()], pods=[running_pod(1, at=T0 + 10)],
                            results={(1, 1): FAILED})
    decision = decide(testrun, observed)
    posted = {(1, 1): {"result": "failed", "received_at": T0 + 40,
                       "cases": [{"name": "a", "success": True}, {"name": "b", "success": False}]}}
    run_metrics.after_status_write(context, testrun, decision.status_patch, observed, posted)
    run_metrics.pod_created(context, testrun, CreatePod(1, 1), "p", now=T0 + 7)
    for action in decision.afterwards:
        run_metrics.attempt_recorded(context, "ns", action)  # a verdict: no attempt recorded
    from testlooper.decisions.phases import RecordAttempt

    run_metrics.attempt_recorded(context, "ns", RecordAttempt(1, 1, "Evicted", "low memory", True))
    run_metrics.attempt_recorded(context, "ns", RecordAttempt(1, 2, "BuildRetried", "failed", True, False))
    run_metrics.testruns_listed(context, "ns", [testrun])
    run_metrics.pools_counted(context, "ns", [pool("p", maxWorkers=2)], [testrun], {"p": Usage(1, 2.0, 0)})
    metrics.figures.flaky[("ns", "demo")] = {"main": 2}
    samples = scrape(metrics)
    assert samples['testlooper_runs_finished_total{namespace="ns",repo="demo",result="failed"}'] == 1
    assert samples['testlooper_test_cases_total{namespace="ns",repo="demo",result="passed"}'] == 1
    assert samples['testlooper_test_cases_total{namespace="ns",repo="demo",result="failed"}'] == 1
    assert samples['testlooper_run_duration_seconds_sum{kind="test",namespace="ns",repo="demo"}'] == 30
    assert samples['testlooper_run_queue_wait_seconds_sum{namespace="ns",pool="p"}'] == 7
    assert samples['testlooper_infra_retries_total{namespace="ns",reason="Evicted"}'] == 1
    assert not any("BuildRetried" in series for series in samples)
    assert samples['testlooper_testruns{namespace="ns",phase="Running"}'] == 1
    assert samples['testlooper_testruns{namespace="ns",phase="Queued"}'] == 0
    assert samples['testlooper_pool_workers{namespace="ns",pool="p"}'] == 1
    assert samples['testlooper_pool_cores{namespace="ns",pool="p"}'] == 2
    assert samples['testlooper_pool_queued_runs{namespace="ns",pool="p"}'] == 0
    assert samples['testlooper_flaky_cases{branch="main",namespace="ns",repo="demo"}'] == 2

    metrics.forget_repo("ns", "demo")
    metrics.forget_pool("ns", "p")
    left = scrape(metrics)
    assert not [series for series in left if 'repo="demo"' in series or 'pool="p"' in series], left
    run_metrics.testruns_listed(context, "ns", [])  # the TestRun deleted: counted no more
    assert scrape(metrics)['testlooper_testruns{namespace="ns",phase="Running"}'] == 0


def record(store, commit: str, runs: list[list[tuple[str, bool]]]):
    for index, cases in enumerate(runs, start=1):
        store.record_run(RunRecord(repo="ns/demo", commit=commit, task="unit", kind="test", run_index=index,
                                   attempt=1, result="passed" if all(ok for _, ok in cases) else "failed",
                                   duration_seconds=1.0, exit_code=0, started_at=T0, branch="main",
                                   cases=[CaseResult(name, ok, 0.1) for name, ok in cases]))


def test_flaky_cases_are_counted_from_the_store_as_testlooper_flaky_counts_them(tmp_path):
    store = open_store(str(tmp_path / "history.db"))
    try:
        old, head = "a" * 40, "b" * 40
        record(store, old, [[("steady", True), ("wobbly", False)], [("steady", True), ("wobbly", True)]])
        record(store, head, [[("steady", True), ("wobbly", True), ("shaky", True)],
                             [("steady", True), ("wobbly", True), ("shaky", False)]])
        store.record_branch_line("ns/demo", "main", [head, old])
        metrics = OperatorMetrics()
        repos = RepoRegistry()
        context = types.SimpleNamespace(metrics=metrics, store=store, repos=repos)

        async def scenario():
            flaky = run_metrics.FlakyCases(context, refresh_seconds=0.2)
            # A poll ending after its Repo's deletion (its daemon gone): no series comes back.
            flaky.branches_tested("ns", "demo", {"main": head})
            await asyncio.sleep(0.3)
            assert ("ns", "demo") not in metrics.figures.flaky
            repos.register("ns", "demo", "uid-1", {"url": "https://example.com/demo.git"})
            flaky.refresh_soon("ns", "demo")
            for _ in range(100):
                if ("ns", "demo") in metrics.figures.flaky:
                    break
                await asyncio.sleep(0.02)
            first = dict(metrics.figures.flaky[("ns", "demo")])
            flaky.forget("ns", "demo")
            await flaky.close()
            return first

        # wobbly on the old commit, shaky on the head, and the task itself on both: the rows
        # `testlooper flaky` prints.
        assert asyncio.run(scenario()) == {"main": 3}
        assert ("ns", "demo") not in metrics.figures.flaky
    finally:
        store.close()
