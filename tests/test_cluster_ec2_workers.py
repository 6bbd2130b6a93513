"""The EC2 shell's own rules (cluster/ec2_workers.py, cluster/runs.py): which URL EC2 workers
could never reach, which run attempts are live, what admission asks per run, and why an
instance was terminated (the metric's reason); then, against moto_server, that a launch not yet
in its TestRun's status is never an orphan, that a stopped instance is seen going, and that a
deleted pool's instances go with it."""

from __future__ import annotations

import types

import pytest

from moto_server import moto_port, point_boto3_at  # noqa: F401 (moto_port: a fixture)
from testlooper.cluster.ec2_workers import Ec2Workers, live_run_ids
from testlooper.cluster.runs import termination_reason
from testlooper.decisions import phases
from testlooper.decisions.ec2 import sized_for_instances
from testlooper.decisions.pools import Demand

POOL = {"metadata": {"name": "big", "namespace": "ns"},
        "spec": {"provider": "ec2", "maxCores": 40,
                 "ec2": {"region": "us-east-1", "linuxAmi": "ami-1",
                         "instanceTypes": [{"type": "m5.large", "cores": 2, "ramGb": 8},
                                           {"type": "r5.8xlarge", "cores": 32, "ramGb": 256},
                                           {"type": "x1.32xlarge", "cores": 128, "ramGb": 1952}]}}}


def workers(api_url="", ec2_api_url=""):
    context = types.SimpleNamespace(options=types.SimpleNamespace(api_url=api_url, ec2_api_url=ec2_api_url))
    return Ec2Workers(context, b"secret")


@pytest.mark.parametrize("api_url, ec2_api_url, reachable", [
    ("http://testlooper.testlooper.svc:8080", "https://ci.example.com", True),
    ("http://127.0.0.1:8080", "", True),  # tests, and an operator beside its workers
    ("http://10.0.0.5:8080", "", True),
    ("http://testlooper.testlooper.svc:8080", "", False),
    ("http://testlooper.testlooper.svc.cluster.local:8080", "", False),
    ("http://testlooper:8080", "", False),
    ("", "", False),
])
def test_ec2_workers_launch_nothing_for_a_url_they_could_never_reach(api_url, ec2_api_url, reachable):
    why = workers(api_url, ec2_api_url).unreachable_url()
    assert (why is None) == reachable
    if api_url and not reachable:
        assert why.startswith(f"EC2 workers cannot reach the operator at {api_url}, a cluster-internal address")


def test_live_runs_are_the_placed_attempts_of_the_pools_testruns():
    testruns = [
        {"metadata": {"namespace": "ns", "name": "a"},
         "status": {"workerPool": "big", "active": {"1": {"attempt": 2, "state": "Placed"},
                                                    "2": {"attempt": 1, "state": "Waiting"}}}},
        {"metadata": {"namespace": "ns", "name": "b"},
         "status": {"workerPool": "pods", "active": {"1": {"attempt": 1, "state": "Placed"}}}},
    ]
    assert live_run_ids(testruns, "big") == {"ns.a.1.2"}


def test_admission_asks_for_the_type_each_run_is_launched_as_and_nothing_for_a_run_no_type_holds():
    def demand(name):
        return Demand(("ns", name), "big", 0, "", 0, 0, 1)
    testruns = [{"metadata": {"namespace": "ns", "name": "small"}, "spec": {"definition": {"min_cores": 1}}},
                {"metadata": {"namespace": "ns", "name": "huge"}, "spec": {"definition": {"min_ram_gb": 200}}},
                {"metadata": {"namespace": "ns", "name": "never"}, "spec": {"definition": {"min_ram_gb": 2000}}}]
    sized = sized_for_instances([demand("small"), demand("huge"), demand("never")], [POOL], testruns)
    assert [(d.testrun[1], d.cores, d.ram_gb) for d in sized] == [("small", 2, 8), ("huge", 32, 256)]


def test_a_termination_says_whether_the_run_ended_was_cancelled_or_lost():
    delete = phases.DeletePod(1, 1)
    lost = phases.Decision({"active": {}}, [delete, phases.RecordAttempt(1, 1, "HeartbeatLost", "m", True)])
    assert termination_reason(delete, lost) == "HeartbeatLost"
    cancelled = phases.Decision({"phase": "Cancelled"}, [delete])
    assert termination_reason(delete, cancelled) == "RunCancelled"
    build_retried = phases.Decision({}, [delete, phases.RecordAttempt(1, 1, "BuildRetried", "m", True, False)])
    assert termination_reason(delete, build_retried) == "RunEnded"


