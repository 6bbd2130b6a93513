"""The TestRun phase machine (decisions/phases.py): every transition, one test each."""

from phases_helpers import T0, Driver, a_testrun, pool, running_pod

from testlooper.decisions.phases import (
    CreatePod, CreateSecret, DeletePod, DeleteSecret, EmitEvent, PodObservation, RecordAttempt, RunResult,
    Settings, format_time, merged, observe_pod, observe_result, observe_secret, queued_demand,
)

PASSED, FAILED = RunResult("passed"), RunResult("failed")


def kinds_of(actions):
    return [type(action).__name__ for action in actions]


def events(decision):
    return [(a.type, a.reason) for a in decision.actions if isinstance(a, EmitEvent)]


def placed(driver, now=T0, admitted=1, **observed):
    return driver.decide(now, admitted=admitted, **observed)


# -- before any run ----------------------------------------------------------------------------

def test_a_new_testrun_is_left_to_admission_a_moment_with_nothing_written():
    d = Driver(a_testrun(runs=4, created=T0))
    decision = d.decide(T0 + 0.5)
    assert decision.status_patch is None and decision.actions == []
    assert decision.awaits_admission == "p" and decision.wake_after == 9.5
    assert queued_demand(d.obj, T0 + 0.5) is None  # not without the pools: placed nowhere yet
    demand = queued_demand(d.obj, T0 + 0.5, pools=d.pools)
    assert (demand.pool, demand.count) == ("p", 4)
    # Admitted meanwhile: its first write says Running.
    decision = d.decide(T0 + 1, admitted=2)
    assert d.status["phase"] == "Running" and d.status["workerPool"] == "p" and d.status["startedRuns"] == 2
    assert d.status["runnableSince"] == format_time(T0)  # its queue wait counts from its creation
    assert kinds_of(decision.creates) == ["CreateSecret", "CreatePod"] * 2
    assert events(decision) == [("Normal", "Running")]


def test_a_new_testrun_that_waits_for_a_build_or_is_cancelled_is_not_left_to_admission():
    for spec in ({"dependsOn": ["b"]}, {"cancel": True}):
        d = Driver(a_testrun(**spec))
        assert queued_demand(d.obj, T0, pools=d.pools) is None
        assert d.decide(T0, builds={"b": ("Running", "")}).status_patch["phase"] in ("Blocked", "Cancelled")
    reused = Driver(a_testrun(annotations={"testlooper.dev/result-from-testrun": "old"}))
    assert queued_demand(reused.obj, T0, pools=reused.pools) is None
    # Its pods exist (an admitted decision's status write was lost): adopted now, not left.
    lost = Driver(a_testrun(runs=2))
    lost.decide(T0, pods=[running_pod(1)])
    assert lost.status["phase"] == "Running" and lost.status["active"]["1"]["state"] == "Placed"
    unplaced = Driver(a_testrun(definition={"platform": "windows"}))
    assert queued_demand(unplaced.obj, T0, pools=unplaced.pools) is None
    assert unplaced.decide(T0).status_patch["phase"] == "Queued"  # no pool takes it: said at once


def test_a_new_testrun_without_builds_is_queued_in_its_pool_with_its_runs_counted():
    d = Driver(a_testrun(runs=4))
    assert d.decide(T0 + 1).status_patch is None
    decision = d.decide(T0 + 1, admission_declined=True)  # a round found no room for it
    assert d.status["phase"] == "Queued" and d.status["workerPool"] == "p"
    assert d.status["runCounts"] == {"total": 4, "passed": 0, "failed": 0, "running": 0, "queued": 4, "errored": 0,
                                     "timedOut": 0}
    assert d.status["runsSummary"] == "0/4"
    assert events(decision) == [("Normal", "Queued")]
    assert queued_demand(d.obj, T0).count == 4
    assert d.decide().status_patch is None  # nothing changed: nothing written


def test_blocked_until_the_builds_consumed_succeed():
    d = Driver(a_testrun(dependsOn=["b1", "b2"]))
    d.decide(builds={"b1": ("Running", "")})
    assert d.status["phase"] == "Blocked"
    assert d.status["message"] == "waiting for build b1, b2 to succeed (b2 not found yet)"
    assert d.status["runCounts"]["queued"] == 1
    assert queued_demand(d.obj, T0) is None
    assert d.decide(builds={"b1": ("Running", ""), "b2": ("Queued", "")}).actions == []  # no second event
    assert "runnableSince" not in d.status
    d.decide(T0 + 40, builds={"b1": ("Succeeded", "passed"), "b2": ("Succeeded", "passed")})
    assert d.status["phase"] == "Queued"
    assert d.status["runnableSince"] == format_time(T0 + 40)  # its runs queue from then
    d.decide(T0 + 50, builds={"b1": ("Succeeded", "passed"), "b2": ("Succeeded", "passed")})
    assert d.status["runnableSince"] == format_time(T0 + 40)


