"""Running a TestRun's runs as pods: the phase machine (decisions/phases.py) applied through
kube/api.py, one admission loop per namespace, and the worker API's view of the runs.

Enabled when the operator has a history store (`--store`, whose Redis also keeps the worker
API's heartbeats, results and log streams) and an `--api-url` its pods reach it at; without
them the TestRun handler writes only the part-1 statuses.

- `reconcile(namespace, name, admitted)` reads the TestRun as stored now, gathers the
  observations (builds, pools, its pods and token Secrets, the RESULTs and heartbeats the worker
  API kept for its active runs, the store's case tally), calls `decide`, and applies the
  decision in the documented order: creates, then the status patch, then deletes. The decisions
  of one TestRun run one at a time (a lock per TestRun).
- Events (the TestRun's, its pods', a RESULT posted) call it with `admitted = 0`, which never
  creates a pod. Only the namespace's admission loop passes `admitted > 0`: each round recounts
  what the pools' pods hold, asks `admit`, and reconciles the TestRuns it let start, one after
  the other; rounds never overlap, so no two spend the same room.
- `TestRunDirectory` is the worker API's `RunDirectory`: a run id names a TestRun, and what the
  run is (its task, commit, mirror, inputs) is read from that TestRun.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import logging
import os
import secrets as random_secrets
import subprocess
import time

from testlooper.cluster import run_metrics
from testlooper.cluster.context import EVENT_COMPONENT
from testlooper.cluster.ec2_workers import Ec2Workers
from testlooper.cluster.pins import pinned_source
from testlooper.cluster.pool_handlers import count_pool_usage
from testlooper.decisions import ec2 as ec2_placement
from testlooper.decisions import phases
from testlooper.decisions.pools import POOL_LABEL, admit, counting_view, pool_for
from testlooper.decisions.repo import ENDED_PHASES
from testlooper.ec2.fleet import Ec2Error
from testlooper.kube import pods as pod_builder
from testlooper.kube.models import SpecError, parse_workerpool_spec
from testlooper.kube.objects import MANAGED_BY, MANAGED_BY_LABEL, label_value, testrun_name
from testlooper.cluster.store_health import recorded_conditions
from testlooper.cluster.watch_cache import RunObjects, TestRunCache
from testlooper.kube.api import Conflict
from testlooper.store.base import StoreError
from testlooper.workerapi import tokens
from testlooper.workerapi.contract import ApiError
from testlooper.workerapi.cluster import ClusterRun, InputSource, parse_run_id

logger = logging.getLogger(__name__)

OPERATOR_SECRET_NAME = "testlooper-operator"
OPERATOR_SECRET_KEY = "secret"
ADMISSION_INTERVAL_SECONDS = 2.0  # a round at least this often, sooner when woken
DECISION_CONCURRENCY = 32
DECIDE_DELAY_SECONDS = 0.1  # events for one TestRun within this make one decision
POOLS_TTL_SECONDS = 1.0  # a decision reuses the namespace's WorkerPools read this recently
ADMITTED_CONCURRENCY = 16  # admitted TestRuns whose pods one round creates at once
RUN_OBJECTS_LISTING_SECONDS = 10.0  # the run pods and Secrets kept in memory are listed whole this often
WATCH_RELIST_PAUSE_SECONDS = 0.5  # after a watch the server ended with an ERROR (410 Gone), before listing again
UNREAD_MESSAGE_SECONDS = 30.0  # a commit message git could not give is asked for again after this
DESCRIBE_TTL_SECONDS = 2.0  # a run's description is read again after this (heartbeats come every few s)


async def ensure_operator_secret(api, namespace: str) -> bytes:
    """The operator secret (the key tokens are derived from), kept in the Secret
    `testlooper-operator` of `namespace`: read, or created with 32 random bytes by the first
    replica. A replica that loses the race to create it reads the winner's."""
    for _ in range(2):
        secret = await api.read_secret(namespace, OPERATOR_SECRET_NAME)
        if secret is not None and secret["data"].get(OPERATOR_SECRET_KEY):
            return base64.b64decode(secret["data"][OPERATOR_SECRET_KEY])
        if secret is not None:
            raise RuntimeError(f"Secret {namespace}/{OPERATOR_SECRET_NAME} has no key {OPERATOR_SECRET_KEY!r}")
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": OPERATOR_SECRET_NAME, "namespace": namespace,
                             "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                "data": {OPERATOR_SECRET_KEY: base64.b64encode(random_secrets.token_bytes(32)).decode()}}
        if await api.create_core("secrets", namespace, body):
            return base64.b64decode(body["data"][OPERATOR_SECRET_KEY])
    raise RuntimeError(f"Secret {namespace}/{OPERATOR_SECRET_NAME} could not be read or created")


def repo_id(namespace: str, repo: str) -> str:
    return f"{namespace}/{repo}"  # as repo_handlers records branch lines


