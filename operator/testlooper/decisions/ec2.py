"""What a WorkerPool with provider ec2 decides: which instance type a run gets, what the pool's
instances hold of its caps, which instances are orphans, and what the phase machine reads of
an instance.

Pure: no boto3, no clock of its own. The operator observes the pool's instances (`Instance`,
one paginated describe); admission (decisions/pools.py `admit`) counts them with `usage` and
sizes each waiting run at its instance type (`sized_for_instances`); a run no type can hold
ends as `Unschedulable`; the sweep terminates `orphans`; the phase machine reads each run
attempt's instance through `observe_instance`. Nothing here keeps a running total: usage is
counted from the instances every time, so a crash or a restart loses nothing. docs/ec2.md
gives the rules and why.

Times are seconds since the epoch, as in decisions/phases.py; an aware datetime (as boto3
returns LaunchTime) is taken too. Instances are read by attribute only, so any record with the
fields of `Instance` will do (`status_ok` may be missing).
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from typing import Iterable, Sequence, Union

# EC2 instance states. An instance holds its share of the pool's caps in every state but
# terminated: shutting-down lasts seconds, and counting it errs on the side of the budget.
GONE_STATES = frozenset({"terminated"})
LEAVING_STATES = frozenset({"shutting-down", "terminated"})
GOING_STATES = LEAVING_STATES | {"stopping", "stopped"}  # not to run a task any more

LAUNCH_GRACE_SECONDS = 120.0
"""How long a new instance may run untagged by a live run before it counts as an orphan: the
operator records the run's instance after run_instances returns, and a crash in between must
not make the sweep terminate an instance that a retried reconcile is about to adopt."""
BOOT_TIMEOUT_SECONDS = {"linux": 600.0, "windows": 1800.0}
"""How long an instance may take from launch to its agent's first heartbeat."""


Seconds = Union[float, int, datetime]


def _seconds(moment: Seconds | None) -> float | None:
    if moment is None:
        return None
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


def _launched(instance) -> float:
    """When the instance was launched; an unknown launch time counts as long ago (EC2 always
    gives one), so that such an instance is never kept forever."""
    launched = _seconds(instance.launch_time)
    return 0.0 if launched is None else launched


def _checks_failed(instance) -> bool:
    # getattr: the adapter's own record of an instance may not carry status checks at all.
    return getattr(instance, "status_ok", None) is False


@dataclasses.dataclass(frozen=True)
class InstanceType:
    """One row of the pool's instance-type table."""

    type: str
    cores: int
    ram_gb: float
    hourly_price: float | None = None

    def describe(self) -> str:
        return f"{self.type} ({self.cores} cores, {_gb(self.ram_gb)} GB)"


@dataclasses.dataclass(frozen=True)
class Unschedulable:
    """No instance type can hold the task: the TestRun ends with result error and condition
    Unschedulable carrying `message`."""

    message: str


@dataclasses.dataclass(frozen=True)
class Instance:
    """An instance of the pool, as observed (tags: the worker tag, the pool, the run)."""

    instance_id: str
    type: str
    state: str  # pending, running, shutting-down, terminated, stopping, stopped
    run_id: str | None
    launch_time: Seconds
    pool: str
    status_ok: bool | None = None  # False: EC2 reports its status checks failed; None: not known yet


@dataclasses.dataclass(frozen=True)
class Ec2Demand:
    """One run that wants an instance. `run_id` is what the instance is tagged with."""

    run_id: str
    priority: int = 0
    created: str = ""  # the TestRun's creationTimestamp: RFC 3339 sorts as time
    min_cores: float = 0
    min_ram_gb: float = 0
    max_cores: int | None = None