def test_a_failed_build_ends_its_consumer_as_blocked():
    d = Driver(a_testrun(dependsOn=["b1", "b2"]))
    decision = d.decide(builds={"b1": ("Failed", "failed"), "b2": ("Succeeded", "passed")})
    assert (d.status["phase"], d.status["result"]) == ("Failed", "blocked")
    assert d.status["message"] == "needs build b1, which failed"
    assert d.status["runCounts"]["queued"] == 0 and "completionTime" in d.status
    assert events(decision) == [("Warning", "Blocked")]
    assert d.decide(builds={}).status_patch is None  # ended for good


def test_a_cancelled_build_cancels_its_consumer():
    d = Driver(a_testrun(dependsOn=["b"]))
    d.decide(builds={"b": ("Cancelled", "cancelled")})
    assert (d.status["phase"], d.status["result"]) == ("Cancelled", "cancelled")
    assert "which was cancelled" in d.status["message"]


def test_once_placed_the_builds_no_longer_matter():
    d = Driver(a_testrun(runs=2, dependsOn=["b"]))
    d.decide(builds={"b": ("Succeeded", "passed")})
    placed(d)
    d.decide(builds={})  # the build's TestRun was deleted (retention): the runs go on
    assert d.status["phase"] == "Running"


def test_no_pool_takes_it_it_stays_queued_and_says_why_once():
    d = Driver(a_testrun(definition={"platform": "windows", "min_cores": 2}), pools=[pool(platform="linux")])
    decision = d.decide()
    assert d.status["phase"] == "Queued" and "workerPool" not in d.status
    assert d.status["message"] == "no WorkerPool takes it: it needs platform windows, 2 cores and 0 GB per pod"
    assert events(decision) == [("Warning", "NoWorkerPool")]
    assert queued_demand(d.obj, T0) is None
    assert d.decide().actions == []
    d.pools.append(pool("win", platform="windows"))
    d.decide()
    assert d.status["workerPool"] == "win"


def test_a_named_pool_that_does_not_exist_is_said():
    d = Driver(a_testrun(workerPool="gpu"))
    d.decide()
    assert d.status["message"] == "WorkerPool gpu does not exist"


def test_placement_goes_to_the_first_pool_by_priority_that_fits_and_sticks():
    pools = [pool("small", priority=10, maxPodCores=2), pool("big", priority=1), pool("win", platform="windows",
                                                                                     priority=99)]
    d = Driver(a_testrun(definition={"min_cores": 4}), pools=pools)
    assert queued_demand(d.obj, T0, pools=pools).pool == "big"
    d.decide(T0 + 10)  # no round said anything within admission_wait_seconds: said Queued all the same
    assert d.status["workerPool"] == "big"
    d.pools = [pool("other", priority=50), *pools]
    d.decide()
    assert d.status["workerPool"] == "big"


def test_reuse_is_succeeded_at_once():
    d = Driver(a_testrun(runs=3, annotations={"testlooper.dev/result-from-testrun": "old",
                                            "testlooper.dev/result-from-commit": "a" * 40}))
    d.decide()
    assert (d.status["phase"], d.status["result"], d.status["runsSummary"]) == ("Succeeded", "passed", "3/3")
    assert d.status["resultFrom"] == {"commit": "a" * 40, "testRun": "old"}


# -- runs as pods ------------------------------------------------------------------------------

def test_admitted_runs_become_pods_in_index_order_secret_first():
    d = Driver(a_testrun(runs=5))
    d.decide()
    decision = placed(d, admitted=2)
    assert decision.creates == [CreateSecret(1, 1), CreatePod(1, 1), CreateSecret(2, 1), CreatePod(2, 1)]
    assert d.status["phase"] == "Running" and d.status["startTime"] == format_time(T0)
    assert d.status["startedRuns"] == 2 and sorted(d.status["active"]) == ["1", "2"]
    assert (d.status["runCounts"]["running"], d.status["runCounts"]["queued"]) == (2, 3)
    assert queued_demand(d.obj, T0).count == 3
    assert placed(d, admitted=5, pods=[running_pod(1), running_pod(2)]).creates == [
        CreateSecret(3, 1), CreatePod(3, 1), CreateSecret(4, 1), CreatePod(4, 1), CreateSecret(5, 1), CreatePod(5, 1)]
    assert queued_demand(d.obj, T0) is None


