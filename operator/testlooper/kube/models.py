"""Typed models of the three custom resources: Repo, TestRun and WorkerPool.

These models are the single source of the resources' shape. `crds.py` generates the
CustomResourceDefinitions from them, and the operator validates every spec it reads with them
(`parse_repo_spec` and friends), so that a resource edited by hand into something the schema
could not refuse still ends as one clear line in a condition rather than a traceback.

Field names are camelCase, exactly as they appear in the resources, so that a field reads the
same in YAML, in Python and in `kubectl explain`. Validation is strict (no "60" for 60), as the
API server's is.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from testlooper.decisions.phases import MAX_ACTIVE_RUNS, MAX_FAILING_CASES, MAX_RECORDED_ATTEMPTS
from testlooper.errors import UserError

GROUP = "testlooper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclasses.dataclass(frozen=True)
class ResourceNames:
    """How the API server names one of our resources."""

    kind: str
    plural: str
    singular: str
    short_name: str

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


REPO = ResourceNames(kind="Repo", plural="repos", singular="repo", short_name="tlrepo")
TESTRUN = ResourceNames(kind="TestRun", plural="testruns", singular="testrun", short_name="tlrun")
WORKERPOOL = ResourceNames(
    kind="WorkerPool", plural="workerpools", singular="workerpool", short_name="tlpool"
)

DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
"""An RFC 3339 timestamp, as Kubernetes writes them (`2026-12-01T08:30:00Z`)."""

NonEmptyString = Annotated[str, Field(min_length=1)]

# Conditions are a list keyed by their type: server-side apply merges them entry by entry.
CONDITIONS_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class _Spec(BaseModel):
    """A spec: what the user asks for. Unknown fields are an error the user should see."""

    model_config = ConfigDict(strict=True, extra="forbid", use_attribute_docstrings=True)


class _Status(BaseModel):
    """A status: what the operator observed. Written by the operator, read back tolerantly."""

    model_config = ConfigDict(strict=True, extra="ignore", use_attribute_docstrings=True)


class Condition(_Status):
    """One aspect of the resource's state, in the usual Kubernetes form."""

    type: NonEmptyString
    """The aspect this condition describes, e.g. Ready."""
    status: Literal["True", "False", "Unknown"]
    """Whether the aspect holds: True, False or Unknown."""
    reason: str | None = None
    """A CamelCase word for why, e.g. GitUnreachable."""
    message: str | None = None
    """One line a person can act on."""
    lastTransitionTime: DateTime | None = None
    """When status last changed (not when the condition was last written)."""
    observedGeneration: int | None = Field(default=None, ge=0)
    """The metadata.generation of the spec this condition was computed from."""


# ----------------------------------------------------------------------------------------- Repo


class Retention(_Spec):
    """How many TestRuns of a Repo stay in the cluster. The history store keeps everything."""

    keepCommits: int = Field(default=50, ge=1)
    """Keep the TestRuns of the newest N processed commits; older ones are deleted once ended."""


class RepoSpec(_Spec):
    """A git repository to watch: every new commit on its branches gets its TestRuns."""

    url: NonEmptyString
    """Where to fetch from: https://, http://, ssh://, git@host:path or file://."""
    branches: list[NonEmptyString] = Field(default=["main"], min_length=1)
    """Globs of the branch names to test, e.g. main or release/*."""
    pollIntervalSeconds: int = Field(default=60, ge=10)
    """Seconds between two fetches. Push webhooks trigger a fetch at once."""
    credentialsSecret: NonEmptyString | None = None
    """A Secret in this namespace with key token, or username and password, or ssh-privatekey (and optionally known_hosts)."""
    webhookSecret: NonEmptyString | None = None
    """A Secret in this namespace whose key secret checks the push webhooks' signatures."""
    definitionsPath: NonEmptyString | None = None
    """The path of the test definitions file in the repository, when it is not found by its usual names."""
    testSets: list[NonEmptyString] | None = None
    """Test sets to run on every commit. When given, they are run instead of what the triggers choose."""
    runs: int | None = Field(default=None, ge=1, le=1000)
    """Run every test this many times, whatever its own runs says."""
    workerPool: NonEmptyString | None = None
    """The WorkerPool that runs this repository's TestRuns (default: the pools by priority)."""
    suspend: bool = False
    """Stop polling and creating TestRuns; the ones that exist carry on."""
    retention: Retention = Field(default_factory=Retention, json_schema_extra={"default": {}})
    """How many commits' TestRuns to keep in the cluster."""


