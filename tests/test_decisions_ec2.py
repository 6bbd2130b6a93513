"""EC2 placement decisions (decisions/ec2.py): instance types, what a pool's instances hold of
its caps, orphans and the pool's report. The last test drives seeded random worlds through the
operator's own admission path (`usage`, `sized_for_instances`, pools.admit) and checks the caps
after every round."""

from __future__ import annotations

import ast
import dataclasses
import functools
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from testlooper.decisions.ec2 import (
    LAUNCH_GRACE_SECONDS, Ec2Demand, Ec2Pool, Instance, InstanceType, Unschedulable, choose_instance_type,
    cost_rate, counts_by_state, demand_for, instance_type_for, orphans, sized_for_instances, status_entries,
    unschedulable, usage,
)
from testlooper.decisions.phases import queued_demand
from testlooper.decisions.pools import Usage, admit

T0 = 1_800_000_000.0
SMALL = InstanceType("t3.medium", 2, 4, 0.04)
MEDIUM = InstanceType("m5.xlarge", 4, 16, 0.19)
MEDIUM_CHEAP = InstanceType("m6a.xlarge", 4, 16, 0.17)
MEMORY = InstanceType("r5.8xlarge", 32, 256, 2.0)
HUGE = InstanceType("x1.16xlarge", 64, 976, 6.7)
TYPES = [MEMORY, SMALL, MEDIUM, HUGE]


def resource(platform="linux", max_workers=None, max_cores=None, max_ram_gb=None, types=TYPES, name=None):
    ec2 = {"region": "us-east-1", "vpcId": "vpc-0a1b2c3d", "subnetId": "subnet-0a1b2c3d",
           "securityGroupIds": ["sg-0a1b2c3d"], "linuxAmi": "ami-11111111", "windowsAmi": "ami-22222222",
           "instanceTypes": [{"type": t.type, "cores": t.cores, "ramGb": t.ram_gb, "hourlyPrice": t.hourly_price}
                             for t in types]}
    spec = {"provider": "ec2", "platform": platform, "ec2": ec2}
    for key, value in (("maxWorkers", max_workers), ("maxCores", max_cores), ("maxRamGb", max_ram_gb)):
        if value is not None:
            spec[key] = value
    return {"metadata": {"name": name or "ec2-" + platform}, "spec": spec}


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
    assert instance_type_for(capped, {"min_ram_gb": 500}) == Unschedulable(
        "the task asks for 0 cores and 500 GB of RAM; the largest type on offer is r5.8xlarge (32 cores, 256 GB)")
    # maxWorkers: 0 pauses a pool: its runs wait, they are not unschedulable.
    paused = pool(max_workers=0)
    assert unschedulable(paused, Ec2Demand("r", min_cores=2)) is None


# ------------------------------------------------------------------------------------ usage


def test_a_windows_task_and_a_200_gb_task_get_their_ami_and_type():
    windows = Ec2Pool.from_resource(resource("windows"))
    assert (instance_type_for(windows, {"min_cores": 2, "min_ram_gb": 8}), windows.ami) == (MEDIUM, "ami-22222222")
    linux = Ec2Pool.from_resource(resource("linux"))
    assert (instance_type_for(linux, {"min_ram_gb": 200}), linux.ami) == (MEMORY, "ami-11111111")


def test_usage_counts_pending_running_and_shutting_down_instances_of_the_pool_alone():
    existing = [instance("i-1", state="pending", run_id="old-1"), instance("i-2", run_id="old-2"),
                instance("i-3", state="terminated", run_id="old-3"), instance("i-4", SMALL, "shutting-down"),
                instance("i-5", state="stopped", run_id="old-5"), instance("i-6", pool_name="ec2-windows")]
    assert usage(pool(), existing) == (4, 14.0, 52.0)
    assert usage(pool(), []) == (0, 0.0, 0.0)


def test_an_instance_whose_type_left_the_table_counts_as_the_largest_type():
    retired = Instance("i-9", "z9.metal", "running", "x", T0, "ec2-linux")
    assert usage(pool(), [retired]) == (1, 64.0, 976.0)


# ----------------------------------------------------------------------------------- orphans


