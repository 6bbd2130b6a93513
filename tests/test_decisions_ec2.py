"""EC2 placement and lifecycle decisions (decisions/ec2.py): instance types, launches within the
pool's caps, reuse, orphans and terminations. The last test drives seeded random worlds of
instances and demands and checks the caps after every reconcile."""

from __future__ import annotations

import ast
import dataclasses
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from testlooper.decisions.ec2 import (
    LAUNCH_GRACE_SECONDS, Ec2Demand, Ec2Pool, Instance, demand_for, InstanceType, RunState, Unschedulable,
    choose_instance_type, cost_rate, counts_by_state, orphans, status_entries, plan_launches, reusable, to_terminate, unschedulable, usage, vanished,
)

T0 = 1_800_000_000.0
SMALL = InstanceType("t3.medium", 2, 4, 0.04)
MEDIUM = InstanceType("m5.xlarge", 4, 16, 0.19)
MEDIUM_CHEAP = InstanceType("m6a.xlarge", 4, 16, 0.17)
MEMORY = InstanceType("r5.8xlarge", 32, 256, 2.0)
HUGE = InstanceType("x1.16xlarge", 64, 976, 6.7)
TYPES = [MEMORY, SMALL, MEDIUM, HUGE]


def resource(platform="linux", max_workers=None, max_cores=None, max_ram_gb=None, reuse=False, min_lifetime=0):
    ec2 = {"region": "us-east-1", "vpcId": "vpc-0a1b2c3d", "subnetId": "subnet-0a1b2c3d",
           "securityGroupIds": ["sg-0a1b2c3d"], "linuxAmi": "ami-11111111", "windowsAmi": "ami-22222222",
           "instanceTypes": [{"type": t.type, "cores": t.cores, "ramGb": t.ram_gb, "hourlyPrice": t.hourly_price}
                             for t in TYPES],
           "reuse": reuse, "minLifetimeSeconds": min_lifetime}
    spec = {"provider": "ec2", "platform": platform, "ec2": ec2}
    for key, value in (("maxWorkers", max_workers), ("maxCores", max_cores), ("maxRamGb", max_ram_gb)):
        if value is not None:
            spec[key] = value
    return {"metadata": {"name": "ec2-" + platform}, "spec": spec}


def pool(**settings) -> Ec2Pool:
    return Ec2Pool.from_resource(resource(**settings))


def instance(instance_id, kind=MEDIUM, state="running", run_id=None, launched=T0, pool_name="ec2-linux", status_ok=None):
    return Instance(instance_id, kind.type, state, run_id, launched, pool_name, status_ok)


def test_the_decisions_are_pure_standard_library_code():
    # No boto3 here: the decisions are tested, and benched, without AWS or its emulator.
    source = Path(__file__).resolve().parent.parent / "operator" / "testlooper" / "decisions" / "ec2.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported and all(name.split(".")[0] in sys.stdlib_module_names or name == "__future__"
                            or name.startswith("testlooper.decisions") for name in imported), imported


# ------------------------------------------------------------------------------ instance type


def test_the_smallest_type_that_fits_is_chosen():
    assert choose_instance_type(TYPES, 1, 1) == SMALL
    assert choose_instance_type(TYPES, 2, 4) == SMALL
    assert choose_instance_type(TYPES, 3, 4) == MEDIUM
    assert choose_instance_type(TYPES, 1, 17) == MEMORY  # RAM alone decides
    assert choose_instance_type(TYPES, 0, 200) == MEMORY
    assert choose_instance_type(TYPES, 0, 300) == HUGE


def test_ties_go_to_the_cheaper_type_then_the_name():
    assert choose_instance_type([MEDIUM, MEDIUM_CHEAP], 4, 16) == MEDIUM_CHEAP
    unpriced = InstanceType("a1.xlarge", 4, 16)
    assert choose_instance_type([unpriced, MEDIUM], 4, 16) == MEDIUM  # an unknown price sorts last
    twins = [InstanceType("m5.xlarge", 4, 16), InstanceType("m4.xlarge", 4, 16)]
    assert choose_instance_type(twins, 4, 16).type == "m4.xlarge"