class BranchStatus(_Status):
    """The head of one tested branch and the tally of its TestRuns."""

    name: str
    """The branch name."""
    commit: str
    """The commit at the head of the branch when last polled."""
    passed: int = Field(ge=0)
    """TestRuns of that commit that passed."""
    failed: int = Field(ge=0)
    """TestRuns of that commit that failed (timeouts and errors included)."""
    flaky: int = Field(ge=0)
    """TestRuns of that commit whose runs both passed and failed."""
    running: int = Field(ge=0)
    """TestRuns of that commit not finished yet."""
    error: str | None = None
    """Why the head is untestable (its definitions do not resolve), in one line; absent otherwise."""


class RepoStatus(_Status):
    """What the operator last saw of the repository."""

    conditions: list[Condition] | None = Field(default=None, json_schema_extra=CONDITIONS_LIST)
    """Ready, GitReachable and DefinitionsValid."""
    branches: list[BranchStatus] | None = None
    """Each tested branch's head and its tally."""
    branchesSummary: str | None = None
    """The branches in one line, e.g. main@0123abcd 3 passed 1 failed."""
    lastPollTime: DateTime | None = None
    """When the repository was last fetched successfully."""
    observedGeneration: int | None = Field(default=None, ge=0)
    """The metadata.generation of the spec last acted on."""
    message: str | None = None
    """The last problem, in one line, or empty."""


# -------------------------------------------------------------------------------------- TestRun

TaskKind = Literal["build", "test"]
TestRunPhase = Literal[
    "Pending", "Blocked", "Queued", "Running", "Succeeded", "Failed", "Error", "Cancelled"
]
TestRunResult = Literal["passed", "failed", "flaky", "timeout", "error", "blocked", "cancelled"]


class TestRunSpec(_Spec):
    """One build or test of one commit of a Repo, run `runs` times."""

    __test__ = False  # not a pytest test class, despite its name

    repo: NonEmptyString
    """The name of the Repo in this namespace."""
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    """The full commit sha (40 lowercase hex characters)."""
    branch: str | None = None
    """The branch whose head the commit was when it was planned."""
    task: NonEmptyString
    """The build or test name from the definitions file, e.g. unit/linux."""
    kind: TaskKind
    """build or test."""
    runs: int = Field(default=1, ge=1, le=100000)
    """How many times to run it. Raise it to ask for more runs."""
    hash: str | None = None
    """The task's content hash: an equal hash that passed before is not run again."""
    definition: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """The resolved task, exactly as `testlooper definitions --json` gives it under builds or tests."""
    dependsOn: list[NonEmptyString] | None = None
    """The names of the TestRuns of the builds it consumes, in this namespace."""
    workerPool: NonEmptyString | None = None
    """The WorkerPool to run on (default: the pools by priority)."""
    priority: int = 0
    """Higher runs first."""
    cancel: bool = False
    """Set to true to stop its runs; the result becomes cancelled."""


class RunCounts(_Status):
    """How the runs of a TestRun stand."""

    total: int = Field(ge=0)
    """Runs asked for (spec.runs)."""
    passed: int = Field(ge=0)
    """Runs that ended and passed."""
    failed: int = Field(ge=0)
    """Runs that ended and failed (timeouts included)."""
    running: int = Field(ge=0)
    """Runs placed on a worker and not ended."""
    queued: int = Field(ge=0)
    """Runs waiting for a worker."""
    errored: int = Field(ge=0)
    """Runs that could not run (the worker or the infrastructure failed)."""
    timedOut: int = Field(default=0, ge=0)
    """Of the failed runs, those that ran past their timeout."""