def test_a_result_ends_its_run_once_and_its_pod_and_secret_go():
    d = Driver(a_testrun(runs=2))
    d.decide()
    placed(d, admitted=2)
    pods = [running_pod(1), running_pod(2)]
    decision = d.decide(T0 + 5, pods=pods, results={(1, 1): PASSED})
    assert decision.afterwards == [DeletePod(1, 1), DeleteSecret(1, 1)]
    assert d.status["runCounts"]["passed"] == 1 and "1" not in d.status["active"]
    assert decision.status_patch["active"] == {"1": None}  # only what changed is written
    # The same result again, its pod not deleted yet: counted once, the pod goes again.
    again = d.decide(T0 + 6, pods=pods, results={(1, 1): PASSED})
    assert d.status["runCounts"]["passed"] == 1
    assert again.actions == [DeletePod(1, 1), DeleteSecret(1, 1)]


def test_every_run_ended_decides_the_result_as_the_local_runner_does():
    cases = [
        ([PASSED, PASSED], "passed", "Succeeded"),
        ([PASSED, FAILED], "flaky", "Failed"),
        ([FAILED, FAILED], "failed", "Failed"),
        ([FAILED, RunResult("timeout")], "timeout", "Failed"),
        ([RunResult("error"), FAILED], "error", "Error"),
    ]
    for results, result, phase in cases:
        d = Driver(a_testrun(runs=2))
        d.decide()
        placed(d, admitted=2)
        decision = d.decide(T0 + 9, pods=[running_pod(1), running_pod(2)],
                            results={(1, 1): results[0], (2, 1): results[1]})
        assert (d.status["phase"], d.status["result"]) == (phase, result), results
        assert "active" not in d.status and d.status["completionTime"] == format_time(T0 + 9)
        assert ("Normal" if result == "passed" else "Warning", "Ended") in events(decision)
    assert d.status["runCounts"]["errored"] == 1


def test_timeouts_are_failed_runs_and_counted_as_such():
    d = Driver(a_testrun(runs=1))
    d.decide()
    placed(d)
    d.decide(T0 + 1, pods=[running_pod(1)], results={(1, 1): RunResult("timeout")})
    assert d.status["runCounts"]["failed"] == d.status["runCounts"]["timedOut"] == 1
    assert d.status["result"] == "timeout"


def test_failing_cases_are_the_first_twenty_once_each_and_the_store_tally_is_shown():
    d = Driver(a_testrun(runs=3))
    d.decide()
    placed(d, admitted=3)
    pods = [running_pod(1), running_pod(2), running_pod(3)]
    many = tuple(f"case{i}" for i in range(30))
    d.decide(T0 + 1, pods=pods, results={(1, 1): RunResult("failed", failed_cases=("a", "b")),
                                         (2, 1): RunResult("failed", failed_cases=("b",) + many)},
             cases={"total": 40, "passed": 10, "failed": 30})
    assert d.status["failingCases"][:3] == ["a", "b", "case0"] and len(d.status["failingCases"]) == 20
    assert d.status["cases"] == {"total": 40, "passed": 10, "failed": 30} and d.status["casesSummary"] == "10/40"


def test_raising_runs_adds_runs_while_running_and_reopens_an_ended_testrun():
    d = Driver(a_testrun(runs=1))
    d.decide()
    placed(d)
    d.obj["spec"]["runs"] = 2
    d.decide(T0 + 1, pods=[running_pod(1)])
    assert d.status["runCounts"]["total"] == 2 and d.status["runCounts"]["queued"] == 1
    assert placed(d, T0 + 2, pods=[running_pod(1)]).creates == [CreateSecret(2, 1), CreatePod(2, 1)]
    d.decide(T0 + 3, pods=[running_pod(1), running_pod(2)], results={(1, 1): PASSED, (2, 1): FAILED})
    assert d.status["result"] == "flaky"
    d.obj["spec"]["runs"] = 4  # testlooper rerun --runs 4
    decision = d.decide(T0 + 4)
    assert d.status["phase"] == "Running" and "result" not in d.status and "completionTime" not in d.status
    assert ("Normal", "RunsAdded") in events(decision)
    assert queued_demand(d.obj, T0 + 4).count == 2
    placed(d, T0 + 5, admitted=2)
    d.decide(T0 + 6, pods=[running_pod(3), running_pod(4)], results={(3, 1): PASSED, (4, 1): PASSED})
    assert (d.status["result"], d.status["runsSummary"]) == ("flaky", "3/4")


