"""Pool admission within limits, usage counted from pods, and the rules both shells share."""

import math
import random

from phases_helpers import T0, a_testrun, pool

from testlooper.decisions import rules
from testlooper.decisions.phases import queued_demand
from testlooper.decisions.pools import (
    Demand, Usage, admit, counting_view, pool_status, pool_usage, run_size, run_sizes,
)
from testlooper.local import schedule
from testlooper.local.schedule import Free


def demand(name, count, pool="p", priority=0, created="2026-12-01T08:00:00Z", cores=0.0, ram=0.0):
    return Demand(("ns", name), pool, priority, created, cores, ram, count)


def test_higher_priority_first_then_older_then_by_name():
    pools = [pool(maxWorkers=5)]
    granted = admit(pools, {}, [
        demand("old", 3, created="2026-12-01T07:00:00Z"),
        demand("urgent", 3, priority=5, created="2026-12-01T09:00:00Z"),
        demand("new", 3, created="2026-12-01T08:00:00Z"),
    ])
    assert granted == {("ns", "urgent"): 3, ("ns", "old"): 2}
    assert admit(pools, {}, [demand("b", 4), demand("a", 4)]) == {("ns", "a"): 4, ("ns", "b"): 1}


def test_each_cap_holds_counting_what_the_pods_already_hold():
    assert admit([pool(maxWorkers=4)], {"p": Usage(3)}, [demand("t", 10)]) == {("ns", "t"): 1}
    assert admit([pool(maxCores=8)], {"p": Usage(1, 2)}, [demand("t", 10, cores=2)]) == {("ns", "t"): 3}
    assert admit([pool(maxRamGb=1.0)], {}, [demand("t", 10, ram=0.1)]) == {("ns", "t"): 10}
    assert admit([pool(maxRamGb=0.95)], {}, [demand("t", 10, ram=0.1)]) == {("ns", "t"): 9}
    assert admit([pool(maxWorkers=0)], {}, [demand("t", 10)]) == {}
    assert admit([pool(maxWorkers=2)], {"p": Usage(5)}, [demand("t", 1)]) == {}  # a lowered cap: none start
    assert admit([pool(maxCores=2)], {"p": Usage(1, 3)}, [demand("t", 1)]) == {}  # over, even for 0-core runs


def test_no_limits_admit_everything_and_unknown_pools_nothing():
    assert admit([pool()], {}, [demand("t", 100_000, cores=64)]) == {("ns", "t"): 100_000}
    assert admit([pool()], {}, [demand("t", 5, pool="gone")]) == {}


def test_a_run_that_does_not_fit_lets_a_smaller_one_go():
    granted = admit([pool(maxCores=4)], {"p": Usage(1, 2)}, [demand("big", 1, priority=9, cores=4),
                                                             demand("small", 5, cores=1)])
    assert granted == {("ns", "small"): 2}


def test_a_run_asking_more_than_the_pool_has_runs_alone_rather_than_never():
    spec_pool = pool(maxCores=4, maxRamGb=8)
    assert run_size({"min_cores": 16, "min_ram_gb": 2}, spec_pool) == (4, 2)
    assert admit([spec_pool], {}, [demand("t", 3, cores=16)]) == {("ns", "t"): 1}
    assert admit([spec_pool], {"p": Usage(1, 1)}, [demand("t", 3, cores=16)]) == {}
    placed = {"metadata": {"namespace": "ns", "name": "t"}, "spec": {"definition": {"min_cores": 16}},
              "status": {"workerPool": "p"}}
    # One never decided on counts where it would go (admission may start it before its first
    # write); one decided on but placed nowhere (Blocked, say) counts nowhere.
    assert run_sizes([placed, {"metadata": {"name": "u"}, "spec": {}, "status": {}},
                      {"metadata": {"name": "b"}, "spec": {}, "status": {"phase": "Blocked"}}], [spec_pool]) == {
        ("ns", "t"): ("p", 4, 0.0), ("", "u"): ("p", 0.0, 0.0)}


def test_admitting_at_once_equals_admitting_one_by_one_with_the_shared_fits_rule():
    rng = random.Random(7)
    for _ in range(2000):
        free = Free(rng.choice([0, 1, 3, 50, math.inf]), rng.choice([0, 2, 7.5, -1, math.inf]),
                    rng.choice([0, 1, 4.25, -2, math.inf]))
        cores, ram, wanted = rng.choice([0, 1, 2, 0.5]), rng.choice([0, 0.25, 1, 3]), rng.randint(0, 40)
        one_by_one, room = 0, Free(free.jobs, free.cores, free.ram_gb)
        while one_by_one < wanted and rules.fits(cores, ram, room):
            one_by_one += 1
            room.jobs, room.cores, room.ram_gb = room.jobs - 1, room.cores - cores, room.ram_gb - ram
        assert rules.how_many_fit(cores, ram, free, wanted) == one_by_one, (free, cores, ram, wanted)