class TestRunDirectory:
    """What each run id is, read from its TestRun. Kept a moment (an agent calls every few s),
    and forgotten as soon as the TestRun changes (`forget`), so that a cancel, or a run moved on
    to another attempt, reaches the agent at its next heartbeat."""

    def __init__(self, context):
        self.context = context
        self._cache: dict[str, tuple[float, ClusterRun | None]] = {}  # run id -> (read at, what it is)
        self._changed: dict[tuple[str, str], float] = {}  # (namespace, TestRun) -> when it last changed
        self._fingerprints: dict[tuple[str, str], tuple] = {}  # (namespace, TestRun) -> what describe depends on
        self._messages: dict[tuple[str, str], tuple[str, float]] = {}  # (mirror, commit) -> (its message, read at)

    async def describe(self, run_id: str) -> ClusterRun | None:
        changed = self._changed.get(_testrun_of(run_id), 0.0)
        cached = self._cache.get(run_id)
        if cached is not None and cached[0] > changed and time.monotonic() - cached[0] < DESCRIBE_TTL_SECONDS:
            return cached[1]
        read_at = time.monotonic()
        run = await self._describe(run_id)
        if len(self._cache) > 10000:
            self._cache.clear()
        if len(self._changed) > 10000:
            self._changed.clear()
            self._cache.clear()  # what was forgotten must not come back
        self._cache[run_id] = (read_at, run)  # a read begun before a change is older than it: not used
        return run

    def forget(self, namespace: str, name: str) -> None:
        """The TestRun changed: its runs are read again at their next call."""
        self._changed[(namespace, name)] = time.monotonic()

    def testrun_seen(self, testrun: dict) -> None:
        """A TestRun's event: its runs are forgotten when what a description tells an agent
        changed (spec.cancel, or the attempt a run is on), not at every status write."""
        metadata = testrun.get("metadata") or {}
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        active = (testrun.get("status") or {}).get("active") or {}
        fingerprint = (bool((testrun.get("spec") or {}).get("cancel")),
                       tuple(sorted((str(index), (entry or {}).get("attempt")) for index, entry in active.items())))
        if self._fingerprints.get(key) != fingerprint:
            if len(self._fingerprints) > 10000:
                self._fingerprints.clear()
            self._fingerprints[key] = fingerprint
            self.forget(*key)

    async def _describe(self, run_id: str) -> ClusterRun | None:
        try:
            namespace, name, index, attempt = parse_run_id(run_id)
        except ValueError:
            return None
        # The watch's copy when it is current (cluster/watch_cache.py); a cancel or a new
        # attempt reaches the agent all the same, since `testrun_seen` forgets what changed.
        runs = self.context.runs
        testrun = runs.testruns.get(namespace, name) if runs is not None else None
        if testrun is None:
            testrun = await self.context.api.get_object("testruns", namespace, name)
        if testrun is None:
            return None
        spec = testrun.get("spec") or {}
        status = testrun.get("status") or {}
        definition = spec.get("definition") or {}
        repo_uid = next((owner.get("uid") for owner in testrun["metadata"].get("ownerReferences") or []
                         if owner.get("kind") == "Repo"), "")
        git_dir = self.context.mirror_path(namespace, spec.get("repo", ""), repo_uid)
        commit = spec.get("commit", "")
        # Another repository's build runs on its pinned commit (cluster/pins.py).
        source = await pinned_source(self.context, namespace, repo_uid, definition, definition["repo"]) \
            if definition.get("repo", "HEAD") != "HEAD" else None
        tree_dir, tree_commit = (source.git_dir, source.commit) if source and source.commit else (git_dir, commit)
        inputs = {}
        for key, dependency in (definition.get("dependencies") or {}).items():
            if dependency.get("repo", "HEAD") != "HEAD" and dependency.get("kind") == "source":
                inputs[key] = await pinned_source(self.context, namespace, repo_uid, definition, dependency["repo"],
                                                  dependency.get("path") or "")
            elif dependency.get("kind") == "source":
                inputs[key] = InputSource("source", path=dependency.get("path") or "")
            else:
                inputs[key] = await self._build_input(namespace, spec, dependency)
        current = ((status.get("active") or {}).get(str(index)) or {}).get("attempt")
        known = self._messages.get((tree_dir, tree_commit))
        # A commit's message never changes: read once, not at each heartbeat. One that could not
        # be read (the mirror not there yet) is asked for again after a while, not at every call.
        if known is None or (not known[0] and time.monotonic() - known[1] > UNREAD_MESSAGE_SECONDS):
            message = await asyncio.to_thread(_commit_message, tree_dir, tree_commit)
            if len(self._messages) > 10000:
                self._messages.clear()
            self._messages[(tree_dir, tree_commit)] = (message, time.monotonic())
        else:
            message = known[0]
        assignment = {"task": definition, "commit": tree_commit, "commit_message": message, "run_index": index,
                      "attempt": attempt, "cores": float(definition.get("min_cores") or 1),
                      "ram_gb": float(definition.get("min_ram_gb") or 0)}
        return ClusterRun(run_id=run_id, assignment=assignment, git_dir=git_dir, commit=commit,
                          repo=repo_id(namespace, spec.get("repo", "")), task=spec.get("task", ""),
                          kind=spec.get("kind", "test"), run_index=index, attempt=attempt,
                          branch=spec.get("branch", ""), inputs=inputs,
                          cancel=bool(spec.get("cancel")) or (current is not None and current != attempt),
                          source=source)

    async def _build_input(self, namespace: str, spec: dict, dependency: dict) -> InputSource:
        """The artifact of the build's run that passed (the store says which attempt it was)."""
        from testlooper.planning.planner import build_key

        task = build_key(dependency.get("repo", "HEAD"), dependency["build"])
        build_testrun = testrun_name(spec.get("repo", ""), spec.get("commit", ""), task)
        try:
            records = await asyncio.to_thread(self.context.store.task_runs, repo_id(namespace, spec.get("repo", "")),
                                              spec.get("commit", ""), task)
        except StoreError as exc:  # the agent asks again
            self.context.store_health.failed("read_inputs", exc)
            raise ApiError(503, "the history store cannot say which build run to take the input from now") from None
        passed = [record for record in records if record.result == "passed"]
        if not passed:
            return InputSource("build", run_id="", artifact=dependency.get("artifact") or "")
        chosen = max(passed, key=lambda record: (record.run_index, record.attempt))
        return InputSource("build", run_id=pod_builder.run_id(namespace, build_testrun, chosen.run_index, chosen.attempt),
                           artifact=dependency.get("artifact") or "")


def _testrun_of(run_id: str) -> tuple[str, str]:
    namespace, _, rest = run_id.partition(".")
    return namespace, rest.partition(".")[0]