def demand_for(run_id: str, task: dict, priority: int = 0, created: str = "") -> Ec2Demand:
    """The demand of one run of a resolved task: its min_cores, min_ram_gb and max_cores (0, the
    definitions' default, is no maximum; a maximum under the minimum is raised to it, as a pod's
    CPU limit is)."""
    task = task or {}
    cores, ram = float(task.get("min_cores") or 0), float(task.get("min_ram_gb") or 0)
    ceiling = int(task.get("max_cores") or 0)
    return Ec2Demand(run_id, priority, created, cores, ram, max(ceiling, math.ceil(cores)) if ceiling > 0 else None)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Start `run_id` on a new instance of `instance_type` booted from `ami` (what the AWS
    adapter's launch reads)."""

    run_id: str
    instance_type: InstanceType
    ami: str
    platform: str


@dataclasses.dataclass(frozen=True)
class Ec2Pool:
    """The parts of a WorkerPool with provider ec2 that placement needs."""

    name: str
    platform: str
    types: tuple[InstanceType, ...]
    ami: str
    max_workers: int | None = None
    max_cores: float | None = None
    max_ram_gb: float | None = None

    @classmethod
    def from_resource(cls, pool: dict) -> "Ec2Pool":
        """From a WorkerPool resource whose spec models.parse_workerpool_spec admitted."""
        spec = pool.get("spec") or {}
        ec2 = spec.get("ec2") or {}
        platform = spec.get("platform") or "linux"
        types = tuple(InstanceType(row["type"], int(row["cores"]), float(row["ramGb"]), row.get("hourlyPrice"))
                      for row in ec2.get("instanceTypes") or [])
        return cls(name=pool["metadata"]["name"], platform=platform, types=types,
                   ami=ec2.get("windowsAmi" if platform == "windows" else "linuxAmi") or "",
                   max_workers=spec.get("maxWorkers"), max_cores=spec.get("maxCores"),
                   max_ram_gb=spec.get("maxRamGb"))

    def offered(self) -> list[InstanceType]:
        """The types that fit the pool's caps at all: a type bigger than maxCores or maxRamGb
        could never be launched, so it is not on offer. (maxWorkers: 0 pauses the pool: its
        runs queue, they are not unschedulable.)"""
        return [t for t in self.types
                if (self.max_cores is None or t.cores <= self.max_cores)
                and (self.max_ram_gb is None or t.ram_gb <= self.max_ram_gb)]


# ------------------------------------------------------------------------------ instance type


def _price(kind: InstanceType) -> float:
    return math.inf if kind.hourly_price is None else kind.hourly_price  # unpriced types last


def choose_instance_type(types: Iterable[InstanceType], min_cores: float, min_ram_gb: float,
                         max_cores: int | None = None) -> InstanceType | Unschedulable:
    """The smallest type with at least `min_cores` and `min_ram_gb` (fewest cores, then least
    RAM, then cheapest, then by name). With `max_cores`, the largest type with at most that many
    cores that still has the cores and RAM asked for (most cores, then least RAM, cheapest, name).
    Otherwise Unschedulable, naming what was asked and the largest type on offer."""
    types = list(types)
    min_cores, min_ram_gb = float(min_cores or 0), float(min_ram_gb or 0)
    fitting = [t for t in types if t.cores >= min_cores and t.ram_gb >= min_ram_gb
               and (max_cores is None or t.cores <= max_cores)]
    if fitting:
        if max_cores is None:
            return min(fitting, key=lambda t: (t.cores, t.ram_gb, _price(t), t.type))
        return min(fitting, key=lambda t: (-t.cores, t.ram_gb, _price(t), t.type))
    return Unschedulable(_unschedulable_message(types, min_cores, min_ram_gb, max_cores))


def _unschedulable_message(types: list[InstanceType], min_cores: float, min_ram_gb: float,
                           max_cores: int | None) -> str:
    asked = f"{_number(min_cores)} cores and {_gb(min_ram_gb)} GB of RAM"
    if max_cores is not None:
        asked += f" with at most {max_cores} cores"
    if not types:
        return f"the task asks for {asked}, and no instance type is on offer"
    largest = max(types, key=lambda t: (t.cores, t.ram_gb, -_price(t), t.type))
    most_ram = max(types, key=lambda t: (t.ram_gb, t.cores, -_price(t), t.type))
    offer = f"the largest type on offer is {largest.describe()}"
    if most_ram is not largest and most_ram.ram_gb > largest.ram_gb:
        offer += f", the one with the most RAM {most_ram.describe()}"
    return f"the task asks for {asked}; {offer}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _gb(value: float) -> str:
    return _number(round(float(value), 3))


# ------------------------------------------------------------------------------------ usage


def _holding(instances: Iterable[Instance], pool: Ec2Pool) -> list[Instance]:
    return [i for i in instances if i.pool == pool.name and i.state not in GONE_STATES]


def _size(instance: Instance, pool: Ec2Pool) -> InstanceType:
    """What an instance holds of the caps. A type no longer in the table (edited out after the
    launch) counts as the pool's largest, so that an edit never lets the caps be overrun."""
    by_name = {t.type: t for t in pool.types}
    if instance.type in by_name:
        return by_name[instance.type]
    largest_cores = max((t.cores for t in pool.types), default=0)
    largest_ram = max((t.ram_gb for t in pool.types), default=0.0)
    return InstanceType(instance.type, largest_cores, largest_ram)


def usage(pool: Ec2Pool, instances: Iterable[Instance]) -> tuple[int, float, float]:
    """(instances, cores, GB) the pool's instances hold now: every state but terminated."""
    held = [_size(i, pool) for i in _holding(instances, pool)]
    return len(held), float(sum(t.cores for t in held)), float(sum(t.ram_gb for t in held))


def unschedulable(pool: Ec2Pool | dict, demand: Ec2Demand) -> Unschedulable | None:
    """Why no instance of the pool can ever hold the demand's run, or None when one can."""
    pool = pool if isinstance(pool, Ec2Pool) else Ec2Pool.from_resource(pool)
    kind = choose_instance_type(pool.offered(), demand.min_cores, demand.min_ram_gb, demand.max_cores)
    if isinstance(kind, Unschedulable):
        return Unschedulable(f"pool {pool.name}: {kind.message}")
    return None


# ----------------------------------------------------------------------------------- orphans


def orphans(instances: Iterable[Instance], live_run_ids: Iterable[str], now: Seconds,
            launch_grace_seconds: float = LAUNCH_GRACE_SECONDS) -> list[str]:
    """The instances (the caller's describe already filtered them by our worker tag and the pool)
    whose run is not live, not terminating already, and older than the launch grace: to
    terminate, log and count."""
    live, now_s = set(live_run_ids), _seconds(now)
    return sorted(i.instance_id for i in instances
                  if i.state not in LEAVING_STATES
                  and (not i.run_id or i.run_id not in live)
                  and now_s - _launched(i) >= launch_grace_seconds)


# ---------------------------------------------------------------------------------- reporting


def counts_by_state(pool: Ec2Pool | dict, instances: Iterable[Instance]) -> dict[str, int]:
    """How many of the pool's instances are in each EC2 state (for the metrics)."""
    pool = pool if isinstance(pool, Ec2Pool) else Ec2Pool.from_resource(pool)
    counts: dict[str, int] = {}
    for instance in instances:
        if instance.pool == pool.name:
            counts[instance.state] = counts.get(instance.state, 0) + 1
    return dict(sorted(counts.items()))


def cost_rate(pool: Ec2Pool | dict, instances: Iterable[Instance]) -> float | None:
    """The estimated cost of an hour of the pool's instances not terminated, from the type
    table's hourlyPrice; None when one of them has no known price (a partial sum would read as
    the whole). No instance costs 0."""
    pool = pool if isinstance(pool, Ec2Pool) else Ec2Pool.from_resource(pool)
    prices = {t.type: t.hourly_price for t in pool.types}
    total = 0.0
    for instance in _holding(instances, pool):
        price = prices.get(instance.type)
        if price is None:
            return None
        total += price
    return round(total, 6)


def status_entries(pool: Ec2Pool | dict, instances: Iterable[Instance], limit: int = 100) -> list[dict]:
    """The pool's instances not terminated, as its status lists them (id, type, state, run,
    launch time in RFC 3339), oldest first, at most `limit`."""
    pool = pool if isinstance(pool, Ec2Pool) else Ec2Pool.from_resource(pool)
    entries = []
    for instance in sorted(_holding(instances, pool), key=lambda i: (_launched(i), i.instance_id))[:limit]:
        launched = datetime.fromtimestamp(_launched(instance), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = {"instanceId": instance.instance_id, "type": instance.type, "state": instance.state,
                 "launchTime": launched}
        if instance.run_id:
            entry["run"] = instance.run_id
        entries.append(entry)
    return entries


# ------------------------------------------------------------------- the phase machine's view


def is_ec2(pool: dict | None) -> bool:
    return bool(pool) and ((pool.get("spec") or {}).get("provider") == "ec2")


def instance_type_for(pool: Ec2Pool | dict, task: dict) -> InstanceType | Unschedulable:
    """The type a run of `task` is launched as in `pool` (among the types its caps allow)."""
    pool = pool if isinstance(pool, Ec2Pool) else Ec2Pool.from_resource(pool)
    demand = demand_for("", task)
    return choose_instance_type(pool.offered(), demand.min_cores, demand.min_ram_gb, demand.max_cores)


def takes(pool: dict, task: dict) -> bool:
    """Whether some instance type the EC2 pool may launch holds a run of `task`."""
    return not isinstance(instance_type_for(pool, task), Unschedulable)


def unschedulable_on_ec2(task: dict, pools: Sequence[dict]) -> str | None:
    """Why the task can never run, when the EC2 pools of its platform are where it would go and
    none of them has a type that holds it: one line per pool, naming what the task asks for and
    the largest type on offer. None when one of them holds it, or when no EC2 pool has its
    platform (then it waits for a pool, as on pods)."""
    platform = (task or {}).get("platform") or "linux"
    candidates = sorted((p for p in pools if is_ec2(p) and ((p.get("spec") or {}).get("platform") or "linux") == platform),
                        key=lambda p: p["metadata"]["name"])
    if not candidates:
        return None
    reasons = []
    for pool in candidates:
        refusal = unschedulable(pool, demand_for("", task))
        if refusal is None:
            return None
        reasons.append(refusal.message)
    return "; ".join(reasons)


def sized_for_instances(demands: list, ec2_pools: Sequence[dict], testruns: Sequence[dict]) -> list:
    """Admission's demands (decisions/pools.py `Demand`) with those of EC2 pools at the size of
    the instance type each run is launched as: an instance holds its whole type. A run no type
    holds asks for nothing (its decision ends it as Unschedulable)."""
    by_pool = {pool["metadata"]["name"]: pool for pool in ec2_pools}
    tasks = {((t.get("metadata") or {}).get("namespace", ""), (t.get("metadata") or {}).get("name", "")):
             (t.get("spec") or {}).get("definition") or {} for t in testruns}
    sized = []
    for demand in demands:
        pool = by_pool.get(demand.pool)
        if pool is None:
            sized.append(demand)
            continue
        kind = instance_type_for(pool, tasks.get(demand.testrun, {}))
        if not isinstance(kind, Unschedulable):
            sized.append(dataclasses.replace(demand, cores=float(kind.cores), ram_gb=float(kind.ram_gb)))
    return sized


def observe_instance(instance: Instance, run: int, attempt: int, *, impaired: bool = False,
                     leaving_since: float | None = None):
    """What the phase machine reads of the instance of one run attempt (decisions/phases.py's
    PodObservation): running from its launch (its boot is bounded by the boot grace until the
    agent's first heartbeat); ended once EC2 says it is going or gone (`leaving_since`: when the
    operator first saw that, so that the wait for a RESULT in flight has a fixed start);
    `lost_reason` StatusChecksFailed when EC2 reports it impaired."""
    from testlooper.decisions.phases import PodObservation

    launched = _launched(instance)
    name = f"instance {instance.instance_id} ({instance.type})"
    if instance.state in GOING_STATES:
        return PodObservation(run=run, attempt=attempt, phase="Failed", created=launched, started=launched,
                              running_since=launched, finished=leaving_since, message=f"{name} is {instance.state}",
                              # Going already: not to be terminated again (a stopped one is).
                              deleting=instance.state in LEAVING_STATES)
    if impaired or _checks_failed(instance):
        return PodObservation(run=run, attempt=attempt, phase="Running", created=launched, started=launched,
                              running_since=launched, lost_reason="StatusChecksFailed",
                              message=f"{name} failed its EC2 status checks")
    return PodObservation(run=run, attempt=attempt, phase="Running", created=launched, started=launched,
                          running_since=launched, message=name)


def boot_grace(platform: str, configured: float = 0.0) -> float:
    """How long a new instance's agent has for its first heartbeat (`configured`, else by platform)."""
    return configured if configured > 0 else BOOT_TIMEOUT_SECONDS.get(platform, max(BOOT_TIMEOUT_SECONDS.values()))
