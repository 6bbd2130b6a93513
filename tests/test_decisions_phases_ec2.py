"""The phase machine with EC2 instances for workers (Observations.worker "instance"): a task no
instance type holds ends at once, Unschedulable; an instance's boot is bounded by the boot grace;
an instance gone, going or failing its status checks is an infrastructure failure, retried; a
RESULT still wins over all of these."""

from __future__ import annotations

from phases_helpers import T0, Driver, a_testrun, kinds
from testlooper.decisions.ec2 import Instance, observe_instance, unschedulable_on_ec2
from testlooper.decisions.phases import RunResult, Settings
from testlooper.decisions.pools import pool_for

TYPES = [{"type": "m5.large", "cores": 2, "ramGb": 8}, {"type": "r5.8xlarge", "cores": 32, "ramGb": 256}]


def ec2_pool(name="big", platform="linux", **spec):
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"provider": "ec2", "platform": platform, **spec,
                     "ec2": {"region": "us-east-1", "instanceTypes": TYPES, "linuxAmi": "ami-1", "windowsAmi": "ami-2"}}}


def instance(state="running", run_id="ns.t.1.1", launched=T0, **fields):
    return Instance("i-1", "m5.large", state, run_id, launched, "big", **fields)


def placed(driver, now=T0, **observed):
    """The TestRun placed in the pool with its one run's instance asked for."""
    driver.decide(now=now)
    decision = driver.decide(now=now, admitted=1, worker="instance", boot_grace_seconds=600, **observed)
    assert kinds(decision.creates) == ["CreateSecret", "CreatePod"]
    return decision


def test_an_ec2_pool_takes_what_one_of_its_types_holds_whatever_its_pod_ceilings():
    pools = [ec2_pool(maxPodRamGb=1)]
    assert pool_for({"min_ram_gb": 200}, "", pools) == "big"
    assert pool_for({"min_ram_gb": 300}, "", pools) is None
    assert pool_for({"platform": "windows"}, "", pools) is None