def test_max_cores_takes_the_largest_type_under_it_that_has_the_ram():
    assert choose_instance_type(TYPES, 1, 1, max_cores=32) == MEMORY
    assert choose_instance_type(TYPES, 1, 1, max_cores=31) == MEDIUM
    assert choose_instance_type(TYPES, 1, 1, max_cores=1000) == HUGE
    assert choose_instance_type(TYPES, 1, 300, max_cores=64) == HUGE
    assert choose_instance_type([MEDIUM, MEDIUM_CHEAP, SMALL], 1, 1, max_cores=4) == MEDIUM_CHEAP


def test_a_tasks_demand_reads_its_resolved_resources():
    assert demand_for("r", {"min_cores": 2, "min_ram_gb": 8, "max_cores": 0}, 3, "t") == Ec2Demand("r", 3, "t", 2, 8, None)
    assert demand_for("r", {"min_cores": 8, "max_cores": 4}) == Ec2Demand("r", 0, "", 8, 0, 8)
    assert demand_for("r", {}) == Ec2Demand("r")
    assert choose_instance_type(TYPES, **{k: getattr(demand_for("r", {"min_cores": 1, "max_cores": 31}), k)
                                          for k in ("min_cores", "min_ram_gb", "max_cores")}) == MEDIUM


def test_a_task_no_type_fits_is_unschedulable_naming_the_ask_and_the_largest_type():
    result = choose_instance_type(TYPES, 128, 2000)
    assert result == Unschedulable(
        "the task asks for 128 cores and 2000 GB of RAM; the largest type on offer is x1.16xlarge (64 cores, 976 GB)")
    result = choose_instance_type(TYPES, 1, 300, max_cores=16)
    assert result.message == ("the task asks for 1 cores and 300 GB of RAM with at most 16 cores; "
                              "the largest type on offer is x1.16xlarge (64 cores, 976 GB)")
    wide = InstanceType("c5.24xlarge", 96, 192)
    assert choose_instance_type([wide, MEMORY], 1, 500).message == (
        "the task asks for 1 cores and 500 GB of RAM; the largest type on offer is c5.24xlarge (96 cores, 192 GB), "
        "the one with the most RAM r5.8xlarge (32 cores, 256 GB)")
    assert choose_instance_type([], 1, 1).message == (
        "the task asks for 1 cores and 1 GB of RAM, and no instance type is on offer")


def test_a_type_bigger_than_the_pools_caps_is_not_on_offer():
    capped = pool(max_cores=40, max_ram_gb=300)
    assert [t.type for t in capped.offered()] == ["r5.8xlarge", "t3.medium", "m5.xlarge"]
    assert unschedulable(capped, Ec2Demand("r", min_ram_gb=500)) == Unschedulable(
        "pool ec2-linux: the task asks for 0 cores and 500 GB of RAM; "
        "the largest type on offer is r5.8xlarge (32 cores, 256 GB)")
    assert unschedulable(capped, Ec2Demand("r", min_ram_gb=200)) is None
    assert plan_launches(capped, [], [Ec2Demand("r", min_ram_gb=500)]) == []
    # maxWorkers: 0 pauses a pool: its runs wait, they are not unschedulable.
    paused = pool(max_workers=0)
    assert unschedulable(paused, Ec2Demand("r", min_cores=2)) is None
    assert plan_launches(paused, [], [Ec2Demand("r", min_cores=2)]) == []


# ---------------------------------------------------------------------------------- launches


def test_a_windows_task_and_a_200_gb_task_get_their_ami_and_type():
    windows = plan_launches(resource("windows"), [], [Ec2Demand("w-1", min_cores=2, min_ram_gb=8)])
    assert [(l.run_id, l.instance_type, l.ami, l.platform) for l in windows] == [
        ("w-1", MEDIUM, "ami-22222222", "windows")]
    big = plan_launches(resource("linux"), [], [Ec2Demand("big-1", min_ram_gb=200)])
    assert [(l.instance_type, l.ami, l.platform, l.reuse_instance_id) for l in big] == [
        (MEMORY, "ami-11111111", "linux", None)]