def _commit_message(git_dir: str, commit: str) -> str:
    try:
        done = subprocess.run(["git", "--git-dir", git_dir, "log", "-1", "--format=%B", commit],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


class PoolReader:
    """A namespace's WorkerPools as listed at most POOLS_TTL_SECONDS ago, one listing shared by
    the decisions made meanwhile. Admission always lists them afresh (it spends their room);
    a decision uses them to place a TestRun and shape its pods, where a second's delay in
    seeing a pool's change is no harm."""

    def __init__(self, api):
        self.api = api
        self._read: dict[str, tuple[float, asyncio.Future]] = {}

    async def read(self, namespace: str, fresh: bool = False, refused_too: bool = False) -> list[dict]:
        """The pools whose spec is accepted (those that take runs); with `refused_too`, all of them."""
        entry = self._read.get(namespace)
        now = time.monotonic()
        if fresh or entry is None or now - entry[0] > POOLS_TTL_SECONDS or (
                entry[1].done() and entry[1].exception() is not None):
            future = asyncio.ensure_future(self._listed(namespace))
            self._read[namespace] = entry = (now, future)
        accepted, every = await asyncio.shield(entry[1])
        return every if refused_too else accepted

    def forget(self, namespace: str) -> None:
        self._read.pop(namespace, None)

    def known(self, namespace: str) -> list[dict] | None:
        """The accepted pools of the last listing, if it is recent and done; else None."""
        entry = self._read.get(namespace)
        if entry is None or time.monotonic() - entry[0] > POOLS_TTL_SECONDS or not entry[1].done() \
                or entry[1].cancelled() or entry[1].exception() is not None:
            return None
        return entry[1].result()[0]

    async def _listed(self, namespace: str) -> tuple[list[dict], list[dict]]:
        every = await self.api.list_objects("workerpools", namespace)
        return accepted_pools(every), every


def accepted_pools(pools: list[dict]) -> list[dict]:
    """The WorkerPools whose spec the model admits: a refused one (a rule the CRD cannot say)
    takes no run, and says why in its condition Accepted (cluster/pool_handlers.py)."""
    accepted = []
    for pool in pools:
        try:
            parse_workerpool_spec(pool.get("spec") or {})
        except SpecError:
            continue
        accepted.append(pool)
    return accepted


class RunController:
    """Decides and applies the TestRuns' runs (see the module's docstring)."""

    def __init__(self, context, *, secret: bytes, backend, worker_image: str, directory=None):
        self.context = context
        self.directory = directory  # the worker API's TestRunDirectory, told when a TestRun changes
        self.api = context.api
        self.secret = secret
        self.backend = backend
        self.worker_image = worker_image
        self.started = time.time()
        self.settings = context.options.run_settings
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._queued: set[tuple[str, str]] = set()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._loops: dict[str, asyncio.Task] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        # Per namespace: the pools whose demand the last admission round could not all meet
        # (no room). Room freed wakes a round only when there are some; new demand only when
        # its pool is not among them (a round runs every ADMISSION_INTERVAL_SECONDS anyway).
        self._full: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pools = PoolReader(self.api)
        # The runs of pools with provider ec2.
        self.ec2 = Ec2Workers(context, secret, heartbeat_seconds=heartbeat_interval(self.settings))
        # The TestRuns as the watch brought them (cluster/watch_cache.py): what the decisions
        # that admission did not start read, instead of a GET each.
        self.testruns = TestRunCache()
        # Per namespace, its run pods and token Secrets (cluster/watch_cache.py `RunObjects`).
        self._run_objects: dict[str, RunObjects] = {}
        # Decisions made at once: 5,000 TestRuns appearing together wait their turn here rather
        # than all holding their reads in memory (and the API client's queue) at once.
        self._decisions = asyncio.Semaphore(DECISION_CONCURRENCY)
        # TestRun -> (resourceVersion written, pods created, pods deleted) of our last decision,
        # when deciding on its outcome does nothing.
        self._echoes: dict[tuple[str, str], tuple[str, frozenset, frozenset]] = {}
        self._maybe_echoes: dict[tuple[str, str], set[tuple[str, str]]] = {}  # events since the last decision
        self._must_decide: set[tuple[str, str]] = set()  # poked by something else (a pod, a RESULT, a timer)
        self._declined: set[tuple[str, str]] = set()  # new TestRuns an admission round found no room for
        # New TestRuns left to admission -> the timer of the decision at the end of their wait.
        self._fallbacks: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._pod_watches: list[asyncio.Task] = []  # `_watch_run_pods`
        # kopf's context (its Event poster lives there), taken from the first handler that
        # calls in: the worker API's requests (a RESULT posted) start decisions too.
        self._kopf_context: contextvars.Context | None = None

    def adopt_kopf_context(self) -> None:
        if self._kopf_context is None:
            self._kopf_context = contextvars.copy_context()

    def _start(self, coroutine) -> asyncio.Task:
        context = self._kopf_context.copy() if self._kopf_context is not None else None
        return asyncio.get_running_loop().create_task(coroutine, context=context)

    # -- scheduling ----------------------------------------------------------------------------

    def testrun_changed(self, testrun: dict, version: str | None = None) -> None:
        """A TestRun's event: what the worker API knows of its runs is read again when it
        changed (a cancel reaches the agent at its next heartbeat), and it is decided again
        (unless it is only our own last write coming back: `version`, see `_note_echo`)."""
        self.testruns.seen(testrun)
        if self.directory is not None:
            self.directory.testrun_seen(testrun)
        key = (testrun["metadata"]["namespace"], testrun["metadata"]["name"])
        if key in self._fallbacks and (testrun.get("status") or {}).get("phase"):
            self._fallbacks.pop(key).cancel()  # it says a phase: the wait's decision has nothing to do
        if self._left_to_admission(testrun):
            return
        self.poke(testrun["metadata"]["namespace"], testrun["metadata"]["name"],
                  echo=("testrun", version) if version else None)

    def _left_to_admission(self, testrun: dict) -> bool:
        """A new TestRun that waits for nothing, in a pool of the listing the decisions share:
        its first decision would write nothing (phases.py `leave_to_admission`), so none is
        made now; a round is woken. The rounds decide it once they find no room for it, or it
        no longer counts and is older than its wait (`_new_left_over`)."""
        metadata, spec, status = testrun["metadata"], testrun.get("spec") or {}, testrun.get("status") or {}
        if not phases.new_and_unblocked(spec, status, metadata.get("annotations")) or not metadata.get("creationTimestamp"):
            return False
        pools = self._pools.known(metadata["namespace"])
        pool = pool_for(spec.get("definition") or {}, spec.get("workerPool") or "", pools) if pools else None
        if pool is None or all(p["metadata"]["name"] != pool for p in pools) or ec2_placement.is_ec2(
                next(p for p in pools if p["metadata"]["name"] == pool)):
            return False  # its decision says why it waits (or an EC2 pool's checks apply)
        # Its own decision at the end of the wait says Queued if no round could (all failing);
        # a phase seen first cancels it (`testrun_changed`).
        key = (metadata["namespace"], metadata["name"])
        wait = phases.parse_time(metadata["creationTimestamp"]) + self.settings.admission_wait_seconds - time.time()
        if key not in self._fallbacks:  # (its own timer: `wake_later` keeps only the soonest of a TestRun's)
            self._fallbacks[key] = asyncio.get_running_loop().call_later(max(0.05, wait), self._wait_ended, key)
        self.demand_appeared(metadata["namespace"], pool)
        return True

    def _wait_ended(self, key: tuple[str, str]) -> None:
        self._fallbacks.pop(key, None)
        self.poke(*key)

    def _new_left_over(self, namespace: str, testruns: list[dict], demands: list, admitted: dict, now: float) -> None:
        """After a round: the new TestRuns it counted and found no room for say Queued now
        (`admission_declined`); those it did not count at all (their pool went, say) and older
        than their wait are decided as usual."""
        counted = {demand.testrun for demand in demands}
        for testrun in testruns:
            metadata = testrun["metadata"]
            key = (metadata.get("namespace", namespace), metadata["name"])
            if (testrun.get("status") or {}).get("phase") or key in admitted:
                continue
            if key in counted:
                self._declined.add(key)
                self.poke(*key)
            elif now - phases.parse_time(metadata.get("creationTimestamp") or phases.format_time(now)) \
                    >= self.settings.admission_wait_seconds:
                self.poke(*key)

    def poke(self, namespace: str, name: str, echo: tuple[str, str] | None = None) -> None:
        """Decide this TestRun again soon (events coming together make one decision).
        `echo`: what the event may be the consequence of our own last decision: ("testrun",
        resourceVersion) for the TestRun's event, ("created" | "deleted", pod name) for a pod's
        (see `_note_echo`); None for anything else, which is always decided on."""
        self.ensure_loop(namespace)
        key = (namespace, name)
        if echo is None:
            self._must_decide.add(key)
        else:
            self._maybe_echoes.setdefault(key, set()).add(echo)
        if key in self._queued:
            return
        self._queued.add(key)
        task = self._start(self._decide_queued(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_queued(self, key: tuple[str, str]) -> None:
        # Events come in bursts (a pod created and the status written, a RESULT and the pod
        # ending, a pod deleted with its Secret): a moment's wait makes them one decision.
        await asyncio.sleep(DECIDE_DELAY_SECONDS)
        async with self._decisions, self._lock(key):
            self._queued.discard(key)
            must = key in self._must_decide
            self._must_decide.discard(key)
            echoes = self._maybe_echoes.pop(key, set())
            if not must and echoes and all(self._is_echo(key, echo) for echo in echoes):
                return  # only our own writes came back, and they need nothing
            await self._reconcile_logged(key, 0)

    def wake_later(self, key: tuple[str, str], delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.05, delay)
        existing = self._timers.get(key)
        if existing is not None and not existing.cancelled() and loop.time() < existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(when, self.poke, *key)

    def wake_admission(self, namespace: str) -> None:
        self.ensure_loop(namespace)
        self._wakes[namespace].set()

    def pools_changed(self, namespace: str) -> None:
        """A WorkerPool was created or its spec changed: decisions read the pools afresh."""
        self._pools.forget(namespace)

    def room_freed(self, namespace: str) -> None:
        """A run ended or a pod went: a round is worth it only if some demand waits for room."""
        if self._full.get(namespace) != set():
            self.wake_admission(namespace)

    def demand_appeared(self, namespace: str, pool: str) -> None:
        """A TestRun has runs to start in `pool`: a round now, unless the pool had no room."""
        if pool not in self._full.get(namespace, ()):
            self.wake_admission(namespace)

    def ensure_loop(self, namespace: str) -> None:
        if namespace in self._loops:
            return
        self._wakes[namespace] = asyncio.Event()
        self._loops[namespace] = self._start(self._admission_loop(namespace))
        self._watch_run_pods()
        self._run_objects[namespace] = RunObjects(pod_builder.TESTRUN_LABEL)
        self._background(self._list_run_objects(namespace))

    def _watch_run_pods(self) -> None:
        """The run pods are watched by us, not by kopf (its work per event, which is most of
        what a pod's event costs, is for handlers we do not have): from the first TestRun
        event on, so only the replica kopf lets work watches them, in the operator's
        namespaces, or all of them."""
        if self._pod_watches:
            return
        options = self.context.options
        for scope in ([None] if options.all_namespaces else list(options.namespaces)):
            self._pod_watches.append(self._start(self._pod_watch(scope)))

    async def _pod_watch(self, scope: str | None) -> None:
        """Listed (each pod an event, as kopf's start and relists did), then watched from the
        listing's version; made again where it ended, or listed again after an error."""
        selector = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        backoff = 1.0
        while True:
            try:
                started = {namespace: objects.listing_started() for namespace, objects in self._run_objects.items()
                           if scope is None or namespace == scope}
                pods, version = await self.api.list_core_versioned("pods", scope, selector)
                self._merge_listed_pods(started, pods)
                for pod in pods:
                    self.pod_event("ADDED", pod)
                while True:
                    async for kind, pod in self.api.watch_core("pods", scope, selector, version):
                        if kind == "ERROR":  # 410 Gone (too old a version), or another refusal
                            raise _WatchEnded(pod.get("message") or pod.get("reason") or "an ERROR event")
                        version = (pod.get("metadata") or {}).get("resourceVersion") or version
                        if kind != "BOOKMARK":
                            self.pod_event(kind, pod)
                    backoff = 1.0
            except asyncio.CancelledError:
                raise
            except _WatchEnded as exc:
                logger.debug("run pods of %s: the watch ended (%s): listed again", scope or "every namespace", exc)
                await asyncio.sleep(WATCH_RELIST_PAUSE_SECONDS)  # a server that keeps refusing is not listed in a loop
            except Exception as exc:  # the API server restarting, say: listed again after a pause
                if getattr(exc, "status", None) == 410:  # Gone: too old a version, as an answer not an event
                    await asyncio.sleep(WATCH_RELIST_PAUSE_SECONDS)
                    continue
                logger.warning("run pods of %s are not watched now: %s: %s; trying again in %.0f s",
                               scope or "every namespace", type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _merge_listed_pods(self, started: dict[str, int], pods: list[dict]) -> None:
        """A whole listing of the run pods (of the namespaces in `started`, each with the
        sequence its RunObjects had when it was asked for): those it no longer shows went while
        no watch said so, and are told as deleted (their TestRuns decide now)."""
        by_namespace: dict[str, list[dict]] = {namespace: [] for namespace in started}
        for pod in pods:
            by_namespace.setdefault((pod.get("metadata") or {}).get("namespace", ""), []).append(pod)
        for namespace, sequence in started.items():
            for gone in self._run_objects[namespace].merge("pods", sequence, by_namespace[namespace]):
                self.pod_event("DELETED", gone)

    def pod_event(self, kind: str, pod: dict) -> None:
        """A run pod's watch event: filed, and its TestRun decides again (unless it is the echo
        of our own create or delete); a pod that ended or went frees room."""
        metadata = pod.get("metadata") or {}
        parts = ((metadata.get("annotations") or {}).get(pod_builder.RUN_ID_ANNOTATION) or "").split(".")
        self.pod_seen(metadata.get("namespace", ""), kind == "DELETED", pod)
        if len(parts) == 4:
            self.poke(parts[0], parts[1], echo=pod_echo(kind, pod))
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or kind == "DELETED":
                self.room_freed(parts[0])

    def pod_seen(self, namespace: str, deleted: bool, pod) -> None:
        """A run pod's watch event (before the namespace's first TestRun there is nothing to
        keep: its first listing comes after)."""
        objects = self._run_objects.get(namespace)
        if objects is not None:
            objects.pod_event(deleted, pod)

    async def _list_run_objects(self, namespace: str) -> None:
        """The namespace's run pods and Secrets listed whole, now and every
        RUN_OBJECTS_LISTING_SECONDS: until the first listing, decisions list their own."""
        objects = self._run_objects[namespace]
        selector = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        while True:
            try:
                for kind in ("pods", "secrets"):
                    started = objects.listing_started()
                    if kind == "pods":
                        self._merge_listed_pods({namespace: started}, await self.api.list_core(kind, namespace, selector))
                    else:
                        objects.merge(kind, started, await self.api.list_core(kind, namespace, selector))
                objects.trusted = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # listed again at the next turn; decisions read what they have
                logger.warning("namespace %s: run pods and Secrets not listed: %s: %s", namespace,
                               type(exc).__name__, exc)
            await asyncio.sleep(RUN_OBJECTS_LISTING_SECONDS)

    async def _own_objects(self, testrun: dict, pod_namespace: str, pods: bool = True) -> tuple[list[dict], list[dict]]:
        """The TestRun's pods (none unless `pods`) and token Secrets: kept in memory when they
        can be (its own namespace, listed whole once since the start), else listed. Admission's
        decisions read them so too: what they create has a deterministic name, so one that a
        stale view misses is found to exist at its create, never made twice; and the room
        they spend was counted from pods listed by the round itself (docs/operator.md)."""
        metadata = testrun["metadata"]
        objects = self._run_objects.get(pod_namespace)
        if objects is not None and objects.trusted and pod_namespace == metadata["namespace"]:
            value = label_value(metadata["name"])
            return ([pod for pod in objects.of("pods", value) if _owned(pod, testrun)] if pods else [],
                    [secret for secret in objects.of("secrets", value) if _owned(secret, testrun)])
        selector = f"{pod_builder.TESTRUN_LABEL}={label_value(metadata['name'])}"

        async def none() -> list[dict]:
            return []

        # Both at once: an admitted TestRun's pods wait on these reads.
        listed_secrets, listed_pods = await asyncio.gather(
            self.api.list_core("secrets", pod_namespace, selector),
            self.api.list_core("pods", pod_namespace, selector) if pods else none())
        return ([pod for pod in listed_pods if _owned(pod, testrun)],
                [secret for secret in listed_secrets if _owned(secret, testrun)])

    def _made(self, pod_namespace: str, body: dict) -> None:
        objects = self._run_objects.get(pod_namespace)
        if objects is not None:
            objects.created("pods" if body.get("kind") == "Pod" else "secrets", body)

    def _deleted(self, pod_namespace: str, testrun_name: str, action, pods: bool = True) -> None:
        """Notes a delete of ours (`pods` False: a DeletePod ended an instance, not a pod)."""
        objects = self._run_objects.get(pod_namespace)
        if objects is None:
            return
        if isinstance(action, phases.DeletePod) and pods:
            objects.deleted("pods", pod_builder.run_pod_name(testrun_name, action.run, action.attempt))
        elif isinstance(action, phases.DeleteSecret):
            objects.deleted("secrets", pod_builder.run_secret_name(testrun_name, action.run, action.attempt))

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def close(self) -> None:
        for handle in [*self._timers.values(), *self._fallbacks.values()]:
            handle.cancel()
        for task in [*self._loops.values(), *self._tasks, *self._pod_watches]:
            task.cancel()
        await asyncio.gather(*self._loops.values(), *self._tasks, *self._pod_watches, return_exceptions=True)
        self.ec2.close()

    # -- admission -----------------------------------------------------------------------------

    async def _admission_loop(self, namespace: str) -> None:
        wake = self._wakes[namespace]
        while True:
            try:
                await asyncio.wait_for(wake.wait(), ADMISSION_INTERVAL_SECONDS)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            try:
                await self.admission_round(namespace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                self.context.metrics.reconcile_errors.labels("WorkerPool").inc()
                logger.warning("admission in namespace %s failed: %s: %s", namespace, type(exc).__name__, exc)

    async def admission_round(self, namespace: str) -> None:
        pools = await self._pools.read(namespace, fresh=True)
        # A page at a time, each reduced to what admission reads: 5,000 TestRuns are never all held whole.
        testruns = await self.api.list_objects_paged("testruns", namespace, counting_view)
        run_metrics.testruns_listed(self.context, namespace, testruns)
        now = time.time()
        # New TestRuns that wait for nothing count before any write of theirs (phases.py
        # `leave_to_admission`): their first write is then Running.
        demands = [demand for demand in (phases.queued_demand(testrun, now, self.settings, pools) for testrun in testruns)
                   if demand]
        if not demands:
            self._full[namespace] = set()
            self._new_left_over(namespace, testruns, demands, {}, now)
            return
        counted = demands  # before those of EC2 pools that cannot be counted now are set aside
        # A pool may run its pods in a namespace of its own (spec.namespace): they count too.
        usage = await count_pool_usage(self.api, namespace, pools, testruns)
        wanted = {demand.pool for demand in demands}
        ec2_pools = [pool for pool in pools if ec2_placement.is_ec2(pool) and pool["metadata"]["name"] in wanted]
        if ec2_pools:
            # An instance holds its whole type: room is counted from a describe made now, at
            # the types' sizes, and each run asks for the type it will be launched as. A pool
            # whose describe fails admits nothing this round (its sweep says why).
            listed = []
            for pool in ec2_pools if self.ec2.unreachable_url() is None else ():  # the sweep says why
                try:
                    usage.update(await self.ec2.usage(namespace, [pool], fresh=True))
                    listed.append(pool)
                except Ec2Error:
                    pass
            unlisted = {pool["metadata"]["name"] for pool in ec2_pools if pool not in listed}
            demands = ec2_placement.sized_for_instances([d for d in demands if d.pool not in unlisted], listed,
                                                        testruns)
        run_metrics.pools_counted(self.context, namespace, pools, testruns, usage)
        # The room is shared out here, once for the round: the admitted TestRuns' decisions can
        # then run side by side (each under its own lock) without spending it twice.
        admitted = admit(pools, usage, demands)
        self._full[namespace] = {demand.pool for demand in demands if demand.count > admitted.get(demand.testrun, 0)}
        self._new_left_over(namespace, testruns, counted, admitted, now)
        slots = asyncio.Semaphore(ADMITTED_CONCURRENCY)

        listed = {(t["metadata"].get("namespace", namespace), t["metadata"]["name"]): t["metadata"].get("resourceVersion", "")
                  for t in testruns}
        counted_in = {demand.testrun: demand.pool for demand in demands}

        async def start(key: tuple[str, str], count: int) -> None:
            async with slots, self._lock(key):
                await self._reconcile_logged(key, count, listed.get(key, ""), counted_in.get(key))

        await asyncio.gather(*(start(key, count) for key, count in admitted.items()))

    # -- one decision --------------------------------------------------------------------------

    async def _reconcile_logged(self, key: tuple[str, str], admitted: int, listed_version: str = "",
                                admitted_pool: str | None = None) -> None:
        try:
            await self.reconcile(*key, admitted=admitted, listed_version=listed_version, admitted_pool=admitted_pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # decided again at the next event, timer or round
            self.context.metrics.reconcile_errors.labels("TestRun").inc()
            logger.warning("TestRun %s/%s: runs not reconciled: %s: %s", *key, type(exc).__name__, exc)
            self.wake_later(key, 5.0)

    async def reconcile(self, namespace: str, name: str, admitted: int = 0, listed_version: str = "",
                        admitted_pool: str | None = None) -> None:
        """One decision. Those not started by admission start from the watch's copy when it is
        no older than our last write, and write conditionally on that copy's version
        (cluster/watch_cache.py says why that is safe). Admission's (they create pods) start
        from it only when it is the very version the round listed (`listed_version`), and
        write conditionally too; else from the TestRun as stored now. `admitted_pool`: the pool
        whose room the round counted them in (a new TestRun placed elsewhere starts nothing)."""
        cached = self.testruns.get(namespace, name)
        if admitted and cached is not None and (not listed_version or
                                                cached["metadata"].get("resourceVersion") != listed_version):
            cached = None
        started: list[int] = []
        if cached is not None and await self._reconcile_from(cached, admitted, cached=not admitted, conditional=True,
                                                             started=started, admitted_pool=admitted_pool):
            return
        testrun = await self.api.get_object("testruns", namespace, name)
        if testrun is not None:
            # Runs the refused attempt started are there to be adopted: they spent that room.
            await self._reconcile_from(testrun, max(0, admitted - sum(started)), cached=False,
                                       admitted_pool=admitted_pool, made_before=bool(sum(started)))

    async def _read_testrun(self, namespace: str, name: str) -> dict | None:
        """Another TestRun (a build this one depends on), from the cache when it can say."""
        cached = self.testruns.get(namespace, name)
        return cached if cached is not None else await self.api.get_object("testruns", namespace, name)

    async def _reconcile_from(self, testrun: dict, admitted: int, cached: bool, conditional: bool = False,
                              started: list[int] | None = None, admitted_pool: str | None = None,
                              made_before: bool = False) -> bool:
        """One decision from `testrun`, applied. False, with nothing applied, when a decision
        from the cached copy (`cached`) would act without a write that proves that copy
        current (then it is made again from a fresh read); False too when its write, made
        `conditional` on the copy's version, finds the TestRun moved on: its creates are
        done by then, and it appends to `started` how many run attempts they started (the
        decision made again then reads its pods, `made_before`, even with no status yet)."""
        if testrun["metadata"].get("deletionTimestamp"):
            return True
        namespace, name = testrun["metadata"]["namespace"], testrun["metadata"]["name"]
        spec, status = testrun.get("spec") or {}, testrun.get("status") or {}
        pools = await self._pools.read(namespace)
        pool_name = status.get("workerPool") or pool_for(spec.get("definition") or {}, spec.get("workerPool") or "", pools)
        pool = next((p for p in pools if p["metadata"]["name"] == pool_name), None)
        if pool is None and status.get("workerPool"):
            # Its pool's spec is refused now (an edit): it takes no new run, but the runs placed
            # in it are still watched there, and their instances terminated when they end.
            pool = next((p for p in await self._pools.read(namespace, refused_too=True)
                         if p["metadata"]["name"] == pool_name), None)
        pod_namespace = pod_builder.run_namespace(testrun, pool)
        on_ec2 = ec2_placement.is_ec2(pool)
        workers_known = True
        if status or admitted or made_before:
            # A pool of ec2 has no pods: its run attempts are instances (none before it is placed).
            own_pods, own_secrets = await self._own_objects(testrun, pod_namespace, pods=not on_ec2)
            if on_ec2:
                try:
                    workers = await self.ec2.observe(testrun, pool) if status.get("workerPool") else []
                except Ec2Error as exc:  # RESULTs and cancels go on; the pool's Ec2Available says why
                    logger.debug("TestRun %s/%s: its instances cannot be listed now: %s", namespace, name, exc)
                    workers, workers_known = [], False
            else:
                workers = [p for p in (phases.observe_pod(pod) for pod in own_pods) if p is not None]
        else:
            # Never decided on, and not admitted: nothing to read (only the decisions admission
            # starts make pods and Secrets; if one crashed before its status write, its pods
            # are counted by the rounds, and the next admitted decision reads and adopts them).
            workers, own_secrets = [], []
        builds = {}
        for build in spec.get("dependsOn") or []:
            found = await self._read_testrun(namespace, build)
            if found is not None:
                found_status = found.get("status") or {}
                builds[build] = (found_status.get("phase") or "", found_status.get("result") or "")
        results, heartbeats, posted, reports_known = await self._agent_reports(namespace, name, status)
        # One task's records (not the commit's), at every decision: a decision that counted a
        # RESULT the store could not yet give is made good by the next.
        # (Never decided on, it has no runs to tally: a new TestRun's decision reads nothing.)
        cases, recorded = await self._case_tally(namespace, spec) if reports_known and status else (None, None)
        if recorded is not None:
            # The worker API keeps a RESULT in Redis a moment before the history store has it: a
            # run counts once both do (the API pokes us then), so the TestRun never ends with a
            # case tally short of a run's cases.
            results = {key: value for key, value in results.items() if key in recorded}
            posted = {key: value for key, value in posted.items() if key in recorded}
        observed = phases.Observations(
            now=time.time(), builds=builds, pools=pools,
            pods=workers,
            secrets=[s for s in (phases.observe_secret(secret) for secret in own_secrets) if s is not None],
            results=results, heartbeats=heartbeats, admitted=admitted,
            # No agent could be heard while the operator, or its Redis, was down.
            operator_started=max(self.started, self.context.store_health.back_since),
            cases=cases,
            settings=self.settings, reports_known=reports_known, admission_declined=(namespace, name) in self._declined,
            admitted_pool=admitted_pool if admitted else None,
            worker="instance" if on_ec2 else "pod", workers_known=workers_known,
            boot_grace_seconds=ec2_placement.boot_grace((pool.get("spec") or {}).get("platform") or "linux",
                                                        self.context.options.ec2_boot_timeout) if on_ec2 else None)
        decision = phases.decide(testrun, observed)
        if status or decision.status_patch:
            self._declined.discard((namespace, name))
        patch = decision.status_patch
        decided = {**status, "conditions": patch["conditions"]} if patch and "conditions" in patch else status
        conditions = recorded_conditions(decided, reports_known, phases.format_time(observed.now))
        if cached and (decision.creates or (decision.afterwards and not decision.status_patch and conditions is None)):
            return False  # it would act on a copy no write of ours checks: decided again, fresh
        made = []
        for action in decision.creates:
            try:
                body, made_now = await self._create(action, testrun, pool, pod_namespace)
                if body is not None:
                    self._made(pod_namespace, body)  # made now or before: it exists
                    made.append(body)
                if made_now:
                    run_metrics.pod_created(self.context, testrun, action, pool_name)
            except ValueError as exc:  # no pod can be made of it (no image, a Windows task): it ends here
                await self._cannot_run(testrun, str(exc))
                return True
        patch = decision.status_patch
        if conditions is not None:  # in the same write
            patch = {**(patch or {}), "conditions": conditions}
        stored = None
        if patch:
            try:
                stored = await self.api.patch_status("testruns", namespace, name, patch, resource_version=(
                    testrun["metadata"].get("resourceVersion") or "") if conditional else "")
            except Conflict:
                logger.debug("TestRun %s/%s changed since the copy decided on: deciding again, fresh", namespace, name)
                if started is not None:
                    started.append(sum(1 for action in decision.creates if isinstance(action, phases.CreatePod)))
                return False  # written since that copy: decided again from the TestRun as it is
            self.testruns.wrote(namespace, name, stored)
            if on_ec2:
                self.ec2.recorded(namespace, name)  # its launches are in the status now
            if stored is not None:
                self._note_echo((namespace, name), stored, observed, made, decision.afterwards)
        if decision.status_patch:
            run_metrics.after_status_write(self.context, testrun, decision.status_patch, observed, posted)
        for action in decision.afterwards:
            await self._apply_after(action, testrun, pod_namespace, pool, decision)
            self._deleted(pod_namespace, name, action, pods=not on_ec2)
        if decision.wake_after is not None:
            self.wake_later((namespace, name), decision.wake_after)
        if decision.awaits_admission is not None:
            self.demand_appeared(namespace, decision.awaits_admission)
        if on_ec2 and any(isinstance(action, phases.CreatePod) for action in decision.creates):
            # No watch tells of an instance: the next decision sees it launched and sets the
            # wake for its boot (a pod's events would bring that decision).
            self.wake_later((namespace, name), 2.0)
        if decision.status_patch and ("phase" in decision.status_patch or "active" in decision.status_patch):
            # Queued now (a round that admitted some of it knows the rest waits), or runs
            # ended and freed room.
            demand = phases.queued_demand(stored, time.time(), self.settings) if not admitted and stored is not None else None
            if demand is not None:
                self.demand_appeared(namespace, demand.pool)
            else:
                self.room_freed(namespace)
        if decision.status_patch and decision.status_patch.get("phase") in ENDED_PHASES:
            await self._wake_consumers(testrun)
        if decision.status_patch and "phase" in decision.status_patch and \
                (decision.status_patch["phase"] in ENDED_PHASES) != (status.get("phase") in ENDED_PHASES):
            self.retally_repo(testrun)  # it ended, or runs were added to it: the Repo's tally moves
        return True

    def post_event(self, testrun: dict, type_: str, reason: str, message: str) -> None:
        """An Event on the TestRun, posted in the background through kube/api.py (kopf's
        poster cost twice as much per Event, two per TestRun); said in the log too."""
        logger.info("TestRun %s/%s: %s %s: %s", testrun["metadata"]["namespace"], testrun["metadata"]["name"], type_,
                    reason, message)
        self._background(self._post_event(testrun, type_, reason, message[:1000]))

    async def _post_event(self, testrun: dict, type_: str, reason: str, message: str) -> None:
        try:
            await self.api.create_event(testrun, type_, reason, message, component=EVENT_COMPONENT,
                                        instance=os.environ.get("HOSTNAME", EVENT_COMPONENT))
        except Exception as exc:  # an Event is for people: the log line stands
            logger.warning("TestRun %s/%s: Event %s not posted: %s: %s", testrun["metadata"]["namespace"],
                           testrun["metadata"]["name"], reason, type(exc).__name__, exc)

    def retally_repo(self, testrun: dict) -> None:
        """Asks the daemon of the TestRun's Repo to recount its branch tallies now (no fetch)."""
        uid = next((owner.get("uid") for owner in testrun["metadata"].get("ownerReferences") or []
                    if owner.get("kind") == "Repo"), None)
        watched = self.context.repos.get(uid) if uid else None
        if watched is not None:
            watched.retally.set()

    def store_changed(self, up: bool) -> None:
        """The store went down or came back: the running TestRuns decide again now (they say it
        in their condition Recorded, and judge their runs once it answers)."""
        for namespace in list(self._loops):
            self._background(self._poke_running(namespace))

    async def _poke_running(self, namespace: str) -> None:
        try:
            for testrun in await self.api.list_objects("testruns", namespace):
                status = testrun.get("status") or {}
                if status.get("active") or recorded_conditions(status, True, "") is not None:
                    self.poke(namespace, testrun["metadata"]["name"])
        except Exception as exc:  # their own timers decide them soon anyway
            logger.warning("namespace %s: running TestRuns not woken: %s: %s", namespace, type(exc).__name__, exc)

    def _background(self, coroutine) -> None:
        task = self._start(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _agent_reports(self, namespace: str, name: str, status: dict) -> tuple[dict, dict, dict, bool]:
        """The RESULTs (observed, and as posted) and last heartbeats of the active runs, as the
        worker API keeps them in Redis; with Redis unreachable none, and False: the machine
        judges no run then."""
        results, heartbeats, posted = {}, {}, {}
        active = [(int(index), int(entry["attempt"])) for index, entry in (status.get("active") or {}).items()]
        try:
            kept = await self.backend.kept_for([pod_builder.run_id(namespace, name, *key) for key in active])
            for key, (result, beat) in zip(active, kept):
                if result is not None:
                    results[key] = phases.observe_result(result)
                    posted[key] = result
                if beat is not None:
                    heartbeats[key] = float(beat["time"])
        except ApiError as exc:
            if exc.status != 503:
                raise
            self.context.store_health.failed("read_results", exc)
            return {}, {}, {}, False
        if status.get("active"):
            self.context.store_health.answered()  # back (if it was down) before any agent could beat again
        return results, heartbeats, posted, True

    def _note_echo(self, key: tuple[str, str], stored: dict, observed, made: list[dict], afterwards: list) -> None:
        """Our status write comes back as a watch event. Deciding on it is worth nothing when a
        decision on what we just wrote, with what we just created and deleted, does nothing:
        then that version's event is skipped (`is_echo`). Pods, RESULTs and timers still
        bring their own decisions."""
        stamp = phases.format_time(observed.now)
        created = [{**body, "metadata": {**body["metadata"], "creationTimestamp": stamp}} for body in made]
        gone_pods = {(a.run, a.attempt) for a in afterwards if isinstance(a, phases.DeletePod)}
        gone_secrets = {(a.run, a.attempt) for a in afterwards if isinstance(a, phases.DeleteSecret)}
        pods = [p for p in observed.pods if (p.run, p.attempt) not in gone_pods]
        secrets = [s for s in observed.secrets if s not in gone_secrets]
        for body in created:
            if body.get("kind") == "Pod":
                pods.append(phases.observe_pod(body))
            else:
                secrets.append(phases.observe_secret(body))
        after = dataclasses.replace(observed, admitted=0, pods=[p for p in pods if p is not None],
                                    secrets=[s for s in secrets if s is not None])
        try:
            again = phases.decide(stored, after)
        except Exception:  # not worth a failed decision: the event is decided on as usual
            self._echoes.pop(key, None)
            return
        version = (stored.get("metadata") or {}).get("resourceVersion")
        if version and not again.status_patch and not again.actions:
            self._echoes[key] = (version, frozenset(body["metadata"]["name"] for body in made if body.get("kind") == "Pod"),
                                 frozenset(pod_builder.run_pod_name(key[1], a.run, a.attempt)
                                           for a in afterwards if isinstance(a, phases.DeletePod)))
        else:
            self._echoes.pop(key, None)

    def _is_echo(self, key: tuple[str, str], echo: tuple[str, str]) -> bool:
        """Whether the event is our last decision's own outcome, known to need nothing."""
        known = self._echoes.get(key)
        if known is None:
            return False
        what, value = echo
        return value == known[0] if what == "testrun" else value in known[1 if what == "created" else 2]

    def forget(self, namespace: str, name: str) -> None:
        self._echoes.pop((namespace, name), None)
        self._declined.discard((namespace, name))
        fallback = self._fallbacks.pop((namespace, name), None)
        if fallback is not None:
            fallback.cancel()
        self.testruns.gone(namespace, name)

    async def _wake_consumers(self, testrun: dict) -> None:
        """The TestRuns consuming an ended build wait for it: they decide again now."""
        if (testrun.get("spec") or {}).get("kind") != "build":
            return
        namespace, name = testrun["metadata"]["namespace"], testrun["metadata"]["name"]
        for other in await self.api.list_objects("testruns", namespace):
            if name in ((other.get("spec") or {}).get("dependsOn") or []):
                self.poke(namespace, other["metadata"]["name"])

    async def _cannot_run(self, testrun: dict, why: str) -> None:
        """Ends the TestRun as an error when its pods cannot be built; the next decision (it has
        ended) deletes whatever Secret was made for it."""
        metadata = testrun["metadata"]
        message = f"cannot make its pods: {why}"
        runs = int((testrun.get("spec") or {}).get("runs") or 1)
        counts = {key: int(value or 0) for key, value in ((testrun.get("status") or {}).get("runCounts") or {}).items()}
        ended = counts.get("passed", 0) + counts.get("failed", 0)
        # Every run not ended counts as an error: the machine sees them all ended (not to be
        # started again) until spec.runs is raised.
        patch = {
            "phase": "Error", "result": "error", "message": message, "active": None, "startedRuns": runs,
            "runCounts": {"total": runs, "running": 0, "queued": 0, "errored": max(0, runs - ended)},
            "runsSummary": f"{counts.get('passed', 0)}/{runs}", "completionTime": phases.format_time(time.time())}
        await self.api.patch_status("testruns", metadata["namespace"], metadata["name"], patch)
        run_metrics.after_status_write(self.context, testrun, patch)
        self.post_event(testrun, "Warning", "CannotRun", message)
        self.retally_repo(testrun)
        self.poke(metadata["namespace"], metadata["name"])  # ended: what was made for it goes
        await self._wake_consumers(testrun)

    async def _case_tally(self, namespace: str, spec: dict) -> tuple[dict | None, set | None]:
        """{total, passed, failed} of the cases the TestRun's runs reported, from the store (the
        last attempt of each run index), or None when none did; and the (run index, attempt)
        of every run the store has. (None, None) when the store cannot be read."""
        store = self.context.store
        if store is None:
            return None, None
        try:
            records = await asyncio.to_thread(store.task_runs, repo_id(namespace, spec.get("repo", "")),
                                              spec.get("commit", ""), spec.get("task", ""), True)
        except StoreError as exc:  # down: the tally shown stays until it answers
            self.context.store_health.failed("case_tally", exc)
            return None, None
        last: dict[int, object] = {}
        for record in records:
            if record.run_index not in last or record.attempt > last[record.run_index].attempt:
                last[record.run_index] = record
        recorded = {(record.run_index, record.attempt) for record in records}
        if not last:
            return None, recorded
        passed = sum(1 for record in last.values() for case in record.cases if case.success)
        total = sum(len(record.cases) for record in last.values())
        return {"total": total, "passed": passed, "failed": total - passed}, recorded

    async def _create(self, action, testrun: dict, pool: dict | None, pod_namespace: str) -> tuple[dict, bool]:
        """The body asked for, and True when made now, False when it existed already."""
        metadata = testrun["metadata"]
        the_run_id = pod_builder.run_id(metadata["namespace"], metadata["name"], action.run, action.attempt)
        secret_name = pod_builder.run_secret_name(metadata["name"], action.run, action.attempt)
        if isinstance(action, phases.CreateSecret):
            body = pod_builder.build_run_secret(testrun, the_run_id, tokens.run_token(self.secret, the_run_id),
                                                namespace=pod_namespace)
            return body, await self.api.create_core("secrets", pod_namespace, body)
        elif ec2_placement.is_ec2(pool):
            return None, await self.ec2.launch(testrun, pool, action.run, action.attempt)
        else:
            body = pod_builder.build_run_pod(testrun, run_index=action.run, attempt=action.attempt, pool=pool or {},
                                             api_url=self.context.options.api_url, worker_image=self.worker_image,
                                             token_secret_name=secret_name,
                                             heartbeat_seconds=heartbeat_interval(self.settings))
            if pool is not None:  # admission counts a pool's pods by this label (docs/decisions.md)
                body["metadata"]["labels"][POOL_LABEL] = label_value(pool["metadata"]["name"])
            return body, await self.api.create_core("pods", pod_namespace, body)

    async def _apply_after(self, action, testrun: dict, pod_namespace: str, pool: dict | None = None,
                           decision: phases.Decision | None = None) -> None:
        name = testrun["metadata"]["name"]
        if isinstance(action, phases.DeletePod) and ec2_placement.is_ec2(pool):
            run_id = pod_builder.run_id(testrun["metadata"]["namespace"], name, action.run, action.attempt)
            try:
                await self.ec2.terminate(pool, run_id, termination_reason(action, decision))
            except Ec2Error as exc:  # its run is not live any more: the sweep terminates it once EC2 answers
                logger.warning("TestRun %s/%s: the instance of run %s is not terminated yet: %s",
                               testrun["metadata"]["namespace"], name, run_id, exc)
        elif isinstance(action, phases.DeletePod):
            await self.api.delete_core("pods", pod_namespace, pod_builder.run_pod_name(name, action.run, action.attempt))
        elif isinstance(action, phases.DeleteSecret):
            await self.api.delete_core("secrets", pod_namespace,
                                       pod_builder.run_secret_name(name, action.run, action.attempt))
        elif isinstance(action, phases.RecordAttempt):
            logger.warning("TestRun %s/%s run %d attempt %d: %s: %s%s", testrun["metadata"]["namespace"], name,
                           action.run, action.attempt, action.reason, action.message,
                           "; retried" if action.retried else "; given up")
            run_metrics.attempt_recorded(self.context, testrun["metadata"]["namespace"], action)
        elif isinstance(action, phases.EmitEvent):
            self.post_event(testrun, action.type, action.reason, action.message)


class _WatchEnded(Exception):
    """The server ended a watch with an ERROR event: listed again."""


def pod_echo(kind: str, pod: dict) -> tuple[str, str] | None:
    """What a pod's event may be the echo of: our create (the pod as we made it, nothing since)
    or our delete; None when the pod has moved on by itself."""
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    if kind == "DELETED" or metadata.get("deletionTimestamp"):
        return "deleted", metadata.get("name", "")
    if status.get("phase") in (None, "", "Pending") and not any(
            status.get(key) for key in ("startTime", "conditions", "containerStatuses", "initContainerStatuses", "reason")):
        return "created", metadata.get("name", "")
    return None


def termination_reason(action, decision) -> str:
    """Why the machine let an instance go, for the terminations metric."""
    if decision is not None:
        if (decision.status_patch or {}).get("phase") == "Cancelled":
            return "RunCancelled"
        for other in decision.afterwards:
            if isinstance(other, phases.RecordAttempt) and other.infrastructure and \
                    (other.run, other.attempt) == (action.run, action.attempt):
                return other.reason
    return "RunEnded"


def heartbeat_interval(settings: phases.Settings) -> float:
    """How often the agents beat: a third of the grace (so two may be lost), at most every 5 s."""
    return min(5.0, settings.heartbeat_grace_seconds / 3)


def _owned(obj: dict, testrun: dict) -> bool:
    """A pod or Secret of this TestRun (the label value may be a digest of a long name)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    run = annotations.get(pod_builder.RUN_ID_ANNOTATION, "")
    metadata = testrun["metadata"]
    return run.startswith(f"{metadata['namespace']}.{metadata['name']}.")


def artifacts_root(cache_dir: str) -> str:
    return os.path.join(cache_dir, "artifacts")