def test_a_task_no_type_holds_ends_at_once_as_an_error_saying_what_it_asked_and_what_is_on_offer():
    driver = Driver(a_testrun(runs=3, definition={"min_ram_gb": 300, "min_cores": 4}), pools=[ec2_pool()])
    decision = driver.decide()
    status = driver.status
    assert (status["phase"], status["result"]) == ("Error", "error")
    assert status["runCounts"]["errored"] == 3 and status["runsSummary"] == "0/3"
    [condition] = status["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == ("Unschedulable", "True", "NoInstanceType")
    assert condition["message"] == ("pool big: the task asks for 4 cores and 300 GB of RAM; the largest type on "
                                    "offer is r5.8xlarge (32 cores, 256 GB)")
    assert [a.reason for a in decision.actions if type(a).__name__ == "EmitEvent"] == ["Unschedulable"]
    # Ended: deciding again changes nothing.
    again = driver.decide(now=T0 + 5)
    assert not again.status_patch and not again.creates


def test_without_an_ec2_pool_of_its_platform_a_task_waits_for_a_pool_as_on_pods():
    assert unschedulable_on_ec2({"platform": "windows", "min_ram_gb": 300}, [ec2_pool()]) is None
    driver = Driver(a_testrun(definition={"platform": "windows"}), pools=[ec2_pool()])
    driver.decide()
    assert driver.status["phase"] == "Queued"


def test_an_instance_that_never_sends_a_heartbeat_is_retried_after_the_boot_grace():
    driver = Driver(a_testrun(), pools=[ec2_pool()])
    placed(driver)
    booting = observe_instance(instance(), 1, 1)
    quiet = driver.decide(now=T0 + 590, pods=[booting], worker="instance", boot_grace_seconds=600)
    assert not quiet.status_patch and quiet.wake_after == 10
    lost = driver.decide(now=T0 + 601, pods=[booting], worker="instance", boot_grace_seconds=600)
    assert kinds(lost.afterwards)[:2] == ["DeletePod", "DeleteSecret"]
    [attempt] = driver.status["attempts"]
    assert attempt["reason"] == "BootTimedOut"
    assert attempt["message"] == "instance i-1 (m5.large): no heartbeat from its agent 601 s after launch"
    assert driver.status["active"]["1"]["attempt"] == 2


def test_once_it_beats_an_instance_is_watched_like_a_pod():
    driver = Driver(a_testrun(), pools=[ec2_pool()])
    placed(driver)
    running = observe_instance(instance(), 1, 1)
    fine = driver.decide(now=T0 + 900, pods=[running], heartbeats={(1, 1): T0 + 890}, worker="instance",
                         boot_grace_seconds=600, settings=Settings(heartbeat_grace_seconds=60))
    assert not fine.status_patch
    lost = driver.decide(now=T0 + 1000, pods=[running], heartbeats={(1, 1): T0 + 890}, worker="instance",
                         boot_grace_seconds=600, settings=Settings(heartbeat_grace_seconds=60))
    assert driver.status["attempts"][0]["reason"] == "HeartbeatLost" and "DeletePod" in kinds(lost.afterwards)


def test_an_instance_gone_or_going_without_a_result_is_lost_and_retried():
    driver = Driver(a_testrun(), pools=[ec2_pool()])
    placed(driver)
    settings = Settings(result_grace_seconds=30, missing_pod_grace_seconds=30)
    going = observe_instance(instance("shutting-down"), 1, 1, leaving_since=T0 + 100)
    assert going.deleting
    waiting = driver.decide(now=T0 + 110, pods=[going], worker="instance", boot_grace_seconds=600, settings=settings)
    assert not waiting.status_patch and waiting.wake_after == 20  # its RESULT may be on its way
    driver.decide(now=T0 + 131, pods=[going], worker="instance", boot_grace_seconds=600, settings=settings)
    [attempt] = driver.status["attempts"]
    assert (attempt["reason"], attempt["message"]) == (
        "InstanceLost", "instance i-1 (m5.large) is shutting-down without a result from its agent")
    # Attempt 2's instance is never listed at all: lost once the missing grace has passed.
    driver.decide(now=T0 + 140, admitted=1, worker="instance", boot_grace_seconds=600, settings=settings)
    driver.decide(now=T0 + 171, worker="instance", boot_grace_seconds=600, settings=settings)
    assert driver.status["attempts"][-1]["reason"] == "InstanceLost"
    assert driver.status["attempts"][-1]["message"] == "its EC2 instance disappeared before its agent reported a result"


def test_failed_status_checks_are_an_infrastructure_failure_but_a_result_wins():
    driver = Driver(a_testrun(), pools=[ec2_pool()])
    placed(driver)
    impaired = observe_instance(instance(), 1, 1, impaired=True)
    decided = driver.decide(now=T0 + 60, pods=[impaired], results={(1, 1): RunResult("passed")}, worker="instance",
                            boot_grace_seconds=600)
    assert driver.status["result"] == "passed" and "DeletePod" in kinds(decided.afterwards)
    other = Driver(a_testrun(), pools=[ec2_pool()])
    placed(other)
    other.decide(now=T0 + 60, pods=[impaired], worker="instance", boot_grace_seconds=600)
    assert other.status["attempts"][0]["reason"] == "StatusChecksFailed"


def test_a_named_ec2_pool_that_holds_no_type_for_it_ends_it_unschedulable_too():
    driver = Driver(a_testrun(definition={"min_ram_gb": 300}, workerPool="big"), pools=[ec2_pool()])
    driver.decide()
    assert (driver.status["phase"], driver.status["result"]) == ("Error", "error")
    assert driver.status["conditions"][0]["message"].startswith("pool big: the task asks for 0 cores and 300 GB")


def test_types_edited_out_from_under_a_placed_testrun_end_it_once_no_run_is_on_an_instance():
    pool = ec2_pool()
    driver = Driver(a_testrun(runs=2, definition={"min_ram_gb": 200}), pools=[pool])
    placed(driver)
    pool["spec"]["ec2"]["instanceTypes"] = TYPES[:1]  # the big type is gone
    running = observe_instance(instance(), 1, 1)
    driver.decide(now=T0 + 10, pods=[running], heartbeats={(1, 1): T0 + 9}, worker="instance", boot_grace_seconds=600)
    assert driver.status["phase"] != "Error"  # run 1 is on its instance: it finishes first
    driver.decide(now=T0 + 20, pods=[running], results={(1, 1): RunResult("passed")}, worker="instance",
                  boot_grace_seconds=600)
    driver.decide(now=T0 + 21, worker="instance", boot_grace_seconds=600)
    assert (driver.status["phase"], driver.status["runCounts"]["passed"], driver.status["runCounts"]["errored"]) == (
        "Error", 1, 1)


def test_with_ec2_not_answering_a_result_is_still_judged_and_nothing_is_taken_for_lost():
    driver = Driver(a_testrun(runs=2), pools=[ec2_pool()])
    driver.decide()
    driver.decide(now=T0, admitted=2, worker="instance", boot_grace_seconds=600)
    unknown = dict(worker="instance", boot_grace_seconds=600, workers_known=False)
    quiet = driver.decide(now=T0 + 900, **unknown)  # past every grace: still nothing judged
    assert not quiet.status_patch and quiet.wake_after is not None
    driver.decide(now=T0 + 901, results={(1, 1): RunResult("passed")}, **unknown)
    assert driver.status["runCounts"]["passed"] == 1 and list(driver.status["active"]) == ["2"]