def test_launches_stop_at_each_cap_counting_pending_and_running_instances():
    demands = [Ec2Demand(f"r-{n}", min_cores=4, min_ram_gb=16) for n in range(10)]
    existing = [instance("i-1", state="pending", run_id="old-1"), instance("i-2", run_id="old-2"),
                instance("i-3", state="terminated", run_id="old-3")]
    assert len(plan_launches(pool(max_workers=5), existing, demands)) == 3
    assert len(plan_launches(pool(max_cores=20), existing, demands)) == 3
    assert len(plan_launches(pool(max_ram_gb=47), existing, demands)) == 0
    assert len(plan_launches(pool(max_ram_gb=48), existing, demands)) == 1
    assert len(plan_launches(pool(), existing, demands)) == 10


def test_a_shutting_down_instance_still_counts_and_an_unknown_type_counts_as_the_largest():
    demand = [Ec2Demand("r-1", min_cores=1)]
    assert plan_launches(pool(max_workers=1), [instance("i-1", state="shutting-down", run_id="x")], demand) == []
    retired = Instance("i-9", "z9.metal", "running", "x", T0, "ec2-linux")
    assert usage(pool(), [retired]) == (1, 64.0, 976.0)
    assert plan_launches(pool(max_cores=65), [retired], [Ec2Demand("r-1", min_cores=2)]) == []


def test_instances_of_other_pools_do_not_count():
    others = [instance(f"i-{n}", pool_name="ec2-windows") for n in range(5)]
    assert len(plan_launches(pool(max_workers=2), others, [Ec2Demand("a"), Ec2Demand("b")])) == 2


def test_runs_queue_in_priority_order_then_age_and_a_smaller_run_may_pass():
    demands = [Ec2Demand("late-high", priority=5, created="2026-12-01T10:00:00Z", min_cores=4),
               Ec2Demand("low", priority=0, created="2026-12-01T08:00:00Z", min_cores=2),
               Ec2Demand("early-high", priority=5, created="2026-12-01T09:00:00Z", min_cores=4)]
    assert [l.run_id for l in plan_launches(pool(max_workers=2), [], demands)] == ["early-high", "late-high"]
    # Only 6 cores left: the second high-priority run (4) does not fit; the 2-core one does.
    assert [l.run_id for l in plan_launches(pool(max_cores=6), [], demands)] == ["early-high", "low"]


def test_a_run_that_has_an_instance_is_not_launched_again():
    demands = [Ec2Demand("r-1"), Ec2Demand("r-2")]
    assert [l.run_id for l in plan_launches(pool(), [instance("i-1", SMALL, "pending", "r-1")], demands)] == ["r-2"]
    # ... unless its instance is going away behind our back: then the run may get a new one.
    gone = [instance("i-1", SMALL, "terminated", "r-1")]
    assert [l.run_id for l in plan_launches(pool(), gone, demands)] == ["r-1", "r-2"]


def test_reuse_gives_an_idle_windows_instance_to_the_next_run_that_fits():
    windows = pool(platform="windows", max_workers=2, reuse=True, min_lifetime=3600)
    idle = [instance("i-big", MEMORY, run_id="done-1", pool_name="ec2-windows"),
            instance("i-small", MEDIUM, run_id="done-2", pool_name="ec2-windows")]
    demands = [Ec2Demand("a", min_cores=4, created="1"), Ec2Demand("b", min_cores=8, created="2"),
               Ec2Demand("c", min_cores=1, created="3")]
    launches = plan_launches(windows, idle, demands, now=T0 + 60, live_run_ids=["a", "b", "c"])
    assert [(l.run_id, l.reuse_instance_id, l.instance_type.type) for l in launches] == [
        ("a", "i-small", "m5.xlarge"), ("b", "i-big", "r5.8xlarge")]  # c: the caps are full (2 instances)
    # Past the minimum lifetime, nothing is reused: both go, and new instances come instead.
    later = plan_launches(windows, idle, demands, now=T0 + 3600, live_run_ids=["a", "b", "c"])
    assert later == []  # the two idle instances still hold the caps until they are terminated
    assert reusable(windows, idle, [], T0 + 3600) == []