def test_a_reopened_testrun_does_not_wait_for_builds_that_are_gone():
    d = Driver(a_testrun(runs=1, dependsOn=["b"]))
    d.decide(builds={"b": ("Succeeded", "passed")})
    placed(d)
    d.decide(T0 + 1, pods=[running_pod(1)], results={(1, 1): PASSED})
    d.obj["spec"]["runs"] = 2
    d.decide(T0 + 2, builds={})  # the build's TestRun is past retention
    assert d.status["phase"] == "Running" and queued_demand(d.obj, T0 + 2).count == 1


def test_a_pool_deleted_after_placement_is_said():
    d = Driver(a_testrun(runs=1))
    d.decide(T0, admission_declined=True)
    d.pools = [pool("other")]
    d.decide(T0 + 1)
    assert d.status["message"] == "WorkerPool p does not exist any more"


def test_lowering_runs_keeps_the_runs_started():
    d = Driver(a_testrun(runs=3))
    d.decide()
    placed(d, admitted=2)
    d.obj["spec"]["runs"] = 1
    d.decide(T0 + 1, pods=[running_pod(1), running_pod(2)], results={(1, 1): PASSED, (2, 1): PASSED})
    assert (d.status["result"], d.status["runsSummary"]) == ("passed", "2/2")


def test_active_runs_are_capped_so_the_status_stays_bounded():
    d = Driver(a_testrun(runs=100_000))
    d.decide()
    settings = Settings(max_active_runs=3)
    decision = d.decide(admitted=50, settings=settings)
    assert len(decision.creates) == 6 and len(d.status["active"]) == 3
    assert queued_demand(d.obj, T0, settings) is None
    assert d.status["runCounts"]["queued"] == 99_997


# -- infrastructure failures --------------------------------------------------------------------

def started_one(runs=1, **spec):
    d = Driver(a_testrun(runs=runs, **spec))
    d.decide()
    placed(d)
    return d


def test_an_evicted_pod_is_retried_with_the_reason_recorded():
    d = started_one()
    evicted = PodObservation(1, 1, "Failed", created=T0, started=T0, reason="Evicted",
                             message="The node was low on resource: memory.")
    decision = d.decide(T0 + 60, pods=[evicted])
    assert RecordAttempt(1, 1, "Evicted", "The node was low on resource: memory.", True) in decision.actions
    assert [DeletePod(1, 1), DeleteSecret(1, 1)] == [a for a in decision.actions if isinstance(a, (DeletePod, DeleteSecret))]
    assert ("Warning", "Evicted") in events(decision)
    assert d.status["active"]["1"]["state"] == "Waiting" and d.status["active"]["1"]["attempt"] == 2
    assert d.status["attempts"] == [{"run": 1, "attempt": 1, "reason": "Evicted", "time": format_time(T0 + 60),
                                     "message": "The node was low on resource: memory."}]
    assert d.status["infraRetries"] == 1 and d.status["runCounts"]["queued"] == 1
    assert queued_demand(d.obj, T0 + 60).count == 1
    assert placed(d, T0 + 61, pods=[evicted]).creates == [CreateSecret(1, 2), CreatePod(1, 2)]
    d.decide(T0 + 62, pods=[running_pod(1, 2, T0 + 61)], results={(1, 1): FAILED, (1, 2): PASSED})
    assert d.status["result"] == "passed"  # the late result of the lost attempt is not counted


def test_infrastructure_retries_stop_at_the_limit_and_the_run_is_an_error():
    d = started_one()
    settings = Settings(max_infra_retries=1)
    gone = d.decide(T0 + 60, settings=settings)  # no pod at all: it was deleted
    assert d.status["attempts"][-1]["reason"] == "PodDeleted"
    placed(d, T0 + 61, settings=settings)
    decision = d.decide(T0 + 200, settings=settings)
    assert RecordAttempt(1, 2, "PodDeleted", "its pod disappeared before its agent reported a result", False) \
        in decision.actions
    assert ("Warning", "RunError") in events(decision)
    assert (d.status["result"], d.status["runCounts"]["errored"], d.status["infraRetries"]) == ("error", 1, 1)
    assert gone.wake_after is None


def test_a_pod_not_listed_yet_is_waited_for_briefly():
    d = started_one()
    decision = d.decide(T0 + 10)
    assert decision.status_patch is None and decision.wake_after == 20


def test_image_pull_failing_is_retried_after_its_grace_period():
    d = started_one()
    pulling = PodObservation(1, 1, "Pending", created=T0, started=T0, waiting_reason="ImagePullBackOff",
                             waiting_message="Back-off pulling image \"nope:1\"", waiting_since=T0 + 1)
    waiting = d.decide(T0 + 100, pods=[pulling])
    assert waiting.status_patch is None and waiting.wake_after == 201
    d.decide(T0 + 302, pods=[pulling])
    assert d.status["attempts"][-1]["reason"] == "ImagePullBackOff"
    assert d.status["attempts"][-1]["message"] == 'ImagePullBackOff: Back-off pulling image "nope:1"'
    config = PodObservation(1, 2, "Pending", created=T0, waiting_reason="CreateContainerConfigError",
                            waiting_message="secret not found")
    placed(d, T0 + 303)
    d.decide(T0 + 700, pods=[config])
    assert d.status["attempts"][-1]["reason"] == "ContainerCannotStart"