def test_orphans_are_our_instances_with_no_live_run_past_the_launch_grace():
    instances = [instance("i-live", run_id="r-1"), instance("i-ended", run_id="r-2"),
                 instance("i-untagged"), instance("i-new", launched=T0 + 100, run_id="r-9"),
                 instance("i-gone", state="shutting-down", run_id="r-3")]
    now = T0 + LAUNCH_GRACE_SECONDS
    assert orphans(instances, ["r-1"], now) == ["i-ended", "i-untagged"]
    assert orphans(instances, ["r-1"], now + 100) == ["i-ended", "i-new", "i-untagged"]
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
    assert usage(pool(), described) == (3, 12.0, 48.0)


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

CATALOGUE = [InstanceType("t3.nano", 2, 0.5, 0.0052), InstanceType("c6g.medium", 1, 2, 0.034), SMALL,
             InstanceType("m3.medium", 1, 3.75, 0.067), InstanceType("c4.xlarge", 4, 7.5, 0.199), MEDIUM,
             MEDIUM_CHEAP, InstanceType("r5.large", 2, 16, 0.126), InstanceType("m5.4xlarge", 16, 64), MEMORY, HUGE]
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")


def random_pool(rng: random.Random, name: str) -> dict:
    types = rng.sample(CATALOGUE, rng.randint(1, 5))
    return resource(rng.choice(["linux", "linux", "windows"]), name=name, types=types,
                    max_workers=rng.choice([None, 0, 1, 3, 10, 40]), max_cores=rng.choice([None, 4, 16, 70, 200]),
                    max_ram_gb=rng.choice([None, 8, 16, 300, 2000]))


def random_testrun(rng: random.Random, serial: int, pools: list[dict]) -> dict:
    definition = {"platform": rng.choice(["linux", "linux", "windows"]),
                  "min_cores": rng.choice([0, 1, 2, 4, 8, 32, 100]), "min_ram_gb": rng.choice([0, 0.5, 2, 16, 100, 500, 2000])}
    if rng.random() < 0.25:
        definition["max_cores"] = rng.choice([2, 4, 32])
    spec = {"runs": rng.randint(1, 4), "priority": rng.randint(0, 3), "definition": definition}
    if rng.random() < 0.2:  # a TestRun that names its pool goes there even when no type there holds it
        spec["workerPool"] = rng.choice(pools)["metadata"]["name"]
    return {"metadata": {"namespace": "ns", "name": f"t{serial}", "creationTimestamp": f"2026-12-01T08:00:00.{serial:06d}Z"},
            "spec": spec}


def held(pool: dict, instances: list[Instance]) -> tuple[int, float, float]:
    """What the pool's instances hold, counted here on its own, to check `usage` against: every
    state but terminated, at the table's size of the type, and a type the table no longer has
    at the table's largest cores and RAM."""
    table = {row["type"]: (row["cores"], row["ramGb"]) for row in pool["spec"]["ec2"]["instanceTypes"]}
    largest = (max(cores for cores, _ in table.values()), max(ram for _, ram in table.values()))
    sizes = [table.get(i.type, largest) for i in instances
             if i.pool == pool["metadata"]["name"] and i.state != "terminated"]
    return len(sizes), float(sum(cores for cores, _ in sizes)), float(sum(ram for _, ram in sizes))


def admission_round(pools: list[dict], instances: list[Instance], testruns: list[dict], now: float):
    """What cluster/runs.py `admission_round` computes for EC2 pools whose describe answered:
    the waiting runs' demands, the room the pools' instances leave, each EC2 run at the size of
    its instance type, shared out by pools.admit."""
    demands = [d for d in (queued_demand(t, now, pools=pools) for t in testruns) if d]
    used = {pool["metadata"]["name"]: Usage(*usage(Ec2Pool.from_resource(pool), instances)) for pool in pools}
    wanted = {demand.pool for demand in demands}
    ec2_pools = [pool for pool in pools if pool["metadata"]["name"] in wanted]
    return demands, admit(pools, used, sized_for_instances(demands, ec2_pools, testruns))