def pod(testrun, phase="Running", labels=None, deleting=False, namespace="ns"):
    metadata = {"namespace": namespace, "labels": {"testlooper.dev/testrun": testrun, **(labels or {})}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-01T08:00:00Z"
    return {"metadata": metadata, "status": {"phase": phase}}


def test_usage_is_counted_from_the_live_pods():
    sizes = {("ns", "a"): ("p", 2.0, 1.5), ("ns", "b"): ("q", 1.0, 0.0)}
    pods = [pod("a"), pod("a", "Pending"), pod("a", deleting=True), pod("a", "Succeeded"), pod("a", "Failed"),
            pod("b"), pod("gone", labels={"testlooper.dev/worker-pool": "q"}), pod("gone"),
            pod("a", namespace="other")]
    assert pool_usage(pods, sizes) == {"p": Usage(3, 6.0, 4.5), "q": Usage(2, 1.0, 0.0)}


def test_pool_status_shows_usage_and_the_runs_queued_for_it():
    pools = [pool("p", maxWorkers=4), pool("q", priority=5)]
    testruns = [
        {"spec": {"runs": 6}, "status": {"phase": "Running", "workerPool": "p", "runCounts": {"queued": 2}}},
        {"spec": {"runs": 3, "definition": {}}, "status": {}},  # not placed: would go to q
        {"spec": {"runs": 5}, "status": {"phase": "Succeeded", "workerPool": "p"}},
    ]
    status = pool_status(pools[0], pools, testruns, Usage(3, 4.5, 2.0))
    assert (status["workers"], status["cores"], status["ramGb"], status["queued"], status["workersSummary"]) == (
        3, 5, 2.0, 2, "3/4")
    assert pool_status(pools[1], pools, testruns)["queued"] == 3


# -- the shared rules ----------------------------------------------------------------------------

def test_the_local_scheduler_uses_the_shared_rules_themselves():
    for name in ("fit", "fits", "retry_wait", "build_verdict", "blocked_reason", "RETRIED_RESULTS"):
        assert getattr(schedule, name) is getattr(rules, name)


def test_task_result_is_passed_flaky_or_the_worst():
    assert rules.task_result(["passed", "passed"]) == "passed"
    assert rules.task_result(["passed", "failed", "error"]) == "flaky"
    assert rules.task_result(["failed", "timeout"]) == "timeout"
    assert rules.task_result(["failed", "error", "timeout"]) == "error"
    assert rules.task_result(["blocked"]) == "blocked"
    assert rules.task_result_of_counts({"passed": 0, "failed": 2}) == "failed"


def test_retry_wait_counts_only_verdict_attempts_of_builds():
    build = {"max_retries": 2, "retry_wait_seconds": 5}
    assert rules.retry_wait(build, "build", 1, "failed") == 5.0
    assert rules.retry_wait(build, "build", 3, "failed") is None
    assert rules.retry_wait(build, "build", 1, "passed") is None
    assert rules.retry_wait(build, "test", 1, "failed") is None


def test_the_counting_view_of_a_testrun_counts_as_the_testrun_does():
    definition = {"platform": "linux", "min_cores": 2, "min_ram_gb": 1.5, "max_cores": 4,
                  "stages": [{"command": "make test " * 200}], "dependencies": {"src": {"kind": "source"}}}
    pools = [pool("big", maxCores=64, priority=1), pool("p", maxWorkers=3)]
    testruns = [
        a_testrun(runs=5, definition=definition, name="queued", status={"phase": "Queued", "workerPool": "big"}),
        a_testrun(runs=9, definition=definition, name="running", status={
            "phase": "Running", "workerPool": "p", "startedRuns": 4, "runCounts": {"queued": 5},
            "active": {"3": {"attempt": 1, "state": "Placed"}, "4": {"attempt": 2, "state": "Waiting",
                                                                  "notBefore": "2026-01-01T00:00:00Z"}},
            "attempts": [{"run": 4, "reason": "Evicted"}] * 20, "failingCases": ["x"] * 20}),
        a_testrun(definition={**definition, "platform": "windows"}, name="unplaced"),
        a_testrun(definition=definition, name="cancelled", cancel=True, status={"phase": "Queued", "workerPool": "p"}),
        a_testrun(definition=definition, name="ended", status={"phase": "Succeeded", "workerPool": "p"}),
    ]
    views = [counting_view(testrun) for testrun in testruns]
    assert [queued_demand(v, T0) for v in views] == [queued_demand(t, T0) for t in testruns]
    assert run_sizes(views, pools) == run_sizes(testruns, pools)
    assert [pool_status(p, pools, views) for p in pools] == [pool_status(p, pools, testruns) for p in pools]
    assert len(repr(views[1])) < len(repr(testruns[1])) / 3


def test_pods_of_a_pool_with_its_own_namespace_hold_their_cores_and_ram():
    """A pool with spec.namespace runs its pods there (kube/pods.py `run_namespace`): their
    TestRun is found by their run id, not by their namespace, so they hold its cores and RAM
    (before, each counted 1 worker and 0 cores / 0 GB, and maxCores/maxRamGb never held)."""
    far = {"metadata": {"name": "far", "namespace": "ci"},
           "spec": {"provider": "kubernetes", "platform": "linux", "maxWorkers": 10, "namespace": "runners",
                    "maxCores": 4, "maxRamGb": 8}}
    testrun = {"metadata": {"name": "t", "namespace": "ci"},
               "spec": {"definition": {"platform": "linux", "min_cores": 2, "min_ram_gb": 4}},
               "status": {"phase": "Running", "workerPool": "far", "startedRuns": 2}}
    pods = [{"metadata": {"name": f"t-r{run}-a1", "namespace": "runners",
                          "labels": {"testlooper.dev/testrun": "t", "testlooper.dev/worker-pool": "far"},
                          "annotations": {"testlooper.dev/run-id": f"ci.t.{run}.1"}},
             "status": {"phase": "Running"}} for run in (1, 2)]
    assert pool_usage(pods, run_sizes([testrun], [far]))["far"] == Usage(2, 4.0, 8.0)