def test_reuse_never_takes_an_instance_whose_run_is_live_or_whose_checks_failed():
    windows = pool(platform="windows", reuse=True, min_lifetime=3600)
    busy = instance("i-1", MEDIUM, run_id="live-1", pool_name="ec2-windows")
    broken = instance("i-2", MEDIUM, run_id="done", pool_name="ec2-windows", status_ok=False)
    booting = instance("i-3", MEDIUM, state="pending", run_id="done", pool_name="ec2-windows")
    assert reusable(windows, [busy, broken, booting], ["live-1"], T0 + 1) == []
    assert reusable(pool(platform="windows", min_lifetime=0, reuse=True), [busy], [], T0 + 1) == []


# ------------------------------------------------------------------------------ terminations


def test_orphans_are_our_instances_with_no_live_run_past_the_launch_grace():
    instances = [instance("i-live", run_id="r-1"), instance("i-ended", run_id="r-2"),
                 instance("i-untagged"), instance("i-new", launched=T0 + 100, run_id="r-9"),
                 instance("i-gone", state="shutting-down", run_id="r-3")]
    now = T0 + LAUNCH_GRACE_SECONDS
    assert orphans(instances, ["r-1"], now) == ["i-ended", "i-untagged"]
    assert orphans(instances, ["r-1"], now + 100) == ["i-ended", "i-new", "i-untagged"]
    assert orphans(instances, ["r-1"], now, keep=["i-ended"]) == ["i-untagged"]
    aware = datetime.fromtimestamp(T0 + LAUNCH_GRACE_SECONDS, timezone.utc)  # as boto3 gives LaunchTime
    assert orphans(instances, ["r-1"], aware) == ["i-ended", "i-untagged"]


def test_any_record_with_the_contracts_six_fields_will_do():
    # As the AWS adapter describes instances: a launch time from boto3, no status checks.
    @dataclasses.dataclass(frozen=True)
    class Described:
        instance_id: str
        type: str
        state: str
        run_id: str | None
        launch_time: datetime | None
        pool: str

    launched = datetime.fromtimestamp(T0, timezone.utc)
    described = [Described("i-1", "m5.xlarge", "running", "gone", launched, "ec2-linux"),
                 Described("i-2", "m5.xlarge", "running", "gone", None, "ec2-linux"),
                 Described("i-3", "m5.xlarge", "pending", "live", launched, "ec2-linux")]
    now = T0 + 60
    assert orphans(described, ["live"], now) == ["i-2"]  # an unknown launch time is not young
    assert [t.instance_id for t in to_terminate(pool(), described, {"live": RunState("live")}, now)] == ["i-2"]
    assert usage(pool(), described) == (3, 12.0, 48.0)
    assert plan_launches(pool(max_workers=4), described, [Ec2Demand("live"), Ec2Demand("new")])[0].run_id == "new"


def test_instances_whose_run_ended_or_was_cancelled_are_terminated():
    instances = [instance("i-1", run_id="ended"), instance("i-2", run_id="cancelled"), instance("i-3", run_id="live")]
    runs = {"ended": RunState("ended"), "cancelled": RunState("cancelled"), "live": RunState("live", T0 + 50)}
    result = to_terminate(pool(), instances, runs, T0 + 60)
    assert [(t.instance_id, t.reason, t.infrastructure_failure) for t in result] == [
        ("i-1", "RunEnded", False), ("i-2", "RunCancelled", False)]
    assert result[0].message == "instance i-1 (m5.xlarge): its run ended is ended"


