"""Property-style tests of the phase machine and admission: seeded random worlds.

A small simulated cluster (pods that a test kubelet starts, finishes, loses, evicts; agents that
post results, sometimes late or for a lost attempt; an operator that crashes between the steps
of applying a decision and restarts knowing only the TestRuns' persisted statuses and the pods)
is driven by random events, then drained without faults. After every step:

- no pool ever holds more pods, cores or GB than its caps (counted from the pods);
- only admission creates pods; a Secret exists before its pod;
- every run ends exactly once, and the counts move by exactly the results of the runs that
  ended (a result seen twice, late, or for a lost attempt is never counted again);
- attempts and the status stay bounded;
- deciding is pure: the TestRun is not modified, and deciding again gives the same decision.
At the end every TestRun has ended and every run of it is counted.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from testlooper.decisions.phases import (
    CreatePod, CreateSecret, DeletePod, DeleteSecret, Observations, RunResult, Settings, decide, format_time,
    merged, observe_pod, queued_demand,
)
from testlooper.decisions.pools import admit, pool_for, pool_usage, run_sizes
from testlooper.decisions.repo import ENDED_PHASES

T0 = 1_800_000_000.0
SETTINGS = Settings(max_infra_retries=2, max_active_runs=4, heartbeat_grace_seconds=120,
                    image_pull_grace_seconds=120, pending_timeout_seconds=600)
CATEGORY = {"passed": "passed", "failed": "failed", "timeout": "failed"}


class World:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.now = T0
        self.operator_started = T0
        self.pools = [
            {"metadata": {"name": "small"}, "spec": {"provider": "kubernetes", "priority": 5, "maxWorkers": 3,
                                                      "maxCores": 4, "maxRamGb": 6.0, "maxPodCores": 2}},
            {"metadata": {"name": "big"}, "spec": {"provider": "kubernetes", "maxWorkers": rng.randint(1, 6),
                                                    "maxCores": 16, "maxRamGb": 20.0}},
        ]
        self.testruns: dict[str, dict] = {}
        self.add_testrun("build", kind="build", runs=1, definition={"max_retries": 2, "retry_wait_seconds": 20})
        for number in range(rng.randint(2, 4)):
            cores = rng.choice([0, 1, 2, 3, 8, 32])
            self.add_testrun(f"test{number}", runs=rng.randint(1, 12), priority=rng.randint(0, 3),
                             definition={"min_cores": cores, "min_ram_gb": rng.choice([0, 0.5, 2, 4])},
                             dependsOn=["build"] if rng.random() < 0.5 else [])
        self.pods: dict[tuple[str, int, int], dict] = {}
        self.secrets: set[tuple[str, int, int]] = set()
        self.results: dict[tuple[str, int, int], RunResult] = {}  # the worker API's store: survives restarts
        self.heartbeats: dict[tuple[str, int, int], float] = {}  # in the operator's memory: lost on restart
        self.silent: set[tuple[str, int, int]] = set()  # agents whose heartbeats stopped reaching us
        self.ended: dict[str, set[int]] = {name: set() for name in self.testruns}
        self.faults = True

    def add_testrun(self, name, kind="test", runs=1, definition=None, priority=0, dependsOn=()):
        self.testruns[name] = {
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": format_time(T0 + len(self.testruns))},
            "spec": {"kind": kind, "runs": runs, "definition": definition or {}, "priority": priority,
                     "dependsOn": list(dependsOn)},
            "status": {},
        }

    # -- the operator ------------------------------------------------------------------------

    def observations(self, name: str, admitted: int = 0) -> Observations:
        pods = [observe_pod(pod) for (tr, _, _), pod in self.pods.items() if tr == name]
        builds = {dep: (self.testruns[dep]["status"].get("phase", ""), self.testruns[dep]["status"].get("result", ""))
                  for dep in self.testruns[name]["spec"]["dependsOn"]}
        return Observations(
            now=self.now, builds=builds, pools=self.pools, pods=pods, admitted=admitted,
            results={(i, a): r for (tr, i, a), r in self.results.items() if tr == name},
            heartbeats={(i, a): t for (tr, i, a), t in self.heartbeats.items() if tr == name},
            secrets=[(i, a) for (tr, i, a) in self.secrets if tr == name],
            operator_started=self.operator_started, settings=SETTINGS)

    def reconcile(self, name: str, admitted: int = 0, declined: bool = False) -> None:
        before = copy.deepcopy(self.testruns[name])
        observed = dataclasses.replace(self.observations(name, admitted), admission_declined=declined)
        decision = decide(self.testruns[name], observed)
        # Pure: the TestRun is left as it was, and the same inputs give the same decision.
        assert self.testruns[name] == before
        assert decide(before, observed) == decision
        creates = decision.creates
        assert admitted or not creates, "only admission creates pods"
        assert len(creates) <= 2 * admitted
        crash = self.faults and self.rng.random() < 0.08
        if crash and self.rng.random() < 0.5:  # died part way through the creates
            for action in creates[:self.rng.randint(0, len(creates))]:
                self.apply(name, action)
            return self.restart()
        for action in creates:
            self.apply(name, action)
        self.persist(name, decision.status_patch)
        if crash:  # died after the status write: the deletes are lost
            return self.restart()
        for action in decision.afterwards:
            self.apply(name, action)

    def admission_round(self) -> None:
        sizes = run_sizes(self.testruns.values(), self.pools)
        usage = pool_usage(self.pod_dicts(), sizes)
        demands = [demand for demand in (queued_demand(t, self.now, SETTINGS, self.pools) for t in self.testruns.values())
                   if demand is not None]
        granted = admit(self.pools, usage, demands)
        for (_, name), count in sorted(granted.items()):
            self.reconcile(name, admitted=count)
            self.check_caps(sizes)
        for demand in demands:  # new ones found no room: they say Queued (as cluster/runs.py does)
            if demand.testrun not in granted and not self.testruns[demand.testrun[1]]["status"].get("phase"):
                self.reconcile(demand.testrun[1], declined=True)

    def restart(self) -> None:
        self.operator_started = self.now
        self.heartbeats.clear()

    # -- the API server and the kubelet ------------------------------------------------------

    def apply(self, name: str, action) -> None:
        if not hasattr(action, "attempt"):
            return  # events and attempt records: for people and metrics
        key = (name, action.run, action.attempt)
        if isinstance(action, CreateSecret):
            self.secrets.add(key)
        elif isinstance(action, CreatePod):
            assert key in self.secrets, "a pod is created after its Secret"
            if key not in self.pods:
                # Where the decision placed it (a new TestRun's first write may be lost after
                # its creates): the shell labels its pods so.
                testrun = self.testruns[name]
                pool = testrun["status"].get("workerPool") or pool_for(testrun["spec"]["definition"], "", self.pools)
                self.pods[key] = {"metadata": {
                    "namespace": "ns", "creationTimestamp": format_time(self.now),
                    "labels": {"testlooper.dev/testrun": name, "testlooper.dev/run-index": str(action.run),
                               "testlooper.dev/attempt": str(action.attempt), "testlooper.dev/worker-pool": pool}},
                    "status": {"phase": "Pending"}}
        elif isinstance(action, DeletePod):
            if key in self.pods:
                if self.rng.random() < 0.5 and self.pods[key]["status"]["phase"] in ("Pending", "Running"):
                    self.pods[key]["metadata"]["deletionTimestamp"] = format_time(self.now)
                else:
                    del self.pods[key]
        elif isinstance(action, DeleteSecret):
            self.secrets.discard(key)

    def pod_dicts(self):
        return list(self.pods.values())

    def kubelet(self) -> None:
        """Moves some pods along (all of them when draining), with faults unless draining."""
        for key, pod in list(self.pods.items()):
            if not self.faults or self.rng.random() < 0.4:
                self.step_pod(key, pod)

    def step_pod(self, key, pod) -> None:
        rng, status, stamp = self.rng, pod["status"], format_time(self.now)
        if pod["metadata"].get("deletionTimestamp"):
            if rng.random() < 0.3 and status["phase"] == "Running":
                self.post_result(key)  # the agent reports while its pod shuts down
            del self.pods[key]
            return
        if self.faults and rng.random() < 0.06:
            fault = rng.choice(["evict", "delete", "node", "silence", "crash", "pull"])
            if fault == "evict":
                status.update(phase="Failed", reason="Evicted", message="low on memory")
            elif fault == "delete":
                del self.pods[key]
            elif fault == "node":
                status.update(phase="Unknown")
            elif fault == "silence":
                self.silent.add(key)
            elif fault == "crash":
                status.update(phase="Failed", containerStatuses=[
                    {"name": "test", "state": {"terminated": {"exitCode": 137, "finishedAt": stamp}}}])
            elif fault == "pull" and status["phase"] == "Pending" and "startTime" not in status:
                status.update(startTime=stamp, containerStatuses=[
                    {"name": "test", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}])
            return
        if status["phase"] == "Pending" and "containerStatuses" not in status:
            status.update(phase="Running", startTime=stamp, containerStatuses=[
                {"name": "test", "state": {"running": {"startedAt": stamp}}}])
        elif status["phase"] == "Running":
            if key not in self.silent:
                self.heartbeats[key] = self.now
            if rng.random() < 0.5 or not self.faults:
                self.post_result(key)
                if rng.random() < 0.8:
                    status.update(phase="Succeeded", containerStatuses=[
                        {"name": "test", "state": {"terminated": {"exitCode": 0, "finishedAt": stamp}}}])

    def post_result(self, key) -> None:
        if key in self.results:
            return  # the store keeps the first; a second post changes nothing
        result = self.rng.choice(["passed", "passed", "passed", "failed", "timeout", "error"])
        if self.faults and self.rng.random() < 0.03:
            result = "cancelled"
        cases = (f"case{self.rng.randint(0, 40)}",) if result == "failed" else ()
        self.results[key] = RunResult(result, failed_cases=cases)

    def late_result(self) -> None:
        """An agent whose pod is gone posts anyway (it retried past an operator restart)."""
        gone = [key for key in self.secrets if key not in self.pods] + list(self.silent)
        if gone:
            self.post_result(self.rng.choice(gone))

    # -- invariants ----------------------------------------------------------------------------

    def persist(self, name: str, patch) -> None:
        testrun = self.testruns[name]
        before = testrun["status"]
        after = merged(before, patch)
        cancelled = after.get("result") == "cancelled" or testrun["spec"].get("cancel")
        still_active = set(map(int, after.get("active") or {}))
        # Runs that left `active`, and runs first started (adopted) and ended in one decision.
        newly_started = range(int(before.get("startedRuns") or 0) + 1, int(after.get("startedRuns") or 0) + 1)
        ended_now = (set(map(int, before.get("active") or {})) | set(newly_started)) - still_active
        if not cancelled:
            expected = {"passed": 0, "failed": 0, "errored": 0, "timedOut": 0}
            for run in ended_now:
                attempt = before["active"][str(run)]["attempt"] if str(run) in (before.get("active") or {}) else 1
                assert run not in self.ended[name], f"{name} run {run} ended twice"
                result = self.results.get((name, run, attempt))
                outcome = result.result if result is not None else "error"
                expected[CATEGORY.get(outcome, "errored")] += 1
                expected["timedOut"] += outcome == "timeout"
            old, new = before.get("runCounts") or {}, after.get("runCounts") or {}
            for key, delta in expected.items():
                assert int(new.get(key) or 0) - int(old.get(key) or 0) == delta, (name, key, old, new, ended_now)
            self.ended[name] |= ended_now
        for run in map(int, after.get("active") or {}):
            assert run not in self.ended[name], f"{name} run {run} started again after it ended"
        for entry in (after.get("active") or {}).values():
            retries = int(testrun["spec"]["definition"].get("max_retries") or 0) if testrun["spec"]["kind"] == "build" else 0
            assert entry["attempt"] <= 1 + SETTINGS.max_infra_retries + retries
            assert entry.get("infraFailures", 0) <= SETTINGS.max_infra_retries
        assert len(after.get("active") or {}) <= SETTINGS.max_active_runs
        assert len(after.get("attempts") or []) <= 20 and len(after.get("failingCases") or []) <= 20
        counts = after.get("runCounts")
        if counts and after.get("phase") in ("Running", "Queued") and not cancelled:
            ended = counts["passed"] + counts["failed"] + counts["errored"]
            assert ended == len(self.ended[name])
            assert ended + counts["running"] + counts["queued"] == counts["total"], counts
        testrun["status"] = after

    def check_caps(self, sizes) -> None:
        for pool in self.pools:
            name, spec = pool["metadata"]["name"], pool["spec"]
            live = [key for key, pod in self.pods.items()
                    if pod["status"]["phase"] not in ("Succeeded", "Failed")
                    and pod["metadata"]["labels"]["testlooper.dev/worker-pool"] == name]
            cores = sum(sizes[("ns", key[0])][1] for key in live)
            ram = sum(sizes[("ns", key[0])][2] for key in live)
            assert len(live) <= spec["maxWorkers"], (name, len(live))
            assert cores <= spec["maxCores"] + 1e-9 and ram <= spec["maxRamGb"] + 1e-9, (name, cores, ram)

    # -- driving -------------------------------------------------------------------------------

    def random_step(self) -> None:
        self.now += self.rng.choice([1, 5, 20, 60, 200])
        event = self.rng.random()
        if event < 0.3:
            self.admission_round()
        elif event < 0.6:
            self.reconcile(self.rng.choice(list(self.testruns)))
        elif event < 0.9:
            self.kubelet()
        elif event < 0.94:
            self.late_result()
        elif event < 0.97:
            self.restart()
        elif event < 0.99:
            testrun = self.rng.choice(list(self.testruns.values()))
            testrun["spec"]["runs"] += self.rng.randint(1, 3)  # testlooper rerun
        elif self.rng.random() < 0.3:
            self.rng.choice(list(self.testruns.values()))["spec"]["cancel"] = True

    def drain(self) -> None:
        self.faults = False
        for _ in range(400):
            self.now += 60
            self.admission_round()
            for name in self.testruns:
                self.reconcile(name)
            self.kubelet()
            if all(t["status"].get("phase") in ENDED_PHASES and not any(k[0] == n for k in self.pods)
                   for n, t in self.testruns.items()):
                return
        raise AssertionError({n: t["status"] for n, t in self.testruns.items()
                              if t["status"].get("phase") not in ENDED_PHASES})


@pytest.mark.parametrize("seed", range(80))
def test_random_worlds_keep_every_invariant(seed):
    world = World(random.Random(seed))
    for _ in range(250):
        world.random_step()
    world.drain()
    for name, testrun in world.testruns.items():
        status, spec = testrun["status"], testrun["spec"]
        if status["result"] in ("cancelled", "blocked") or spec.get("cancel"):
            continue
        total = status["runCounts"]["total"]
        assert total == max(spec["runs"], status["startedRuns"])
        assert world.ended[name] == set(range(1, total + 1)), (name, status)
        counts = status["runCounts"]
        assert counts["passed"] + counts["failed"] + counts["errored"] == total
        assert counts["running"] == counts["queued"] == 0
    assert not world.secrets - set(world.pods), "every Secret goes with its run"