def test_a_merely_pending_pod_waits_up_to_the_pending_timeout_then_the_run_is_an_error():
    d = started_one()
    pending = PodObservation(1, 1, "Pending", created=T0, unschedulable="0/3 nodes are available: 3 Insufficient cpu.")
    waiting = d.decide(T0 + 599, pods=[pending])
    assert waiting.status_patch is None and waiting.wake_after == 1
    decision = d.decide(T0 + 601, pods=[pending])
    assert (d.status["result"], d.status["runCounts"]["errored"]) == ("error", 1)
    assert ("Warning", "PendingTimeout") in events(decision)
    assert not [a for a in decision.actions if isinstance(a, RecordAttempt)]  # not retried
    assert DeletePod(1, 1) in decision.actions


def test_a_pod_whose_init_containers_run_is_not_pending_timed_out():
    d = started_one()
    assert d.decide(T0 + 5000, pods=[PodObservation(1, 1, "Pending", created=T0, started=T0 + 5)]).status_patch is None


def test_a_lost_heartbeat_is_an_infrastructure_failure_but_an_operator_restart_is_not():
    d = started_one()
    pod = running_pod(1, at=T0)
    assert d.decide(T0 + 100, pods=[pod], heartbeats={(1, 1): T0 + 90}).wake_after == 170
    assert d.decide(T0 + 400, pods=[pod], operator_started=T0 + 350).status_patch is None
    decision = d.decide(T0 + 400, pods=[pod], heartbeats={(1, 1): T0 + 150})
    assert d.status["attempts"][-1]["reason"] == "HeartbeatLost"
    assert d.status["attempts"][-1]["message"] == "no heartbeat from its agent for 250 s"
    assert DeletePod(1, 1) in decision.actions


def test_a_pod_that_ended_without_a_result_is_an_infrastructure_failure_after_a_grace():
    d = started_one()
    ended = PodObservation(1, 1, "Failed", created=T0, started=T0, finished=T0 + 50,
                           exit_codes=(("test", 1), ("report", 137)))
    assert d.decide(T0 + 60, pods=[ended]).wake_after == 20
    d.decide(T0 + 81, pods=[ended])
    assert d.status["attempts"][-1] == {"run": 1, "attempt": 1, "reason": "NoResult", "time": format_time(T0 + 81),
                                        "message": "the pod ended Failed (exit codes test=1, report=137) "
                                                   "without a result from its agent"}


def test_a_result_wins_over_the_pod_end_state():
    d = started_one()
    ended = PodObservation(1, 1, "Failed", created=T0, reason="Evicted")
    d.decide(T0 + 60, pods=[ended], results={(1, 1): FAILED})
    assert d.status["result"] == "failed" and "attempts" not in d.status


def test_a_pod_past_its_deadline_without_a_result_is_an_error_not_retried():
    d = started_one()
    d.decide(T0 + 60, pods=[PodObservation(1, 1, "Failed", created=T0, reason="DeadlineExceeded")])
    assert d.status["result"] == "error" and "attempts" not in d.status


def test_node_lost_and_preemption_are_infrastructure_failures():
    d = started_one(runs=2)
    placed(d)
    d.decide(T0 + 5, pods=[PodObservation(1, 1, "Unknown", created=T0),
                           PodObservation(2, 1, "Failed", created=T0, disruption="PreemptionByScheduler")])
    assert [(a["run"], a["reason"]) for a in d.status["attempts"]] == [(1, "NodeLost"), (2, "Evicted")]


def test_a_pod_being_deleted_is_waited_for_and_its_result_still_counts():
    d = started_one()
    deleting = PodObservation(1, 1, "Running", created=T0, started=T0, deleting=True)
    assert d.decide(T0 + 100, pods=[deleting]).status_patch is None
    pending_deleting = PodObservation(1, 1, "Pending", created=T0, deleting=True)
    assert d.decide(T0 + 5000, pods=[pending_deleting]).status_patch is None
    decision = d.decide(T0 + 1001, pods=[deleting], results={(1, 1): PASSED}, heartbeats={(1, 1): T0 + 1000})
    assert d.status["result"] == "passed"
    assert DeletePod(1, 1) not in decision.actions and DeleteSecret(1, 1) in decision.actions


