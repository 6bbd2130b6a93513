"""The TestRun phase machine: `decide(testrun, observations) -> Decision(status_patch, actions)`.

Pure: the shell lists what it needs (the builds consumed, the TestRun's pods, the results and
heartbeats its agents posted, the pool's admission answer, the time), calls `decide`, and
applies what comes back. Everything the machine remembers is in the TestRun's status, and the
status stays bounded however many runs it has:

- `startedRuns`: run indexes 1..startedRuns have been started; the rest wait their turn, as a
  count (so `spec.runs: 100000` costs nothing until a run starts);
- `active`: the runs started and not ended, by index (at most MAX_ACTIVE_RUNS), with the
  attempt each is on;
- counts of the runs that ended, the last 20 attempts retried and why, the first failing cases.

A run's result is counted in the same status write that takes it out of `active`, so a result
seen twice (or again after a restart) finds its run no longer on that attempt and is ignored.

**Applying a decision, in this order:** the creates (`CreateSecret`, then `CreatePod`; a 409
counts as done; stop at the first other failure and do not write the status), then the status
patch (a JSON merge patch), then the rest (deletes, records, events). A crash between two steps
leaves a state the next decision repairs from the status and the pods alone: a pod created but
not yet recorded is adopted; a pod of a run already counted is deleted.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Mapping, Sequence

from testlooper.decisions.pools import pool_for
from testlooper.decisions.repo import ENDED_PHASES
from testlooper.decisions.rules import blocked_reason, build_verdict, retry_wait, task_result_of_counts

# The status's bounds (kube/models.py gives them to the CRD).
MAX_ACTIVE_RUNS = 1000
MAX_RECORDED_ATTEMPTS = 20
MAX_FAILING_CASES = 20

RESULT_FROM_TESTRUN = "testlooper.dev/result-from-testrun"
RESULT_FROM_COMMIT = "testlooper.dev/result-from-commit"

PLACED, WAITING = "Placed", "Waiting"
UNSCHEDULABLE = "Unschedulable"  # the condition of a TestRun no EC2 instance type can hold
PHASE_OF_RESULT = {"passed": "Succeeded", "failed": "Failed", "flaky": "Failed", "timeout": "Failed",
                   "blocked": "Failed", "error": "Error", "cancelled": "Cancelled"}
# A container waiting for these will not start by itself soon: past a grace period, try again.
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CANNOT_START_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
REPORTS_UNKNOWN_RETRY_SECONDS = 2.0  # decide again this soon when the agents' reports could not be read
NODE_LOST_REASONS = frozenset({"NodeLost", "NodeShutdown", "Terminated", "Shutdown", "UnexpectedAdmissionError"})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The operator's configured limits (defaults as documented in docs/operator.md)."""

    max_infra_retries: int = 3  # attempts lost to the infrastructure retried per run, then error
    pending_timeout_seconds: float = 600.0  # Prow's pod_pending_timeout
    image_pull_grace_seconds: float = 300.0
    heartbeat_grace_seconds: float = 180.0  # counted from the operator's own start too
    missing_pod_grace_seconds: float = 30.0  # a pod just created may not be listed yet
    result_grace_seconds: float = 30.0  # a pod that ended may have posted a result not seen yet
    max_active_runs: int = MAX_ACTIVE_RUNS
    # A new TestRun with nothing to wait for is admission's (`_Machine.leave_to_admission`):
    # it says Queued once a round found no room for it, or past this long after its creation
    # if no round could say (admission failing); 0: at once, as before admission took it.
    admission_wait_seconds: float = 10.0