def test_lost_heartbeats_a_silent_boot_and_failed_checks_are_infrastructure_failures():
    instances = [instance("i-1", run_id="quiet"), instance("i-2", run_id="mute", launched=T0),
                 instance("i-3", run_id="sick", status_ok=False), instance("i-4", run_id="fine"),
                 instance("i-5", state="pending", run_id="slow", launched=T0 + 500),
                 instance("i-6", state="pending", run_id="stuck")]
    now = T0 + 601
    runs = {"quiet": RunState("live", now - 181), "mute": RunState("live"), "sick": RunState("live", now),
            "fine": RunState("live", now - 10), "slow": RunState("live"), "stuck": RunState("live")}
    result = to_terminate(pool(), instances, runs, now)
    assert [(t.instance_id, t.reason, t.infrastructure_failure, t.message) for t in result] == [
        ("i-1", "HeartbeatLost", True, "instance i-1 (m5.xlarge): no heartbeat for 181s (the limit is 180s)"),
        ("i-2", "BootTimedOut", True, "instance i-2 (m5.xlarge): no heartbeat from its agent 601s after launch (the limit is 600s)"),
        ("i-3", "StatusChecksFailed", True, "instance i-3 (m5.xlarge) failed its EC2 status checks"),
        ("i-6", "BootTimedOut", True, "instance i-6 (m5.xlarge): no heartbeat from its agent 601s after launch (the limit is 600s)"),
    ]
    # A reused instance's clock starts when the run is given it, not at the instance's launch.
    reused = [instance("i-7", run_id="next", launched=T0 - 3000)]
    assert to_terminate(pool(), reused, {"next": RunState("live", assigned_at=now - 30)}, now) == []
    assert [t.message for t in to_terminate(pool(), reused, {"next": RunState("live", assigned_at=now - 700)}, now)] == [
        "instance i-7 (m5.xlarge): no heartbeat from its agent 700s after it was reused (the limit is 600s)"]
    # Windows boots slowly: the same silence is not yet a failure there.
    windows = [instance("i-2", run_id="mute", pool_name="ec2-windows")]
    assert to_terminate(pool(platform="windows"), windows, runs, now) == []


def test_to_terminate_reaps_orphans_but_keeps_idle_instances_for_reuse():
    windows = pool(platform="windows", reuse=True, min_lifetime=3600)
    instances = [instance("i-idle", run_id="done", pool_name="ec2-windows"),
                 instance("i-lost", run_id="deleted-run", pool_name="ec2-windows")]
    runs = {"done": RunState("ended")}
    assert to_terminate(windows, instances, runs, T0 + 600) == []  # both young: kept for reuse
    result = to_terminate(windows, instances, runs, T0 + 3600)
    assert [(t.instance_id, t.reason) for t in result] == [("i-idle", "RunEnded"), ("i-lost", "Orphan")]
    assert result[1].message == "instance i-lost (m5.xlarge) carries no live run (deleted-run)"


def test_a_vanished_or_stopped_instance_of_a_live_run_is_reported():
    instances = [instance("i-1", run_id="a"), instance("i-2", state="terminated", run_id="b"),
                 instance("i-4", state="stopped", run_id="d")]
    assert vanished(pool(), instances, {"a": "i-1", "b": "i-2", "c": "i-3", "d": "i-4"}) == {
        "b": "instance i-2 of run b is terminated", "c": "instance i-3 of run c is gone",
        "d": "instance i-4 of run d is stopped"}


# --------------------------------------------------------------------------------- reporting


def test_the_pool_reports_its_instances_their_states_and_an_hourly_cost():
    instances = [instance("i-2", MEMORY, "pending", "r-2", launched=T0 + 5), instance("i-1", SMALL, run_id="r-1"),
                 instance("i-3", MEDIUM, "terminated", "r-3"), instance("i-4", SMALL, "shutting-down"),
                 instance("i-5", pool_name="ec2-windows")]
    assert counts_by_state(pool(), instances) == {"pending": 1, "running": 1, "shutting-down": 1, "terminated": 1}
    assert cost_rate(pool(), instances) == 2.08  # 2.0 + 0.04 + 0.04: the terminated one costs nothing
    assert cost_rate(pool(), []) == 0.0
    assert cost_rate(pool(), [Instance("i-9", "z9.metal", "running", None, T0, "ec2-linux")]) is None
    entries = status_entries(pool(), instances)
    assert entries == [
        {"instanceId": "i-1", "type": "t3.medium", "state": "running", "launchTime": "2027-01-15T08:00:00Z", "run": "r-1"},
        {"instanceId": "i-4", "type": "t3.medium", "state": "shutting-down", "launchTime": "2027-01-15T08:00:00Z"},
        {"instanceId": "i-2", "type": "r5.8xlarge", "state": "pending", "launchTime": "2027-01-15T08:00:05Z", "run": "r-2"},
    ]
    assert len(status_entries(pool(), [instance(f"i-{n}") for n in range(150)])) == 100
    from testlooper.kube.models import WorkerPoolStatus
    assert WorkerPoolStatus.model_validate({"instances": entries, "costPerHour": 2.08}).instances[2].run == "r-2"