def test_a_pod_stuck_deleting_on_a_silent_node_is_a_lost_heartbeat():
    d = started_one()
    d.decide(T0 + 1000, pods=[PodObservation(1, 1, "Running", created=T0, started=T0, deleting=True)])
    assert d.status["attempts"][-1]["reason"] == "HeartbeatLost"


def test_a_cancelled_result_nobody_asked_for_is_an_interruption():
    d = started_one()
    d.decide(T0 + 5, pods=[running_pod(1)], results={(1, 1): RunResult("cancelled", "SIGTERM")})
    assert d.status["attempts"][-1]["reason"] == "Interrupted"


# -- builds' retries --------------------------------------------------------------------------

def test_a_failed_build_is_retried_per_max_retries_after_its_wait_and_infra_losses_do_not_count():
    d = started_one(kind="build", definition={"max_retries": 1, "retry_wait_seconds": 30})
    # An infrastructure loss first: it spends none of the build's retries.
    d.decide(T0 + 1, pods=[PodObservation(1, 1, "Failed", created=T0, reason="Evicted")])
    placed(d, T0 + 2)
    decision = d.decide(T0 + 3, pods=[running_pod(1, 2)], results={(1, 2): FAILED})
    entry = d.status["active"]["1"]
    assert (entry["state"], entry["attempt"], entry["notBefore"]) == ("Waiting", 3, format_time(T0 + 33))
    assert decision.wake_after == 30
    assert RecordAttempt(1, 2, "BuildRetried", "failed", True, infrastructure=False) in decision.actions
    assert d.status["infraRetries"] == 1  # the build's retry is not an infrastructure retry
    assert queued_demand(d.obj, T0 + 10) is None and queued_demand(d.obj, T0 + 33).count == 1
    assert placed(d, T0 + 10).creates == []
    assert placed(d, T0 + 33).creates == [CreateSecret(1, 3), CreatePod(1, 3)]
    d.decide(T0 + 40, pods=[running_pod(1, 3)], results={(1, 3): FAILED})
    assert (d.status["phase"], d.status["result"]) == ("Failed", "failed")


def test_a_build_retry_never_starts_before_its_wait_though_the_status_counts_whole_seconds():
    d = started_one(kind="build", definition={"max_retries": 1, "retry_wait_seconds": 2})
    decision = d.decide(T0 + 0.9, pods=[running_pod(1)], results={(1, 1): FAILED})
    assert d.status["active"]["1"]["notBefore"] == format_time(T0 + 3)  # not T0 + 2, 1.1 s after the verdict
    assert decision.wake_after >= 2
    assert queued_demand(d.obj, T0 + 2.9) is None and queued_demand(d.obj, T0 + 3).count == 1


def test_a_test_is_never_retried_on_its_verdict():
    d = started_one(definition={"max_retries": 3})
    d.decide(T0 + 3, pods=[running_pod(1)], results={(1, 1): FAILED})
    assert d.status["result"] == "failed"


# -- cancellation ------------------------------------------------------------------------------

def test_cancel_deletes_the_pods_and_ends_cancelled():
    d = started_one(runs=3)
    placed(d, admitted=1)
    d.obj["spec"]["cancel"] = True
    decision = d.decide(T0 + 5, pods=[running_pod(1)], secrets=[(1, 1), (2, 1)])
    assert {DeletePod(1, 1), DeleteSecret(1, 1), DeleteSecret(2, 1)} == set(decision.afterwards) - {
        a for a in decision.actions if isinstance(a, EmitEvent)}
    assert (d.status["phase"], d.status["result"], d.status["message"]) == ("Cancelled", "cancelled", "cancelled")
    assert d.status["runCounts"]["running"] == d.status["runCounts"]["queued"] == 0 and "active" not in d.status
    assert queued_demand(d.obj, T0 + 5) is None
    # A pod still there afterwards is deleted again; nothing else changes.
    assert d.decide(T0 + 6, pods=[running_pod(1)]).actions == [DeletePod(1, 1), DeleteSecret(1, 1)]


def test_cancel_before_anything_ran_says_why():
    d = Driver(a_testrun(cancel=True))
    d.decide()
    assert d.status["message"] == "cancelled: no tested branch contains its commit any more"


# -- repairing after a crash -------------------------------------------------------------------