@dataclasses.dataclass(frozen=True)
class PodObservation:
    """One pod of the TestRun, as `observe_pod` reads it."""

    run: int
    attempt: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    created: float = 0.0
    started: float | None = None  # status.startTime: the kubelet took it (init containers may run)
    running_since: float | None = None  # when its last container started running
    finished: float | None = None  # the last container's finishedAt, once the pod ended
    reason: str = ""  # status.reason: Evicted, DeadlineExceeded, NodeLost...
    message: str = ""
    waiting_reason: str = ""  # a container waiting for this: ImagePullBackOff, ErrImagePull...
    waiting_message: str = ""
    waiting_since: float | None = None  # since when it is known to wait (the PodScheduled time)
    unschedulable: str = ""  # why the scheduler has not placed it
    disruption: str = ""  # the DisruptionTarget condition's reason: preempted, evicted, node gone
    exit_codes: tuple[tuple[str, int], ...] = ()
    deleting: bool = False  # metadata.deletionTimestamp is set
    # An infrastructure failure its provider reports (an EC2 instance's StatusChecksFailed),
    # said in `message`: the attempt is retried unless a RESULT came.
    lost_reason: str = ""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The RESULT an agent posted for one attempt (docs/design.md)."""

    result: str  # passed | failed | timeout | error | cancelled
    error: str = ""
    failed_cases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Observations:
    now: float  # seconds since the epoch
    builds: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # dependsOn -> (phase, result)
    pools: Sequence[dict] = ()  # the namespace's WorkerPools
    pods: Sequence[PodObservation] = ()  # the TestRun's pods (its label), all attempts
    secrets: Sequence[tuple[int, int]] = ()  # (run, attempt) of the TestRun's token Secrets
    results: Mapping[tuple[int, int], RunResult] = dataclasses.field(default_factory=dict)  # (run, attempt)
    heartbeats: Mapping[tuple[int, int], float] = dataclasses.field(default_factory=dict)  # last seen
    admitted: int = 0  # runs the pool's admission lets this TestRun start now
    operator_started: float = 0.0  # no heartbeat is missed while the operator itself was down
    cases: Mapping[str, int] | None = None  # the store's case tally {total, passed, failed}, when known
    settings: Settings = Settings()
    # False when the worker API's Redis could not be read: `results` and `heartbeats` are then
    # unknown, not empty, and no placed run is judged until they are known again (its RESULT
    # may be there, or on its way: its agent retries). Cancels, placement and new runs go on.
    reports_known: bool = True
    # What a run attempt runs on: "pod", or "instance" (an EC2 pool: decisions/ec2.py
    # observe_instance gives the `pods`), which names the failures.
    worker: str = "pod"
    # With an instance: how long its agent has for a first heartbeat after launch (it boots).
    boot_grace_seconds: float | None = None
    # False when the workers could not be listed (EC2 not answering): `pods` is then unknown,
    # not empty; a RESULT is still judged and a cancel still ends the TestRun.
    workers_known: bool = True
    # An admission round counted this TestRun's runs and found no room for any of them.
    admission_declined: bool = False
    # The pool whose room `admitted` was counted in: a new TestRun placed in another one now
    # (a pool created or edited since the round listed them) starts nothing.
    admitted_pool: str | None = None


# -- actions -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreateSecret:
    """The run's token Secret (before its pod, which mounts it)."""

    run: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class CreatePod:
    run: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class DeletePod:
    run: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class DeleteSecret:
    run: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class RecordAttempt:
    """An attempt that ended without ending its run (for the infrastructure-retries metric)."""

    run: int
    attempt: int
    reason: str
    message: str
    retried: bool  # False: the run gave up (it ends as error)
    infrastructure: bool = True  # False: a build's own verdict, retried per its max_retries


@dataclasses.dataclass(frozen=True)
class EmitEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


CREATES = (CreateSecret, CreatePod)


@dataclasses.dataclass
class Decision:
    status_patch: dict | None
    actions: list
    wake_after: float | None = None  # seconds after which to decide again even if nothing happens
    # The pool whose admission the TestRun is left to, with nothing written yet (a new one).
    awaits_admission: str | None = None

    def __iter__(self):
        return iter((self.status_patch, self.actions))

    @property
    def creates(self) -> list:
        """Applied before the status patch."""
        return [action for action in self.actions if isinstance(action, CREATES)]

    @property
    def afterwards(self) -> list:
        """Applied after the status patch."""
        return [action for action in self.actions if not isinstance(action, CREATES)]


# -- the machine -------------------------------------------------------------------------------

def decide(testrun: dict, observed: Observations) -> Decision:
    spec = testrun.get("spec") or {}
    status = testrun.get("status") or {}
    machine = _Machine(testrun, spec, status, observed)
    machine.run()
    machine.delete_stray_secrets()
    return Decision(machine.patch or None, machine.actions, machine.wake_after, machine.awaits_admission)