# ------------------------------------------------------------------------- property: the caps


@pytest.mark.parametrize("seed", range(40))
def test_random_reconciles_never_exceed_the_caps(seed):
    """Random caps, types, demands (up to 80 at once), launches, instance deaths and reuse; after
    every reconcile the pool's instances not terminated hold no more than its caps, and no run has
    two instances at once."""
    rng = random.Random(seed)
    platform = rng.choice(["linux", "windows"])
    reuse = platform == "windows" and rng.random() < 0.5
    settings = dict(platform=platform, max_workers=rng.choice([None, 0, 1, 3, 10]),
                    max_cores=rng.choice([None, 4, 16, 70, 200]), max_ram_gb=rng.choice([None, 16, 300, 2000]),
                    reuse=reuse, min_lifetime=rng.choice([600, 3600]) if reuse else 0)
    the_pool = pool(**settings)
    instances: dict[str, Instance] = {}
    runs: dict[str, RunState] = {}
    waiting: dict[str, Ec2Demand] = {}
    now, serial = T0, 0
    for _step in range(60):
        now += rng.uniform(1, 400)
        for _ in range(rng.randint(0, 80 if _step == 0 else 8)):
            serial += 1
            run_id = f"run-{serial}"
            waiting[run_id] = Ec2Demand(run_id, rng.randint(0, 3), f"{serial:06d}", rng.choice([0, 1, 2, 4, 8, 32, 100]),
                                        rng.choice([0, 2, 16, 100, 500, 2000]),
                                        rng.choice([None, None, 4, 32]))
            runs[run_id] = RunState("live")
        for instance_id, seen in list(instances.items()):  # the world: runs end, instances die
            roll = rng.random()
            if seen.state == "pending" and roll < 0.5:
                instances[instance_id] = Instance(instance_id, seen.type, "running", seen.run_id, seen.launch_time, seen.pool)
            elif seen.state == "running" and seen.run_id in runs and runs[seen.run_id].phase == "live" and roll < 0.3:
                runs[seen.run_id] = RunState(rng.choice(["ended", "ended", "cancelled"]))
            elif roll > 0.97:
                instances[instance_id] = Instance(instance_id, seen.type, "terminated", seen.run_id, seen.launch_time, seen.pool)
        for termination in to_terminate(the_pool, instances.values(), runs, now):
            seen = instances[termination.instance_id]
            instances[seen.instance_id] = Instance(seen.instance_id, seen.type, "shutting-down", seen.run_id,
                                                   seen.launch_time, seen.pool)
        live = [run_id for run_id, state in runs.items() if state.phase == "live"]
        for launch in plan_launches(the_pool, instances.values(), waiting.values(), now=now, live_run_ids=live):
            del waiting[launch.run_id]
            if launch.reuse_instance_id:
                runs[launch.run_id] = RunState("live", assigned_at=now)
                seen = instances[launch.reuse_instance_id]
                instances[seen.instance_id] = Instance(seen.instance_id, seen.type, seen.state, launch.run_id,
                                                       seen.launch_time, seen.pool)
            else:
                serial += 1
                instances[f"i-{serial}"] = Instance(f"i-{serial}", launch.instance_type.type, "pending", launch.run_id,
                                                    now, the_pool.name)
        for instance_id, seen in list(instances.items()):
            if seen.state == "shutting-down" and rng.random() < 0.7:
                instances[instance_id] = Instance(instance_id, seen.type, "terminated", seen.run_id, seen.launch_time, seen.pool)
        workers, cores, ram = usage(the_pool, instances.values())
        assert the_pool.max_workers is None or workers <= the_pool.max_workers
        assert the_pool.max_cores is None or cores <= the_pool.max_cores
        assert the_pool.max_ram_gb is None or ram <= the_pool.max_ram_gb
        holders = [i.run_id for i in instances.values() if i.state in {"pending", "running"} and runs[i.run_id].phase == "live"]
        assert len(holders) == len(set(holders))
