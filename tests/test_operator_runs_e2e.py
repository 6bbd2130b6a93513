"""Runs as pods, end to end: the real `testlooper operator` process (with a Redis store and the
worker API on its HTTP server) against the Kubernetes emulator, and this test as the kubelet.

A commit with a build and a test consuming its output (runs: 2) is pushed; the operator places
the TestRuns, admits their runs and creates a token Secret and a pod for each; the test runs each
pod's containers as local processes (tests/kubelet.py), patching the pod's status Running, then
Succeeded, as a kubelet would. The build's artifact reaches the test through the worker API; the
TestRuns end Succeeded with their case tallies, and the results are in the Redis history store.
"""

from __future__ import annotations

import base64
import threading
import time

import pytest

from cluster_helpers import NAMESPACE, events, list_testruns
from gitrepo import GitRepo
from kubelet import TestKubelet, running_status
from operator_process import OperatorProcess
from run_helpers import wait_for
from redis_server import RedisServer, free_port
from test_operator_e2e import RUN_PERMISSIONS, check_rbac_subset
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name
from testlooper.store import open_store

DEFINITIONS = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
builds:
  app/linux:
    command: sh src/build.sh
    dependencies: {src: HEAD}
tests:
  check/linux:
    command: sh src/check.sh
    dependencies: {src: HEAD, app: app/linux}
    runs: 2
"""
BUILD = 'mkdir -p "$TEST_BUILD_OUTPUT_DIR" && echo 42 > "$TEST_BUILD_OUTPUT_DIR/answer" && echo built\n'
CHECK = """\
answer=$(cat "$TEST_INPUTS/app/answer")
if [ "$answer" = 42 ]; then ok=true; else ok=false; fi
printf '{"answer_is_42": %s, "runs_at_all": true}' "$ok" > "$TEST_OUTPUT_DIR/testSummary.json"
echo "answer $answer"
"""
POOL = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "linux"},
        "spec": {"provider": "kubernetes", "platform": "linux", "defaultImage": "busybox:1.36", "maxWorkers": 4}}


def pods_path(name: str = "") -> str:
    return f"/api/v1/namespaces/{NAMESPACE}/pods" + (f"/{name}" if name else "")


class Kubelet:
    """Plays the node: takes each pod the operator creates, once, and runs it to its end."""

    def __init__(self, kube, root):
        self.kube = kube
        self.root = root
        self.ran: dict[str, str] = {}  # pod name -> phase it ended in
        self.labels: dict[str, dict] = {}  # pod name -> its labels
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self):
        while not self._stop.is_set():
            for pod in self.kube.api("GET", pods_path())["items"]:
                name = pod["metadata"]["name"]
                if name not in self.ran and not pod["metadata"].get("deletionTimestamp"):
                    try:
                        self.run(pod)
                    except Exception as error:  # said by the test, not lost in a thread
                        self.errors.append(f"{name}: {type(error).__name__}: {error}")
                        self.ran[name] = "error"
            time.sleep(0.1)

    def run(self, pod):
        name = pod["metadata"]["name"]
        self.labels[name] = dict(pod["metadata"].get("labels") or {})
        secret_name = pod["metadata"]["annotations"][pod_builder.TOKEN_SECRET_ANNOTATION]
        secret = self.kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}")
        kubelet = TestKubelet(self.root / name, secrets={secret_name: secret})
        self.kube.api("PATCH", pods_path(name) + "/status",
                      {"status": {"startTime": _now(), "phase": "Pending"}},
                      content_type="application/merge-patch+json")
        run = kubelet.run_pod(pod, timeout=120, on_running=lambda p: self.kube.api(
            "PATCH", pods_path(name) + "/status", {"status": running_status(p)},
            content_type="application/merge-patch+json"))
        # The pod may be gone already: the operator deletes it once its RESULT is counted.
        status, answer = self.kube._call("PATCH", pods_path(name) + "/status", {"status": run.status(pod)},
                                         content_type="application/merge-patch+json")
        assert status in (200, 404), answer
        self.ran[name] = run.phase


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@pytest.fixture
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.stop()


def push_project(tmp_path, files: dict[str, str]) -> tuple[str, str]:
    """The project committed and pushed to a bare repository: (its file:// URL, the commit)."""
    work = GitRepo(tmp_path / "work")
    commit = work.commit(files, "build and check")
    bare = tmp_path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("push", "--quiet", str(bare), "HEAD:main")
    return f"file://{bare}", commit


def start_operator(kube, tmp_path, redis_url, pool: dict) -> OperatorProcess:
    kube.create_namespace(NAMESPACE)
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools", pool)
    port = free_port()
    return OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE], port=port, args=[
        "--store", redis_url, "--api-url", f"http://127.0.0.1:{port}", "--worker-image", "testlooper/worker:test"])


def apply_repo(kube, url: str) -> None:
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos", {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "demo"},
        "spec": {"url": url, "branches": ["main"], "pollIntervalSeconds": 60}})


def ended_testruns(kube, count: int):
    items = list_testruns(kube)
    done = len(items) == count and all((i.get("status") or {}).get("phase") in
                                       ("Succeeded", "Failed", "Error", "Cancelled") for i in items)
    return done and {i["spec"]["task"]: i for i in items}