def test_pods_created_but_never_recorded_are_adopted_not_created_twice():
    d = Driver(a_testrun(runs=4))
    d.decide()
    # The admission created runs 1 and 3 (2's create failed), then the operator died before
    # writing the status.
    decision = d.decide(T0 + 5, pods=[running_pod(1), running_pod(3)])
    assert decision.creates == []
    assert d.status["startedRuns"] == 3
    assert {k: v["state"] for k, v in d.status["active"].items()} == {"1": "Placed", "2": "Waiting", "3": "Placed"}
    assert placed(d, T0 + 6, admitted=2, pods=[running_pod(1), running_pod(3)]).creates == [
        CreateSecret(2, 1), CreatePod(2, 1), CreateSecret(4, 1), CreatePod(4, 1)]


def test_a_retry_created_but_never_recorded_is_adopted_and_old_attempts_deleted():
    d = started_one()
    decision = d.decide(T0 + 5, pods=[PodObservation(1, 1, "Failed", created=T0, reason="Evicted"), running_pod(1, 2)])
    assert DeletePod(1, 1) in decision.actions
    assert d.status["active"]["1"]["attempt"] == 2 and d.status["active"]["1"]["state"] == "Placed"


def test_a_pod_of_a_run_already_counted_is_deleted():
    d = started_one(runs=2)
    d.decide(T0 + 1, pods=[running_pod(1)], results={(1, 1): PASSED})
    # The delete was lost; the pod lingers while run 2 is not started yet.
    assert d.decide(T0 + 2, pods=[running_pod(1)], results={(1, 1): PASSED}).actions == [
        DeletePod(1, 1), DeleteSecret(1, 1)]
    assert d.status["runCounts"]["passed"] == 1


def test_a_secret_left_by_a_crash_goes_unless_its_attempt_is_current_or_being_created():
    d = Driver(a_testrun(runs=3))
    d.decide()
    # Run 1 was placed; a crash came between run 2's Secret and its pod; run 3's Secret is from
    # a run that never started, and (9, 1) from nothing known at all.
    placed(d)
    decision = placed(d, T0 + 1, pods=[running_pod(1)], secrets=[(1, 1), (2, 1), (9, 1)])
    assert decision.creates == [CreateSecret(2, 1), CreatePod(2, 1)]
    assert [a for a in decision.actions if isinstance(a, DeleteSecret)] == [DeleteSecret(9, 1)]
    ended = d.decide(T0 + 2, pods=[running_pod(1)], results={(1, 1): PASSED}, secrets=[(1, 1), (2, 1), (7, 2)])
    assert [a for a in ended.actions if isinstance(a, DeleteSecret)] == [DeleteSecret(1, 1), DeleteSecret(7, 2)]


# -- reading pods ------------------------------------------------------------------------------

def pod_dict(phase="Pending", labels=None, **status):
    return {"metadata": {"name": "x", "creationTimestamp": format_time(T0),
                         "labels": {"testlooper.dev/run-index": "3", "testlooper.dev/attempt": "2",
                                    **(labels or {})}},
            "status": {"phase": phase, **status}}


def test_observe_pod_reads_what_the_machine_needs():
    assert observe_pod({"metadata": {"labels": {}}}) is None
    evicted = observe_pod(pod_dict("Failed", reason="Evicted", message="low on memory"))
    assert (evicted.run, evicted.attempt, evicted.reason, evicted.created) == (3, 2, "Evicted", T0)
    pulling = observe_pod(pod_dict(
        conditions=[{"type": "PodScheduled", "status": "True", "lastTransitionTime": format_time(T0 + 3)}],
        startTime=format_time(T0 + 4),
        initContainerStatuses=[{"name": "init", "state": {"waiting": {"reason": "ErrImagePull", "message": "no"}}}]))
    assert (pulling.waiting_reason, pulling.waiting_since, pulling.started) == ("ErrImagePull", T0 + 3, T0 + 4)
    unscheduled = observe_pod(pod_dict(conditions=[{"type": "PodScheduled", "status": "False",
                                                    "message": "0/1 nodes are available"}]))
    assert unscheduled.unschedulable == "0/1 nodes are available"
    ended = observe_pod({**pod_dict("Failed", containerStatuses=[
        {"name": "test", "state": {"terminated": {"exitCode": 2, "finishedAt": format_time(T0 + 9)}}},
        {"name": "report", "state": {"running": {"startedAt": format_time(T0 + 5)}}}],
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}])})
    assert (ended.exit_codes, ended.finished, ended.running_since, ended.disruption) == (
        (("test", 2),), T0 + 9, T0 + 5, "DeletionByTaintManager")
    deleting = pod_dict("Running")
    deleting["metadata"]["deletionTimestamp"] = format_time(T0)
    assert observe_pod(deleting).deleting