def test_a_describe_failing_after_its_caller_is_gone_leaves_no_failed_task_and_the_next_caller_hears_it():
    """kopf re-raises the exception of any task that ends while it stops: the shared describe
    of a pool, left running by a cancelled caller and failing then (EC2 gone at the exit), made
    the operator exit with a traceback."""
    import asyncio
    import threading

    from testlooper.ec2.fleet import Ec2Error

    release, calls = threading.Event(), []

    class FailingFleet:
        def describe(self):
            calls.append(1)
            release.wait(5)
            raise Ec2Error("EC2 DescribeInstances failed: Connection was closed before we received a valid response")

    async def scenario():
        ec2 = workers("http://127.0.0.1:8080")
        ec2.fleet = lambda pool: FailingFleet()
        caller = asyncio.ensure_future(ec2.instances(POOL))
        await asyncio.sleep(0.05)
        caller.cancel()  # a handler stopped by kopf's exit
        shared = ec2._described[("ns", "big")][1]
        release.set()
        await asyncio.wait([shared], timeout=5)
        assert shared.done() and shared.exception() is None  # nothing for kopf to re-raise
        with pytest.raises(Ec2Error, match="Connection was closed"):
            await ec2.instances(POOL)  # a failed describe is not reused: asked again, and said
        assert len(calls) == 2

    asyncio.run(scenario())


# -- against moto_server: what the sweep and the launches do to real instances ------------------

@pytest.fixture
def fleet_world(moto_port, monkeypatch):
    from testlooper.cluster.metrics import OperatorMetrics
    from testlooper.ec2.fleet import make_client

    point_boto3_at(monkeypatch, moto_port)
    client = make_client("us-east-1")
    ami = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    pool = {"metadata": {"name": "big", "namespace": "ns"},
            "spec": {"provider": "ec2", "ec2": {"region": "us-east-1", "linuxAmi": ami,
                                                "instanceTypes": [{"type": "t3.micro", "cores": 2, "ramGb": 1}]}}}
    metrics = OperatorMetrics()
    context = types.SimpleNamespace(
        options=types.SimpleNamespace(api_url="http://10.0.0.1:8080", ec2_api_url="", ec2_orphan_grace=0.0),
        metrics=metrics)
    ec2 = Ec2Workers(context, b"secret", client_factory=lambda region: client)
    yield types.SimpleNamespace(ec2=ec2, pool=pool, client=client, metrics=metrics)
    ec2.close()


def a_testrun(name, active=None):
    return {"metadata": {"namespace": "ns", "name": name}, "spec": {"repo": "r", "definition": {}},
            "status": {"workerPool": "big", "active": active or {}}}


def states(world):
    answer = world.client.describe_instances()
    return {tag["Value"]: instance["State"]["Name"] for reservation in answer["Reservations"]
            for instance in reservation["Instances"] for tag in instance.get("Tags", []) if tag["Key"] == "testlooper:run"}


def test_a_launch_whose_status_is_not_written_yet_is_never_reaped_as_an_orphan(fleet_world):
    import asyncio

    async def scenario():
        ec2, pool = fleet_world.ec2, fleet_world.pool
        testrun = a_testrun("t")
        # Its decision launched run 1 and is still launching the others: its status says nothing yet.
        assert await ec2.launch(testrun, pool, 1, 1)
        await ec2.sweep(pool, [testrun])
        assert states(fleet_world)["ns.t.1.1"] in ("pending", "running")
        ec2.recorded("ns", "t")  # the status was written ... without it (say, the run was cancelled meanwhile)
        await ec2.sweep(pool, [testrun])
        assert states(fleet_world)["ns.t.1.1"] in ("shutting-down", "terminated")

    asyncio.run(scenario())


def test_a_stopped_instance_is_seen_going_from_when_it_was_first_seen_so(fleet_world):
    import asyncio

    async def scenario():
        ec2, pool = fleet_world.ec2, fleet_world.pool
        testrun = a_testrun("t", {"1": {"attempt": 1, "state": "Placed"}})
        await ec2.launch(testrun, pool, 1, 1)
        [instance_id] = [i.instance_id for i in await ec2.instances(pool, fresh=True) if i.run_id == "ns.t.1.1"]
        fleet_world.client.stop_instances(InstanceIds=[instance_id])  # a scheduled retirement, the console
        await ec2.instances(pool, fresh=True)  # a decision's describe is reused for 2 s
        [seen] = await ec2.observe(testrun, pool)
        first = seen.finished
        assert seen.phase == "Failed" and first is not None and not seen.deleting  # to be terminated by us
        await asyncio.sleep(0.05)
        await ec2.instances(pool, fresh=True)
        [again] = await ec2.observe(testrun, pool)
        assert again.finished == first  # the result grace runs from one fixed moment

    asyncio.run(scenario())


def test_a_deleted_pools_instances_are_terminated_with_it(fleet_world):
    import asyncio

    async def scenario():
        ec2, pool = fleet_world.ec2, fleet_world.pool
        for index in (1, 2):
            await ec2.launch(a_testrun(f"t{index}"), pool, 1, 1)
        await ec2.reap_pool(pool)
        assert set(states(fleet_world).values()) <= {"shutting-down", "terminated"}
        sample = fleet_world.metrics.ec2_terminations.labels("ns", "big", "PoolDeleted")._value.get()
        assert sample == 2

    asyncio.run(scenario())