def test_a_build_and_its_test_run_as_pods_and_end_succeeded_with_results(kube, tmp_path, redis_url):
    url, commit = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "build.sh": BUILD, "check.sh": CHECK})
    operator = start_operator(kube, tmp_path, redis_url, POOL)
    with operator, Kubelet(kube, tmp_path / "node") as kubelet:
        apply_repo(kube, url)
        applied = time.monotonic()
        try:
            by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=90, interval=0.3, what="both TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        print(f"Repo applied to a build and 2 test runs ended, as pods: {time.monotonic() - applied:.1f}s")
        build, check = by_task["app/linux"]["status"], by_task["check/linux"]["status"]
        assert (build["phase"], build["result"], build["runsSummary"]) == ("Succeeded", "passed", "1/1"), build
        assert (check["phase"], check["result"], check["runsSummary"]) == ("Succeeded", "passed", "2/2"), check
        assert check["runCounts"] == {"total": 2, "passed": 2, "failed": 0, "running": 0, "queued": 0,
                                      "errored": 0, "timedOut": 0}
        assert check["cases"] == {"total": 4, "passed": 4, "failed": 0} and check["casesSummary"] == "4/4"
        assert check["workerPool"] == "linux" and "active" not in check
        # One pod per run, each run by the kubelet to Succeeded; then deleted with its Secret.
        build_name = testrun_name("demo", commit, "app/linux")
        check_name = testrun_name("demo", commit, "check/linux")
        assert {labels.get("testlooper.dev/worker-pool") for labels in kubelet.labels.values()} == {"linux"}
        assert kubelet.ran == {pod_builder.run_pod_name(build_name, 1, 1): "Succeeded",
                               pod_builder.run_pod_name(check_name, 1, 1): "Succeeded",
                               pod_builder.run_pod_name(check_name, 2, 1): "Succeeded"}
        wait_for(lambda: kube.api("GET", pods_path())["items"] == [], what="the run pods deleted")
        secrets = wait_for(lambda: [s for s in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"]
                                    if s["metadata"]["name"] != "testlooper-operator"] == [] and
                           kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"],
                           what="the runs' token Secrets deleted")
        assert [s["metadata"]["name"] for s in secrets] == ["testlooper-operator"]
        announced = {(build_name, "Queued"), (build_name, "Running"), (build_name, "Ended"), (check_name, "Blocked"),
                     (check_name, "Running"), (check_name, "Ended")}
        wait_for(lambda: announced <= {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)},
                 what="the phase changes as Events on the TestRuns")  # kopf posts them in the background
        operator_secret = secrets[0]["data"]["secret"]
        assert len(base64.b64decode(operator_secret)) == 32
        assert operator_secret not in operator.log() and base64.b64decode(operator_secret).hex() not in operator.log()

    store = open_store(redis_url)
    try:
        recorded = {(run.task, run.run_index): run for run in store.runs(f"{NAMESPACE}/demo", commit, with_cases=True)}
    finally:
        store.close()
    assert sorted(recorded) == [("app/linux", 1), ("check/linux", 1), ("check/linux", 2)]
    assert all(run.result == "passed" for run in recorded.values())
    assert {case.name: case.success for case in recorded[("check/linux", 2)].cases} == {
        "answer_is_42": True, "runs_at_all": True}
    used = kube.permissions(client="operator")
    check_rbac_subset(used)
    assert RUN_PERMISSIONS <= used, sorted(RUN_PERMISSIONS - used)
    assert "Traceback" not in operator.log(), operator.log()


def test_a_task_no_pod_can_be_made_for_ends_as_an_error_saying_why_and_leaves_nothing(kube, tmp_path, redis_url):
    definitions = DEFINITIONS.replace("platform: linux", "platform: windows")
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions, "build.sh": BUILD, "check.sh": CHECK})
    pool = {**POOL, "spec": {**POOL["spec"], "platform": "windows"}}
    with start_operator(kube, tmp_path, redis_url, pool) as operator:
        apply_repo(kube, url)
        by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=60, interval=0.3, what="both TestRuns ended")
        build, check = by_task["app/linux"]["status"], by_task["check/linux"]["status"]
        build_name = testrun_name("demo", commit, "app/linux")
        assert (build["phase"], build["result"]) == ("Error", "error")
        assert build["message"] == (f"cannot make its pods: TestRun {build_name}: a pod runs its steps with "
                                    "/bin/sh, so Windows tasks and pools cannot run as pods yet")
        assert build["runCounts"]["errored"] == 1 and build["runsSummary"] == "0/1"
        assert (check["phase"], check["result"]) == ("Failed", "blocked")
        wait_for(lambda: [s["metadata"]["name"] for s in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"]]
                 == ["testlooper-operator"], what="the run's token Secret deleted")
        assert kube.api("GET", pods_path())["items"] == []
        wait_for(lambda: (build_name, "CannotRun") in {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)},
                 what="a Warning CannotRun Event")
        time.sleep(1)  # it stays ended: no pod is tried again
        assert list_testruns(kube, **{"testlooper.dev/commit": commit})[0]["status"]["phase"] in ("Error", "Failed")
        assert kube.api("GET", pods_path())["items"] == []
    assert "Traceback" not in operator.log(), operator.log()