class CaseCounts(_Status):
    """The test cases reported by the runs, counted once per case."""

    total: int = Field(ge=0)
    """Distinct test cases seen."""
    passed: int = Field(ge=0)
    """Cases that passed in every run."""
    failed: int = Field(ge=0)
    """Cases that failed in at least one run."""


class ActiveRun(_Status):
    """A run started and not ended: the attempt it is on and where that attempt stands."""

    attempt: int = Field(ge=1)
    """The attempt now placed or waiting (1 for the first)."""
    state: Literal["Placed", "Waiting"]
    """Placed: its pod was created. Waiting: it waits for room in the pool (a retry)."""
    since: DateTime
    """When it entered that state."""
    notBefore: DateTime | None = None
    """A retried build waits until then (its retry_wait_seconds)."""
    infraFailures: int = Field(default=0, ge=0)
    """Attempts of this run lost to the infrastructure so far (evicted, deleted, no heartbeat...)."""


class AttemptRecord(_Status):
    """One attempt that ended without ending its run, and why."""

    run: int = Field(ge=1)
    """The run index."""
    attempt: int = Field(ge=1)
    """The attempt that ended."""
    reason: NonEmptyString
    """A CamelCase word: Evicted, PodDeleted, NodeLost, ImagePullBackOff, HeartbeatLost, NoResult, BuildFailed..."""
    message: str | None = None
    """One line: what was observed."""
    time: DateTime
    """When it was recorded."""


class ResultFrom(_Status):
    """Where a reused result came from: an earlier commit whose task had the same hash."""

    commit: str
    """The earlier commit."""
    testRun: str
    """The TestRun of that commit, when it still exists."""


class TestRunStatus(_Status):
    """Where the TestRun stands, and its result once it ends."""

    __test__ = False  # not a pytest test class, despite its name

    phase: TestRunPhase | None = None
    """Pending, Blocked, Queued, Running, Succeeded, Failed, Error or Cancelled."""
    result: TestRunResult | None = None
    """Once it ends: passed, failed, flaky, timeout, error, blocked or cancelled."""
    runCounts: RunCounts | None = None
    """The runs by state."""
    runsSummary: str | None = None
    """passed/total, e.g. 3/6."""
    cases: CaseCounts | None = None
    """The test cases' tally."""
    casesSummary: str | None = None
    """passed/total cases, e.g. 118/120."""
    failingCases: list[str] | None = Field(default=None, max_length=MAX_FAILING_CASES)
    """The first failing case names (at most 20)."""
    resultFrom: ResultFrom | None = None
    """Set when the result was reused from an earlier commit."""
    workerPool: str | None = None
    """The WorkerPool its runs were placed in (chosen once)."""
    startedRuns: int | None = Field(default=None, ge=0)
    """Run indexes 1..startedRuns have been started at least once; the others wait their turn."""
    active: dict[str, ActiveRun] | None = Field(default=None, max_length=MAX_ACTIVE_RUNS)
    """The runs started and not ended, by run index (at most 1000 at once)."""
    attempts: list[AttemptRecord] | None = Field(default=None, max_length=MAX_RECORDED_ATTEMPTS)
    """The latest attempts that ended without ending their run, with why (at most 20)."""
    infraRetries: int | None = Field(default=None, ge=0)
    """Attempts retried because the infrastructure failed, in total."""
    runnableSince: DateTime | None = None
    """When its builds had passed (or spec.runs was raised): its runs wait in the queue from then."""
    startTime: DateTime | None = None
    """When its first run started."""
    completionTime: DateTime | None = None
    """When its last run ended."""
    conditions: list[Condition] | None = Field(default=None, json_schema_extra=CONDITIONS_LIST)
    """The TestRun's conditions."""
    message: str | None = None
    """The last problem, in one line, or empty."""


# ----------------------------------------------------------------------------------- WorkerPool