class _Machine:
    def __init__(self, testrun: dict, spec: dict, status: dict, observed: Observations):
        self.metadata = testrun.get("metadata") or {}
        self.spec, self.status, self.observed = spec, status, observed
        self.settings = observed.settings
        self.now = observed.now
        self.stamp = format_time(observed.now)
        self.patch: dict = {}
        self.actions: list = []
        self.wake_after: float | None = None
        self.awaits_admission: str | None = None
        self.admitted = observed.admitted  # what this decision may start (see `placement`)
        self.phase = status.get("phase") or ""
        self.definition = spec.get("definition") or {}
        self.kind = spec.get("kind") or "test"
        counts = status.get("runCounts") or {}
        self.counts = {key: int(counts.get(key) or 0)
                       for key in ("passed", "failed", "running", "queued", "errored", "timedOut")}
        self.started = int(status.get("startedRuns") or 0)
        self.active: dict[int, dict] = {int(key): value for key, value in (status.get("active") or {}).items()}
        self.active_changes: dict[str, dict | None] = {}
        self.new_attempts: list[dict] = []
        self.infra_retries = int(status.get("infraRetries") or 0)
        self.failing = list(status.get("failingCases") or [])
        self.failing_changed = False
        self.active_after: dict | None = None  # {} once every run's Secret must go
        self.reopened = False

    # -- top level ---------------------------------------------------------------------------

    def run(self) -> None:
        if not self.phase and self.metadata.get("annotations", {}).get(RESULT_FROM_TESTRUN):
            return self.reuse()
        if self.phase in ENDED_PHASES:
            reopened = (not self.spec.get("cancel") and self.status.get("result") not in ("blocked", "cancelled")
                        and self.asked() > max(self.started, self.ended_runs()))
            if not reopened:
                return self.delete_every_pod()
            self.phase = ""  # running again: the next phase is written and announced
            self.reopened = True  # its builds passed before (and may be gone by now)
            self.set("result", None)
            self.set("completionTime", None)
            self.event("Normal", "RunsAdded", f"spec.runs raised to {self.asked()}: "
                       f"{self.asked() - max(self.started, self.ended_runs())} more runs")
        if self.spec.get("cancel"):
            return self.cancel()
        if self.phase in ("", "Pending", "Blocked") and not self.reopened and not self.dependencies_passed():
            return  # once placed, what the builds do no longer matters
        if self.phase in ("", "Pending", "Blocked") or self.reopened:
            # Where its runs' queue wait starts (the metric): a new TestRun that waited for no
            # build could run from its creation, even if its first write comes with its pods.
            created = self.metadata.get("creationTimestamp")
            new = not self.phase and not self.reopened and new_and_unblocked(self.spec, self.status)
            self.set("runnableSince", created if new and created else self.stamp)
        pool = self.placement()
        if pool is not None and self.observed.admitted_pool not in (None, pool):
            self.admitted = 0  # admitted for another pool's room: counted again where it is now
        if pool is None or self.leave_to_admission(pool):
            return
        self.run_runs()

    def asked(self) -> int:
        return int(self.spec.get("runs") or 1)

    def ended_runs(self) -> int:
        return self.counts["passed"] + self.counts["failed"] + self.counts["errored"]

    # -- before any run ------------------------------------------------------------------------

    def leave_to_admission(self, pool: str) -> bool:
        """A new TestRun that waits for nothing is admission's at first (queued_demand counts
        it): the next round usually starts it, and its first write is then Running. Writing
        Queued first would cost a write, its watch event, an Event and a round trip before the
        first pod, for every TestRun of a commit. It says Queued once a round found no room
        for it (`admission_declined`), or `admission_wait_seconds` after its creation."""
        if (self.phase or self.admitted or self.observed.admission_declined or self.observed.pods
                or not new_and_unblocked(self.spec, self.status)):
            return False  # (pods of its own: an admitted decision's status write was lost; adopted now)
        created = self.metadata.get("creationTimestamp")
        until = (parse_time(created) if created else self.now) + self.settings.admission_wait_seconds
        if self.now >= until:
            return False
        self.patch, self.actions = {}, []
        self.awaits_admission = pool
        self.wake_at(until)
        return True

    def reuse(self) -> None:
        runs = self.asked()
        commit = self.metadata["annotations"].get(RESULT_FROM_COMMIT, "")
        origin = self.metadata["annotations"][RESULT_FROM_TESTRUN]
        self.patch.update({
            "phase": "Succeeded", "result": "passed", "startTime": self.stamp, "completionTime": self.stamp,
            "resultFrom": {"commit": commit, "testRun": origin}, "startedRuns": runs,
            "runCounts": {**_zero_counts(runs), "passed": runs}, "runsSummary": f"{runs}/{runs}",
            "message": f"passed before with the same content, on commit {commit[:12]} ({origin}): not run again",
        })

    def cancel(self) -> None:
        self.delete_every_pod()
        self.counts["running"] = self.counts["queued"] = 0
        message = "cancelled: no tested branch contains its commit any more" if not self.phase else "cancelled"
        self.patch.update({"phase": "Cancelled", "result": "cancelled", "completionTime": self.stamp,
                           "runCounts": self.counts_status(), "message": message})
        if self.active:
            self.patch["active"] = None
        self.event("Normal", "Cancelled", message)

    def delete_every_pod(self) -> None:
        for pod in self.observed.pods:
            self.delete_attempt(pod.run, pod.attempt)
        self.active_after = {}

    def delete_stray_secrets(self) -> None:
        """A Secret belongs to the attempt a run is on. Others (a crash lost their delete, or
        came between a Secret's create and its pod's) go, except those this decision creates."""
        if not self.observed.secrets:
            return
        current = {(run, entry["attempt"]) for run, entry in
                   (self.active_after if self.active_after is not None else self.active).items()}
        created = {(a.run, a.attempt) for a in self.actions if isinstance(a, CreateSecret)}
        deleted = {(a.run, a.attempt) for a in self.actions if isinstance(a, DeleteSecret)}
        for key in self.observed.secrets:
            if key not in current and key not in created and key not in deleted:
                self.actions.append(DeleteSecret(*key))

    def dependencies_passed(self) -> bool:
        waiting, failed, cancelled = [], [], []
        for build in self.spec.get("dependsOn") or []:
            phase, result = self.observed.builds.get(build, ("", ""))
            if phase not in ENDED_PHASES:
                waiting.append(build)
            elif build_verdict(result or "error") is None:
                cancelled.append(build)
            elif build_verdict(result or "error") == "failed":
                failed.append(build)
        if failed or cancelled:
            result, message = ("blocked", blocked_reason(failed)) if failed else (
                "cancelled", "needs build " + ", ".join(cancelled) + ", which was cancelled")
            self.counts["queued"] = 0
            self.patch.update({"phase": PHASE_OF_RESULT[result], "result": result, "completionTime": self.stamp,
                               "runCounts": self.counts_status(), "message": message})
            self.event("Warning" if failed else "Normal", "Blocked" if failed else "Cancelled", message)
            return False
        if waiting:
            missing = [b for b in waiting if b not in self.observed.builds]
            message = "waiting for build " + ", ".join(waiting) + " to succeed" + (
                f" ({', '.join(missing)} not found yet)" if missing else "")
            self.enter("Blocked", message, "Blocked")
            return False
        return True

    def placement(self) -> str | None:
        pool = self.status.get("workerPool")
        if pool:
            return None if self.ec2_cannot_hold(pool) else pool
        names = {p["metadata"]["name"] for p in self.observed.pools}
        named = self.spec.get("workerPool") or ""
        pool = pool_for(self.definition, named, list(self.observed.pools))
        if pool is None and not named:
            from testlooper.decisions.ec2 import unschedulable_on_ec2

            why = unschedulable_on_ec2(self.definition, list(self.observed.pools))
            if why is not None:
                return self.unschedulable(why)
        if pool is None or pool not in names:
            if named:
                message = f"WorkerPool {named} does not exist"
            else:
                message = (f"no WorkerPool takes it: it needs platform {self.definition.get('platform') or 'linux'}, "
                           f"{self.definition.get('min_cores') or 0} cores and {self.definition.get('min_ram_gb') or 0} GB "
                           "per pod")
            self.enter("Queued", message, "NoWorkerPool", "Warning")
            return None
        if self.ec2_cannot_hold(pool):
            return None
        self.set("workerPool", pool)
        conditions = self.status.get("conditions") or []
        if any(c.get("type") == UNSCHEDULABLE for c in conditions):  # a pool takes it now (runs raised after an edit)
            self.patch["conditions"] = [c for c in conditions if c.get("type") != UNSCHEDULABLE]
        return pool

    def ec2_cannot_hold(self, name: str) -> bool:
        """When the EC2 pool it is in (or names) has no type that holds its task (named so, or
        the types edited since), it ends Unschedulable, once no run of it is on an instance."""
        from testlooper.decisions.ec2 import demand_for, is_ec2, unschedulable

        pool = next((p for p in self.observed.pools if p["metadata"]["name"] == name), None)
        if not is_ec2(pool) or self.active:
            return False
        refusal = unschedulable(pool, demand_for("", self.definition))
        if refusal is None:
            return False
        self.unschedulable(refusal.message)
        return True

    def unschedulable(self, why: str) -> None:
        """No instance type of the EC2 pools of its platform holds it: it ends now, an error,
        rather than wait for room that will never come."""
        runs = self.asked()
        message = f"unschedulable: {why}"
        self.counts["errored"] += max(0, runs - self.ended_runs())
        self.counts["queued"] = self.counts["running"] = 0
        conditions = [c for c in self.status.get("conditions") or [] if c.get("type") != UNSCHEDULABLE]
        conditions.append({"type": UNSCHEDULABLE, "status": "True", "reason": "NoInstanceType",
                           "message": why[:1000], "lastTransitionTime": self.stamp})
        self.patch.update({"phase": "Error", "result": "error", "message": message[:1000], "completionTime": self.stamp,
                           "startedRuns": max(runs, self.started), "runCounts": self.counts_status(),
                           "runsSummary": f"{self.counts['passed']}/{runs}", "conditions": conditions})
        self.event("Warning", "Unschedulable", message)

    # -- the runs ----------------------------------------------------------------------------

    def run_runs(self) -> None:
        self.reconcile_pods()
        total = max(self.asked(), self.started)
        for run in list(self.active):
            entry = self.active[run]
            if entry.get("state") == PLACED:
                self.watch_placed(run, entry)
            elif entry.get("notBefore"):
                self.wake_at(parse_time(entry["notBefore"]))
        self.place(total)
        placed = sum(1 for entry in self.active.values() if entry.get("state") == PLACED)
        self.counts["running"] = placed
        self.counts["queued"] = len(self.active) - placed + (total - self.started)
        self.write_runs(total)

    def reconcile_pods(self) -> None:
        """Pods against the status: adopt what a lost status write created, delete what an ended
        run or an old attempt left."""
        adopted: dict[int, int] = {}
        for pod in sorted(self.observed.pods, key=lambda p: (p.run, -p.attempt)):  # the newest attempt first
            entry = self.active.get(pod.run)
            if entry is None:
                if pod.run > self.started and not pod.deleting:
                    adopted[pod.run] = max(adopted.get(pod.run, 0), pod.attempt)
                else:
                    self.delete_attempt(pod.run, pod.attempt)
            elif pod.attempt < entry["attempt"]:
                self.delete_attempt(pod.run, pod.attempt)
            elif pod.attempt > entry["attempt"] or entry.get("state") != PLACED:
                lost = pod.attempt - entry["attempt"]  # retries decided and created, never recorded
                self.update(pod.run, {**entry, "attempt": pod.attempt, "state": PLACED, "since": self.stamp,
                                      "notBefore": None,
                                      "infraFailures": int(entry.get("infraFailures") or 0) + lost})
        if adopted:
            newest = max(adopted)
            for run in range(self.started + 1, newest + 1):
                if run in adopted:
                    self.update(run, {"attempt": adopted[run], "state": PLACED, "since": self.stamp,
                                      "infraFailures": adopted[run] - 1})
                else:  # its create failed before the others': it simply waits
                    self.update(run, {"attempt": 1, "state": WAITING, "since": self.stamp})
            self.started = newest

    def watch_placed(self, run: int, entry: dict) -> None:
        if not self.observed.reports_known:
            return self.wake_at(self.now + REPORTS_UNKNOWN_RETRY_SECONDS)
        attempt = entry["attempt"]
        result = self.observed.results.get((run, attempt))
        if result is not None:
            if result.result == "cancelled":  # no one asked: the agent was stopped under it
                return self.infra_failure(run, entry, "Interrupted", result.error or "its agent was stopped")
            return self.verdict(run, entry, result)
        if not self.observed.workers_known:
            return self.wake_at(self.now + REPORTS_UNKNOWN_RETRY_SECONDS)
        pod = self.pod_of(run, attempt)
        self.check_pod(run, entry, pod)

    def check_pod(self, run: int, entry: dict, pod: PodObservation | None) -> None:
        settings, now = self.settings, self.now
        on_instance = self.observed.worker == "instance"
        if pod is None:
            since = parse_time(entry["since"])
            if now - since < settings.missing_pod_grace_seconds:
                return self.wake_at(since + settings.missing_pod_grace_seconds)
            if on_instance:
                return self.infra_failure(run, entry, "InstanceLost",
                                          "its EC2 instance disappeared before its agent reported a result")
            return self.infra_failure(run, entry, "PodDeleted", "its pod disappeared before its agent reported a result")
        if pod.lost_reason:
            return self.infra_failure(run, entry, pod.lost_reason, pod.message or pod.lost_reason)
        if on_instance and pod.phase in ("Succeeded", "Failed"):
            # Shutting down or gone without our asking: its RESULT may still be on its way.
            finished = pod.finished if pod.finished is not None else now
            if now - finished < settings.result_grace_seconds:
                return self.wake_at(finished + settings.result_grace_seconds)
            return self.infra_failure(run, entry, "InstanceLost", f"{pod.message} without a result from its agent")
        if pod.phase in ("Succeeded", "Failed"):
            if pod.reason == "Evicted" or pod.disruption.startswith("Eviction"):
                return self.infra_failure(run, entry, "Evicted", pod.message or "the pod was evicted")
            if pod.disruption.startswith("Preemption"):
                return self.infra_failure(run, entry, "Evicted", pod.message or "the pod was preempted")
            if pod.reason in NODE_LOST_REASONS or pod.disruption:
                return self.infra_failure(run, entry, "NodeLost", pod.message or pod.disruption or pod.reason)
            if pod.reason == "DeadlineExceeded":  # the pod's activeDeadlineSeconds: the task hung
                return self.verdict(run, entry, RunResult(
                    "error", "the pod ran past its deadline (the task's timeout and a margin) without reporting a result"))
            finished = pod.finished if pod.finished is not None else now
            if now - finished < settings.result_grace_seconds:
                return self.wake_at(finished + settings.result_grace_seconds)
            codes = ", ".join(f"{name}={code}" for name, code in pod.exit_codes)
            return self.infra_failure(run, entry, "NoResult", f"the pod ended {pod.phase}"
                                      + (f" (exit codes {codes})" if codes else "") + " without a result from its agent")
        if pod.phase == "Unknown" or pod.reason in NODE_LOST_REASONS:
            return self.infra_failure(run, entry, "NodeLost", pod.message or "the pod's node stopped reporting")
        if pod.deleting and pod.phase != "Running":
            return  # it ends (then is gone, a PodDeleted) or its agent still reports
        if pod.phase == "Pending":
            if pod.waiting_reason in IMAGE_PULL_REASONS or pod.waiting_reason in CANNOT_START_REASONS:
                since = pod.waiting_since if pod.waiting_since is not None else pod.created
                if now - since < settings.image_pull_grace_seconds:
                    return self.wake_at(since + settings.image_pull_grace_seconds)
                reason = "ImagePullBackOff" if pod.waiting_reason in IMAGE_PULL_REASONS else "ContainerCannotStart"
                return self.infra_failure(run, entry, reason, f"{pod.waiting_reason}: {pod.waiting_message}".rstrip(": "))
            if pod.started is not None:
                return  # its init containers run: the pod's own deadline bounds them
            if now - pod.created < settings.pending_timeout_seconds:
                return self.wake_at(pod.created + settings.pending_timeout_seconds)
            why = pod.unschedulable or pod.message or "not scheduled"
            self.event("Warning", "PendingTimeout", f"run {run} attempt {entry['attempt']}: pending for more than "
                       f"{settings.pending_timeout_seconds:.0f} s: {why}")
            return self.verdict(run, entry, RunResult(
                "error", f"its pod was pending for more than {settings.pending_timeout_seconds:.0f} s: {why}"))
        # Running: its agent must be heard from, counting the operator's own downtime as heard.
        beat = self.observed.heartbeats.get((run, entry["attempt"]))
        if beat is None and self.observed.boot_grace_seconds is not None:
            # An instance boots first: its agent's first heartbeat may take minutes.
            reference = max(pod.created, self.observed.operator_started)
            if now - reference > self.observed.boot_grace_seconds:
                return self.infra_failure(run, entry, "BootTimedOut",
                                          f"{pod.message or 'its instance'}: no heartbeat from its agent "
                                          f"{now - pod.created:.0f} s after launch")
            return self.wake_at(reference + self.observed.boot_grace_seconds)
        reference = max(beat or 0.0, pod.running_since or pod.started or pod.created, self.observed.operator_started)
        if now - reference > settings.heartbeat_grace_seconds:
            return self.infra_failure(run, entry, "HeartbeatLost",
                                      f"no heartbeat from its agent for {now - reference:.0f} s")
        self.wake_at(reference + settings.heartbeat_grace_seconds)

    def verdict(self, run: int, entry: dict, result: RunResult) -> None:
        attempt = entry["attempt"]
        judged = attempt - int(entry.get("infraFailures") or 0)  # attempts that reached a verdict
        wait = retry_wait(self.definition, self.kind, judged, result.result)
        self.delete_attempt(run, attempt)
        if wait is not None:
            message = f"{result.result}" + (f": {result.error}" if result.error else "")
            self.record(run, attempt, "BuildRetried", message, retried=True, infra=False)
            self.update(run, {**entry, "attempt": attempt + 1, "state": WAITING, "since": self.stamp,
                              "notBefore": format_time(math.ceil(self.now + wait))})  # whole seconds: never early
            self.wake_at(math.ceil(self.now + wait))
            return
        self.end_run(run, result)

    def infra_failure(self, run: int, entry: dict, reason: str, message: str) -> None:
        attempt = entry["attempt"]
        failures = int(entry.get("infraFailures") or 0) + 1
        self.delete_attempt(run, attempt)
        if failures > self.settings.max_infra_retries:
            self.record(run, attempt, reason, message, retried=False, infra=True)
            self.event("Warning", "RunError", f"run {run}: {reason}: {message}; "
                       f"given up after {failures} attempts lost to the infrastructure")
            return self.end_run(run, RunResult("error", f"{reason}: {message}"))
        self.record(run, attempt, reason, message, retried=True, infra=True)
        self.event("Warning", reason, f"run {run} attempt {attempt}: {message}; retrying as attempt {attempt + 1}")
        self.update(run, {**entry, "attempt": attempt + 1, "state": WAITING, "since": self.stamp,
                          "notBefore": None, "infraFailures": failures})

    def end_run(self, run: int, result: RunResult) -> None:
        outcome = result.result
        if outcome == "passed":
            self.counts["passed"] += 1
        elif outcome in ("failed", "timeout"):
            self.counts["failed"] += 1
            self.counts["timedOut"] += outcome == "timeout"
        else:
            self.counts["errored"] += 1
        for name in result.failed_cases:
            if len(self.failing) >= MAX_FAILING_CASES:
                break
            if name not in self.failing:
                self.failing.append(name)
                self.failing_changed = True
        self.update(run, None)

    def place(self, total: int) -> None:
        placed = sum(1 for entry in self.active.values() if entry.get("state") == PLACED)
        room = min(self.admitted, self.settings.max_active_runs - placed)
        if room <= 0:
            return
        for run in sorted(self.active):
            if room <= 0:
                return
            entry = self.active[run]
            if entry.get("state") == WAITING and _due(entry, self.now):
                self.create_attempt(run, {**entry, "state": PLACED, "since": self.stamp, "notBefore": None})
                room -= 1
        while room > 0 and self.started < total and len(self.active) < self.settings.max_active_runs:
            self.started += 1
            self.create_attempt(self.started, {"attempt": 1, "state": PLACED, "since": self.stamp})
            room -= 1

    def create_attempt(self, run: int, entry: dict) -> None:
        self.actions.append(CreateSecret(run, entry["attempt"]))
        self.actions.append(CreatePod(run, entry["attempt"]))
        self.update(run, entry)

    def write_runs(self, total: int) -> None:
        if self.active_changes:
            self.patch["active"] = {key: (None if value is None else _clean(value))
                                    for key, value in self.active_changes.items()}
        self.set("startedRuns", self.started)
        if self.new_attempts:
            self.set("attempts", ((self.status.get("attempts") or []) + self.new_attempts)[-MAX_RECORDED_ATTEMPTS:])
            self.set("infraRetries", self.infra_retries)
        if self.failing_changed:
            self.set("failingCases", self.failing)
        if self.observed.cases is not None:
            cases = {key: int(self.observed.cases.get(key) or 0) for key in ("total", "passed", "failed")}
            self.set("cases", cases)
            self.set("casesSummary", f"{cases['passed']}/{cases['total']}")
        self.set("runCounts", self.counts_status(total))
        self.set("runsSummary", f"{self.counts['passed']}/{total}")
        if self.started and not self.status.get("startTime"):
            self.set("startTime", self.stamp)
        if self.started >= total and not self.active:
            result = task_result_of_counts({"passed": self.counts["passed"],
                                            "failed": self.counts["failed"] - self.counts["timedOut"],
                                            "timeout": self.counts["timedOut"], "error": self.counts["errored"]})
            if "active" in self.status or self.active_changes:
                self.patch["active"] = None
            self.set("result", result)
            self.set("completionTime", self.stamp)
            self.enter(PHASE_OF_RESULT[result], f"{result}: {self.counts['passed']}/{total} runs passed",
                       "Ended", "Normal" if result == "passed" else "Warning")
        elif self.started:
            self.enter("Running", f"{self.counts['running']} running, {self.counts['queued']} queued, "
                       f"{self.ended_runs()}/{total} ended", "Running")
        else:
            pool = self.status.get("workerPool") or self.patch.get("workerPool")
            known = {p["metadata"]["name"] for p in self.observed.pools}
            message = (f"WorkerPool {pool} does not exist any more" if self.observed.pools and pool not in known
                       else f"waiting for room in WorkerPool {pool}")
            self.enter("Queued", message, "Queued")

    # -- helpers -----------------------------------------------------------------------------

    def pod_of(self, run: int, attempt: int) -> PodObservation | None:
        if not hasattr(self, "_pods"):
            self._pods = {(pod.run, pod.attempt): pod for pod in self.observed.pods}
        return self._pods.get((run, attempt))

    def delete_attempt(self, run: int, attempt: int) -> None:
        pod = self.pod_of(run, attempt)
        if pod is None or not pod.deleting:
            self.actions.append(DeletePod(run, attempt))
        self.actions.append(DeleteSecret(run, attempt))

    def update(self, run: int, entry: dict | None) -> None:
        if entry is None:
            self.active.pop(run, None)
        else:
            self.active[run] = entry
        self.active_changes[str(run)] = entry

    def record(self, run: int, attempt: int, reason: str, message: str, retried: bool, infra: bool) -> None:
        self.actions.append(RecordAttempt(run, attempt, reason, message, retried, infra))
        self.new_attempts.append({"run": run, "attempt": attempt, "reason": reason, "message": message[:300],
                                  "time": self.stamp})
        if retried and infra:
            self.infra_retries += 1

    def counts_status(self, total: int | None = None) -> dict:
        total = max(self.asked(), self.started) if total is None else total
        return {"total": total, **self.counts}

    def enter(self, phase: str, message: str, event_reason: str, event_type: str = "Normal") -> None:
        """Move to `phase` (an Event on the transition only) and say why."""
        if phase != self.phase:
            self.patch["phase"] = phase
            self.event(event_type, event_reason, message)
        self.set("message", message)
        if phase in ("Blocked", "Queued") and "runCounts" not in self.patch:
            total = max(self.asked(), self.started)
            self.set("runCounts", {**self.counts_status(total), "queued": total - self.started + len(self.active)})
            self.set("runsSummary", f"{self.counts['passed']}/{total}")

    def set(self, key: str, value) -> None:
        if self.status.get(key) != value:
            self.patch[key] = value

    def event(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def wake_at(self, when: float) -> None:
        delay = max(0.0, when - self.now)
        if self.wake_after is None or delay < self.wake_after:
            self.wake_after = delay


def _due(entry: dict, now: float) -> bool:
    return not entry.get("notBefore") or parse_time(entry["notBefore"]) <= now


def _clean(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if value is not None}


def _zero_counts(runs: int) -> dict:
    return {"total": runs, "passed": 0, "failed": 0, "running": 0, "queued": 0, "errored": 0, "timedOut": 0}


# -- what the pool's admission loop needs -------------------------------------------------------

def new_and_unblocked(spec: dict, status: dict, annotations: Mapping | None = None) -> bool:
    """Never decided on, not cancelled, and waiting for no build: its runs may start at once."""
    return (not status.get("phase") and not spec.get("cancel") and not spec.get("dependsOn")
            and not (annotations or {}).get(RESULT_FROM_TESTRUN))


def queued_demand(testrun: dict, now: float, settings: Settings = Settings(), pools: Sequence[dict] | None = None):
    """How many runs of this TestRun could start now (waiting retries that are due, then runs
    not started yet, within the cap on active runs), from its status alone; None when none can
    (not placed in a pool, blocked, ended, cancelled). With the namespace's `pools`, a new
    TestRun that waits for nothing counts too, in the pool it would be placed in."""
    from testlooper.decisions.pools import Demand

    spec = testrun.get("spec") or {}
    status = testrun.get("status") or {}
    metadata = testrun.get("metadata") or {}
    pool = status.get("workerPool")
    if pools is not None and not pool and new_and_unblocked(spec, status, metadata.get("annotations")):
        pool = pool_for(spec.get("definition") or {}, spec.get("workerPool") or "", list(pools))
        if pool is None or all(p["metadata"]["name"] != pool for p in pools):
            return None
        status = {"phase": "Queued", "workerPool": pool}
    if not pool or spec.get("cancel") or status.get("phase") not in ("Queued", "Running"):
        return None
    active = status.get("active") or {}
    started = int(status.get("startedRuns") or 0)
    placed = sum(1 for entry in active.values() if entry.get("state") == PLACED)
    due = sum(1 for entry in active.values() if entry.get("state") == WAITING and _due(entry, now))
    unstarted = max(0, int(spec.get("runs") or 1) - started)
    count = min(due + min(unstarted, settings.max_active_runs - len(active)), settings.max_active_runs - placed)
    if count <= 0:
        return None
    definition = spec.get("definition") or {}
    return Demand(testrun=(metadata.get("namespace", ""), metadata.get("name", "")), pool=pool,
                  priority=int(spec.get("priority") or 0), created=metadata.get("creationTimestamp", ""),
                  cores=float(definition.get("min_cores") or 0), ram_gb=float(definition.get("min_ram_gb") or 0),
                  count=count)


# -- reading pods and time ----------------------------------------------------------------------

RUN_INDEX_LABEL = "testlooper.dev/run-index"
ATTEMPT_LABEL = "testlooper.dev/attempt"


def observe_pod(pod: dict) -> PodObservation | None:
    """What the machine needs of one Pod as the API returns it (None: not a run's pod)."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    try:
        run, attempt = int(labels[RUN_INDEX_LABEL]), int(labels[ATTEMPT_LABEL])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    disruption = conditions.get("DisruptionTarget") or {}
    waiting_reason = waiting_message = ""
    exit_codes = []
    finished = running_since = None
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = container.get("state") or {}
        if "waiting" in state and not waiting_reason:
            reason = state["waiting"].get("reason") or ""
            if reason in IMAGE_PULL_REASONS or reason in CANNOT_START_REASONS:
                waiting_reason, waiting_message = reason, state["waiting"].get("message") or ""
        if "running" in state and state["running"].get("startedAt"):
            running_since = max(running_since or 0.0, parse_time(state["running"]["startedAt"]))
        if "terminated" in state:
            terminated = state["terminated"]
            exit_codes.append((container.get("name", ""), int(terminated.get("exitCode") or 0)))
            if terminated.get("finishedAt"):
                finished = max(finished or 0.0, parse_time(terminated["finishedAt"]))
    return PodObservation(
        run=run, attempt=attempt, phase=status.get("phase") or "Pending",
        created=parse_time(metadata.get("creationTimestamp")) if metadata.get("creationTimestamp") else 0.0,
        started=parse_time(status["startTime"]) if status.get("startTime") else None,
        running_since=running_since, finished=finished, reason=status.get("reason") or "", message=status.get("message") or "",
        waiting_reason=waiting_reason, waiting_message=waiting_message,
        waiting_since=(parse_time(scheduled["lastTransitionTime"])
                       if scheduled.get("status") == "True" and scheduled.get("lastTransitionTime") else None),
        unschedulable=scheduled.get("message") or "" if scheduled.get("status") == "False" else "",
        disruption=(disruption.get("reason") or "DisruptionTarget") if disruption.get("status") == "True" else "",
        exit_codes=tuple(exit_codes), deleting=bool(metadata.get("deletionTimestamp")),
    )


def observe_result(result: dict) -> RunResult:
    """A RESULT as the worker API kept it (docs/design.md) -> what the machine counts: the
    result, the error line, and the failing case names in the order reported (at most the 20
    the status can hold; a name reported twice once)."""
    failed: list[str] = []
    for case in result.get("cases") or []:
        if isinstance(case, dict) and not case.get("success") and case.get("name") not in failed:
            failed.append(str(case.get("name")))
            if len(failed) >= MAX_FAILING_CASES:
                break
    return RunResult(str(result.get("result") or "error"), str(result.get("error") or "")[:300], tuple(failed))


def observe_secret(secret: dict) -> tuple[int, int] | None:
    """(run, attempt) of one of the TestRun's token Secrets (the same labels as its pod)."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    try:
        return int(labels[RUN_INDEX_LABEL]), int(labels[ATTEMPT_LABEL])
    except (KeyError, ValueError):
        return None


def format_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def merged(status: dict, patch: dict | None) -> dict:
    """`status` after the JSON merge patch `patch` (RFC 7386), as the API server applies it:
    what the shell keeps as the status it wrote last, and what the tests persist."""
    if not patch:
        return status
    result = dict(status)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = _without_nulls(value)
    return result


def _without_nulls(value):
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    return value