def test_observe_result_keeps_the_failing_case_names_once_and_bounded():
    cases = [{"name": "a", "success": True}, {"name": "b", "success": False}, {"name": "b", "success": False}]
    cases += [{"name": f"c{i}", "success": False} for i in range(40)]
    result = observe_result({"result": "failed", "error": "", "cases": cases})
    assert result.result == "failed" and result.failed_cases[:2] == ("b", "c0") and len(result.failed_cases) == 20
    assert observe_result({}) == RunResult("error")


def test_observe_secret_reads_its_run_and_attempt():
    assert observe_secret({"metadata": {"labels": {"testlooper.dev/run-index": "4", "testlooper.dev/attempt": "1"}}}) \
        == (4, 1)
    assert observe_secret({"metadata": {"labels": {"testlooper.dev/run-index": "x"}}}) is None


def test_merged_applies_a_json_merge_patch():
    status = {"a": 1, "active": {"1": {"x": 1}, "2": {"x": 2}}, "list": [1]}
    assert merged(status, {"a": None, "active": {"1": None, "3": {"x": 3, "y": None}}, "list": [2]}) == {
        "active": {"2": {"x": 2}, "3": {"x": 3}}, "list": [2]}
    assert merged(status, None) is status


def test_the_status_of_100000_runs_stays_bounded_as_runs_come_and_go():
    import json

    d = Driver(a_testrun(runs=100_000))
    d.decide()
    sizes = []
    for round_number in range(1, 6):
        now = T0 + round_number
        pods = [running_pod(int(run), entry["attempt"]) for run, entry in d.status.get("active", {}).items()]
        results = {(p.run, p.attempt): RunResult("failed", failed_cases=(f"c{p.run}",)) for p in pods[:600]}
        d.decide(now, admitted=1000, pods=pods, results=results)
        sizes.append(len(json.dumps(d.status)))
    assert len(d.status["active"]) == 1000 and d.status["startedRuns"] == 1000 + 4 * 600
    assert d.status["runCounts"]["failed"] == 4 * 600 and len(d.status["failingCases"]) == 20
    assert max(sizes) < 100_000, sizes


def test_with_the_agents_reports_unknown_no_run_is_judged_but_new_runs_and_cancels_go_on():
    # Redis down: a pod gone, a pod ended without a result seen, and a silent agent all wait.
    d = started_one()
    ended = PodObservation(1, 1, "Succeeded", created=T0, started=T0, finished=T0 + 1)
    for pods in ([], [ended], [running_pod(1, at=T0)]):
        decision = d.decide(T0 + 10_000, pods=pods, reports_known=False)
        assert not any(isinstance(a, (RecordAttempt, DeletePod)) for a in decision.actions), decision.actions
        assert d.status["active"]["1"] == {"attempt": 1, "state": "Placed", "since": format_time(T0)}
        assert decision.wake_after == 2.0
    # ... while runs not started yet still start, and a cancel still cancels.
    more = Driver(a_testrun(runs=2))
    placed(more, T0, admitted=1)
    assert placed(more, T0 + 1, admitted=1, pods=[running_pod(1, at=T0)], reports_known=False).creates == [
        CreateSecret(2, 1), CreatePod(2, 1)]
    more.obj["spec"]["cancel"] = True
    more.decide(T0 + 2, pods=[running_pod(1, at=T0), running_pod(2, at=T0 + 1)], reports_known=False)
    assert more.status["phase"] == "Cancelled"
    # Known again, the result counts.
    d.decide(T0 + 10_001, pods=[ended], results={(1, 1): PASSED})
    assert d.status["result"] == "passed"


def test_an_admitted_new_testrun_starts_runs_only_in_the_pool_whose_room_admitted_them():
    """A new TestRun has no status.workerPool: the round counts it where `pool_for` puts it
    over the round's listing. A pool created (or edited) before its admitted decision may
    place it elsewhere: then it starts nothing there (admitted for another pool's room), and
    is counted again by the next round (review of session 4)."""
    round_pools = [pool("big", platform="linux", priority=1, maxWorkers=10)]
    testrun = a_testrun(runs=3, created=T0)
    demand = queued_demand(testrun, T0 + 1, pools=round_pools)
    assert demand.pool == "big"
    tiny_first = [pool("tiny", platform="linux", priority=10, maxWorkers=1), *round_pools]
    d = Driver(testrun, pools=tiny_first)
    decision = d.decide(T0 + 1.5, admitted=3, admitted_pool="big")
    assert decision.creates == [] and decision.status_patch is None and decision.awaits_admission == "tiny"
    decision = Driver(a_testrun(runs=3, created=T0), pools=tiny_first).decide(T0 + 1.5, admitted=1, admitted_pool="tiny")
    assert kinds_of(decision.creates) == ["CreateSecret", "CreatePod"] and decision.status_patch["workerPool"] == "tiny"