class Toleration(_Spec):
    """A toleration given to the pool's pods, as in a Pod spec."""

    key: str | None = None
    """The taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = None
    """The taint value, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate; empty tolerates all."""
    tolerationSeconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


# AWS identifiers, as EC2 writes them (8 hex digits for old resources, 17 for newer ones).
AWS_REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"
INSTANCE_TYPE_PATTERN = r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$"
# A hostname that may go into a worker's hosts file: letters, digits, dots and dashes only, so
# that nothing written from it into the user-data script can be read as more than a name.
HOSTNAME_PATTERN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _aws_id(prefix: str) -> str:
    return rf"^{prefix}-[0-9a-f]{{8}}([0-9a-f]{{9}})?$"


def _spec_rule(field: tuple[str, ...], message: str) -> PydanticCustomError:
    """A rule across fields, reported against `field` (its path below the model)."""
    return PydanticCustomError("spec_rule", "{message}", {"field": field, "message": message})


class Ec2InstanceType(_Spec):
    """One EC2 instance type the pool may launch, with what a task may count on from it."""

    type: str = Field(pattern=INSTANCE_TYPE_PATTERN, max_length=64)
    """The EC2 instance type, e.g. m5.xlarge."""
    cores: int = Field(ge=1, le=1024)
    """The vCPUs it has."""
    ramGb: float = Field(ge=0.5, le=32768)
    """Its memory, in GB."""
    hourlyPrice: float | None = Field(default=None, ge=0)
    """What an hour of it costs (any currency, used alike for all types): breaks ties between types and gives the cost-rate metric."""


class Ec2PoolSpec(_Spec):
    """Where and how a pool with provider ec2 launches its instances. AWS credentials are not set here: the operator takes them as boto3 does (IRSA, instance role or environment)."""

    region: str = Field(pattern=AWS_REGION_PATTERN, max_length=32)
    """The AWS region to launch in, e.g. us-east-1 (best the same as the artifact bucket's)."""
    vpcId: str = Field(pattern=_aws_id("vpc"))
    """The VPC the instances run in, e.g. vpc-0a1b2c3d."""
    subnetId: str = Field(pattern=_aws_id("subnet"))
    """The subnet the instances are launched into; it must be in vpcId."""
    securityGroupIds: list[Annotated[str, Field(pattern=_aws_id("sg"))]] = Field(min_length=1, max_length=16)
    """The security groups of the instances; they must let them reach the operator's worker API."""
    keyName: str | None = Field(default=None, min_length=1, max_length=255)
    """An EC2 key pair for a person to log in with (default: none)."""
    instanceProfile: str | None = Field(
        default=None, max_length=2048,
        pattern=r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[A-Za-z0-9+=,.@/_-]+|[A-Za-z0-9+=,.@_-]{1,128})$")
    """The IAM instance profile of the instances, by name or ARN (default: none)."""
    instanceTypes: list[Ec2InstanceType] = Field(min_length=1, max_length=100)
    """The instance types the pool may launch; each run gets the smallest that fits its task."""
    linuxAmi: str | None = Field(default=None, pattern=_aws_id("ami"))
    """The AMI of Linux workers; required when the pool's platform is linux."""
    windowsAmi: str | None = Field(default=None, pattern=_aws_id("ami"))
    """The AMI of Windows workers; required when the pool's platform is windows."""
    hostIps: dict[str, Annotated[str, Field(min_length=2, max_length=45)]] | None = Field(
        default=None, json_schema_extra={"maxProperties": 100})
    """hostname: IP address, written into each worker's hosts file (for names the workers cannot resolve)."""
    workerTag: str = Field(default="testlooper-worker", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=+@-]{0,127}$")
    """The worker tag put on every instance the pool launches: the operator only ever terminates instances that carry it. Give each installation sharing an AWS account its own."""
    minLifetimeSeconds: int = Field(default=0, ge=0, le=86400)
    """With reuse: how long an instance is kept, from its launch, for further runs once its run ends."""
    reuse: bool = False
    """Windows pools only, and not supported yet (refused when true): give an idle instance (its run ended, minLifetimeSeconds not passed) to the next run that fits it, rather than terminate it and boot another."""

    @model_validator(mode="after")
    def _check_host_ips(self):
        for hostname, address in (self.hostIps or {}).items():
            if not HOSTNAME_PATTERN.match(hostname):
                raise _spec_rule(("hostIps",), f"{hostname[:80]!r} is not a valid hostname (letters, digits, dots and dashes)")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise _spec_rule(("hostIps", hostname), f"{address!r} is not an IP address") from None
        names = [entry.type for entry in self.instanceTypes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise _spec_rule(("instanceTypes",), f"lists {', '.join(duplicates)} more than once")
        return self


class WorkerPoolSpec(_Spec):
    """Where runs execute, and how much of it they may take at once."""

    provider: Literal["kubernetes", "ec2"]
    """kubernetes (runs are pods in this cluster) or ec2 (runs are EC2 instances; see ec2)."""
    platform: Literal["linux", "windows"] = "linux"
    """The platform of the tasks this pool runs."""
    priority: int = 0
    """Pools with a higher priority are tried first."""
    namespace: NonEmptyString | None = None
    """The namespace the pods run in (default: the pool's own)."""
    nodeSelector: dict[str, str] | None = None
    """Node labels the pods must be scheduled on."""
    tolerations: list[Toleration] | None = None
    """Taints the pods tolerate."""
    defaultImage: NonEmptyString | None = None
    """The image used when a task's environment names no prebuilt image."""
    maxPodCores: int | None = Field(default=None, ge=1)
    """The most cores one pod may ask for."""
    maxPodRamGb: float | None = Field(default=None, ge=0)
    """The most memory, in GB, one pod may ask for."""
    maxWorkers: int | None = Field(default=None, ge=0)
    """The most pods running at once."""
    maxCores: int | None = Field(default=None, ge=0)
    """The most cores all pods may hold at once."""
    maxRamGb: float | None = Field(default=None, ge=0)
    """The most memory, in GB, all pods may hold at once."""
    testRunAsUser: int | None = Field(default=None, ge=1)
    """Run the test container as this non-root user id, when its image allows (the worker containers beside it too); unset: the test container runs as its image says, the worker containers as 65532."""
    ec2: Ec2PoolSpec | None = None
    """Required with provider ec2, refused otherwise: where and how the instances are launched. The caps are maxWorkers, maxCores and maxRamGb, as for pods."""

    @model_validator(mode="after")
    def _check_provider_settings(self):
        # The CRD cannot say "required when provider is ec2" without CEL, which the other
        # resources do not use either: the operator refuses such a pool with this message.
        if self.provider == "ec2" and self.ec2 is None:
            raise _spec_rule(("ec2",), "is required when provider is ec2")
        if self.provider != "ec2" and self.ec2 is not None:
            raise _spec_rule(("ec2",), f"is only for provider ec2 (this pool's provider is {self.provider})")
        if self.ec2 is None:
            return self
        ami = "windowsAmi" if self.platform == "windows" else "linuxAmi"
        if getattr(self.ec2, ami) is None:
            raise _spec_rule(("ec2", ami), f"is required for a {self.platform} pool")
        if self.ec2.reuse and self.platform != "windows":
            raise _spec_rule(("ec2", "reuse"), "is only for windows pools (Linux instances boot fast)")
        if self.ec2.reuse:
            # The agent runs one run and its instance shuts down: giving it a second run needs
            # a per-instance protocol the worker API does not have yet (docs/ec2.md).
            raise _spec_rule(("ec2", "reuse"), "is not supported by this operator yet: each run gets its own "
                             "instance, terminated when the run ends")
        if self.ec2.minLifetimeSeconds and not self.ec2.reuse:
            raise _spec_rule(("ec2", "minLifetimeSeconds"), "only has a meaning with reuse: true")
        return self


class Ec2InstanceStatus(_Status):
    """One EC2 instance of the pool, as last observed."""

    instanceId: NonEmptyString
    """The EC2 instance id."""
    type: str
    """Its instance type."""
    state: str
    """Its EC2 state: pending, running, shutting-down, stopping or stopped."""
    run: str | None = None
    """The run it serves (its run tag)."""
    launchTime: DateTime | None = None
    """When it was launched."""


class WorkerPoolStatus(_Status):
    """What the pool holds now."""

    workers: int | None = Field(default=None, ge=0)
    """Pods placed and not finished."""
    cores: int | None = Field(default=None, ge=0)
    """Cores those pods asked for."""
    ramGb: float | None = Field(default=None, ge=0)
    """Memory, in GB, those pods asked for."""
    queued: int | None = Field(default=None, ge=0)
    """Runs waiting for room in this pool."""
    workersSummary: str | None = None
    """in use/max, e.g. 3/10."""
    instances: list[Ec2InstanceStatus] | None = Field(default=None, max_length=100)
    """provider ec2: its instances not terminated (at most 100, oldest first)."""
    costPerHour: float | None = Field(default=None, ge=0)
    """provider ec2: the estimated cost of an hour of those instances, from the types' hourlyPrice (unset when one has none)."""
    conditions: list[Condition] | None = Field(default=None, json_schema_extra=CONDITIONS_LIST)
    """The pool's conditions."""
    observedGeneration: int | None = Field(default=None, ge=0)
    """The metadata.generation of the spec last acted on."""


# ----------------------------------------------------------------------------------- Validation


class SpecError(UserError, ValueError):
    """A resource's spec that the models refuse. Its message is one line naming the field paths.

    Also a ValueError: to code that only validates, a bad spec is a bad value like any other."""


def parse_spec(model: type[BaseModel], spec: Any, path: str = "spec"):
    """Validate `spec` (a dict as the API returns it) with `model`, or raise SpecError."""
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: must be an object, not {_type_name(spec)}")
    try:
        return model.model_validate(spec)
    except ValidationError as error:
        problems = [_describe(path, detail) for detail in error.errors(include_url=False)]
        raise SpecError("; ".join(problems)) from None


def parse_repo_spec(spec: Any) -> RepoSpec:
    return parse_spec(RepoSpec, spec)


def parse_testrun_spec(spec: Any) -> TestRunSpec:
    return parse_spec(TestRunSpec, spec)


def parse_workerpool_spec(spec: Any) -> WorkerPoolSpec:
    return parse_spec(WorkerPoolSpec, spec)


def _field_path(path: str, loc: tuple) -> str:
    text = path
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _describe(path: str, detail: dict) -> str:
    kind, context, value = detail["type"], detail.get("ctx") or {}, detail.get("input")
    if kind == "spec_rule":
        return f"{_field_path(path, tuple(detail['loc']) + tuple(context['field']))}: {context['message']}"
    where = _field_path(path, detail["loc"])
    if kind == "missing":
        return f"{where}: is required"
    if kind == "extra_forbidden":
        return f"{where}: is not a known field"
    explained = {
        "greater_than_equal": lambda: f"must be at least {context.get('ge')}",
        "less_than_equal": lambda: f"must be at most {context.get('le')}",
        "string_pattern_mismatch": lambda: f"must match {context.get('pattern')}",
        "string_too_short": lambda: "must not be empty",
        "too_short": lambda: f"must have at least {context.get('min_length')} item(s)",
        "too_long": lambda: f"must have at most {context.get('max_length')} item(s)",
        "literal_error": lambda: f"must be one of {context.get('expected')}",
        "int_type": lambda: "must be an integer",
        "float_type": lambda: "must be a number",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be a string",
        "list_type": lambda: "must be a list",
        "dict_type": lambda: "must be an object",
        "model_type": lambda: "must be an object",
    }
    message = explained[kind]() if kind in explained else detail["msg"][:1].lower() + detail["msg"][1:]
    return f"{where}: {message}{_got(value)}"


def _got(value: Any) -> str:
    """Quote a short scalar input; objects and long strings are described, not echoed."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return f" (got {value!r})"
    if isinstance(value, str):
        return f" (got {value!r})" if len(value) <= 60 else f" (got a string of {len(value)} characters)"
    return f" (got {_type_name(value)})"


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