@functools.cache  # seeded, so the coverage check may reuse the property's worlds
def caps_world(seed: int) -> dict[str, int]:
    """Seeded rounds of admission over random pools, instances and TestRuns: each admitted run is
    launched as a pending instance of the type `instance_type_for` gives it (what
    cluster/ec2_workers.py launches); between rounds instances boot, end and go, and a pool's
    caps or type table may be edited under its instances. Returns what happened, for the
    coverage check."""
    rng = random.Random(seed)
    pools = [random_pool(rng, f"pool-{n}") for n in range(rng.randint(1, 3))]
    instances: list[Instance] = []
    for n in range(rng.randint(0, 15)):
        pool_resource = rng.choice(pools)
        types = pool_resource["spec"]["ec2"]["instanceTypes"]
        kind = rng.choice([row["type"] for row in types] + ["z9.metal"])  # z9.metal: edited out of the table
        instances.append(Instance(f"i-old-{n}", kind, rng.choice(LIVE_STATES + ("terminated",)), None, T0,
                                  pool_resource["metadata"]["name"]))
    waiting: list[dict] = []
    seen = {"admitted": 0, "held_back": 0, "unschedulable": 0, "stayed_over": 0}
    now, serial = T0, 0
    for round_number in range(12):
        now += rng.uniform(1, 60)
        for _ in range(rng.randint(0, 60 if round_number == 0 else 15)):
            serial += 1
            waiting.append(random_testrun(rng, serial, pools))
        by_name = {pool["metadata"]["name"]: pool for pool in pools}
        before = {name: held(pool, instances) for name, pool in by_name.items()}
        demands, admitted = admission_round(pools, instances, waiting, now)
        asked = {demand.testrun: demand for demand in demands}
        launched_to = set()
        for testrun in waiting:
            key = ("ns", testrun["metadata"]["name"])
            if key not in asked:
                continue
            kind = instance_type_for(by_name[asked[key].pool], testrun["spec"]["definition"])
            if isinstance(kind, Unschedulable):
                seen["unschedulable"] += 1
                assert key not in admitted, f"{key} was admitted, yet no type of {asked[key].pool} holds it"
                testrun["spec"]["runs"] = 0  # its decision ends it as Unschedulable
                continue
            count = admitted.get(key, 0)
            assert count <= asked[key].count
            seen["admitted"] += count
            seen["held_back"] += asked[key].count - count
            if count:
                launched_to.add(asked[key].pool)
            for _ in range(count):
                serial += 1
                instances.append(Instance(f"i-{serial}", kind.type, "pending", f"ns.{key[1]}.{serial}", now,
                                          asked[key].pool))
            testrun["spec"]["runs"] -= count
        for name, pool in by_name.items():
            now_held = held(pool, instances)
            over = [f"{cap} {limit} < {used:g}" for used, cap in zip(now_held, ("maxWorkers", "maxCores", "maxRamGb"))
                    for limit in [pool["spec"].get(cap)] if limit is not None and used > limit]
            # A pool that admitted nothing may stay past a cap edited under its instances.
            assert not (over and name in launched_to), f"round {round_number}: {name} admitted runs past {over}"
            seen["stayed_over"] += bool(over) and now_held == before[name]
        waiting = [testrun for testrun in waiting if testrun["spec"]["runs"] > 0]
        instances = [world_step(rng, i) for i in instances]
        if rng.random() < 0.15:  # an edit: lower caps, or a type taken out of the table under its instances
            index = rng.randrange(len(pools))
            edited = random_pool(rng, pools[index]["metadata"]["name"])
            edited["spec"]["platform"] = pools[index]["spec"]["platform"]
            pools[index] = edited
    return seen


def world_step(rng: random.Random, observed: Instance) -> Instance:
    """One instance a moment later: booted, its run over (shutting down, then terminated), or stopped."""
    roll = rng.random()
    following = {"pending": "running" if roll < 0.5 else "pending",
                 "running": "shutting-down" if roll < 0.3 else "stopped" if roll < 0.35 else "running",
                 "shutting-down": "terminated" if roll < 0.7 else "shutting-down",
                 "stopping": "stopped", "stopped": "terminated" if roll < 0.3 else "stopped"}
    return dataclasses.replace(observed, state=following.get(observed.state, observed.state))


@pytest.mark.parametrize("seed", range(60))
def test_admission_never_passes_an_ec2_pools_caps_at_its_instance_types_sizes(seed):
    """Random pools (caps, type tables, edits), instances in every state (some of a type no
    longer in the table) and TestRuns; after every round, a pool that admitted runs holds no
    more than its maxWorkers, maxCores and maxRamGb once those runs' instances are launched at
    their types' sizes, and no run that no type holds was admitted."""
    caps_world(seed)


def test_the_random_worlds_reach_full_pools_unschedulable_runs_and_edited_caps():
    # Without this, a generator that never filled a pool would let the property above pass idly.
    totals: dict[str, int] = {}
    for seed in range(60):
        for key, value in caps_world(seed).items():
            totals[key] = totals.get(key, 0) + value
    assert totals["admitted"] > 500 and totals["held_back"] > 500, totals
    assert totals["unschedulable"] > 20 and totals["stayed_over"] > 5, totals
