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
import time

from cluster_helpers import NAMESPACE, events, list_testruns
from run_cluster import Kubelet, apply_repo, ended_testruns, pods_path, push_project, redis_url, start_operator  # noqa: F401
from run_helpers import wait_for
from test_operator_e2e import RUN_PERMISSIONS, TESTRUN_FRESH_READ, check_rbac_subset
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
        # The TestRuns may end before the kubelet has written a pod's end (its RESULT came first).
        wait_for(lambda: len(kubelet.ran) == 3, what="the kubelet done with the three pods")
        assert {labels.get("testlooper.dev/worker-pool") for labels in kubelet.labels.values()} == {"linux"}
        # The TestRun may end (its RESULTs counted) before the kubelet has written the last
        # pod's end: wait for that too.
        wait_for(lambda: len(kubelet.ran) == 3, what="the kubelet to finish the three pods")
        assert kubelet.ran == {pod_builder.run_pod_name(build_name, 1, 1): "Succeeded",
                               pod_builder.run_pod_name(check_name, 1, 1): "Succeeded",
                               pod_builder.run_pod_name(check_name, 2, 1): "Succeeded"}
        wait_for(lambda: kube.api("GET", pods_path())["items"] == [], what="the run pods deleted")
        secrets = wait_for(lambda: [s for s in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"]
                                    if s["metadata"]["name"] != "testlooper-operator"] == [] and
                           kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"],
                           what="the runs' token Secrets deleted")
        assert [s["metadata"]["name"] for s in secrets] == ["testlooper-operator"]
        announced = {(build_name, "Running"), (build_name, "Ended"), (check_name, "Blocked"),
                     (check_name, "Running"), (check_name, "Ended")}
        said = wait_for(lambda: announced <= {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)} and
                        {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)},
                        what="the phase changes as Events on the TestRuns")  # posted in the background
        # The build waited for nothing and the pool had room: admission started it before any
        # write of its own, so it was never Queued (decisions/phases.py `leave_to_admission`).
        assert (build_name, "Queued") not in said
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
    assert RUN_PERMISSIONS - {TESTRUN_FRESH_READ} <= used, sorted(RUN_PERMISSIONS - used)
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
        # Its one run ended as an error; the blocked test's runs never started, nor ended.
        assert operator.metric("testlooper_runs_finished_total", namespace=NAMESPACE, repo="demo", result="error") == 1
        finished = [line for line in operator.get("/metrics")[1].splitlines()
                    if line.startswith("testlooper_runs_finished_total{")]
        assert len(finished) == 1, finished
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
