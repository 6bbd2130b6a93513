"""The run metrics on the real operator's /metrics, end to end: the `testlooper operator` process
with a Redis store against the Kubernetes emulator, and this test as the kubelet
(tests/run_cluster.py's harness).

One push makes three TestRuns: `good` (2 runs that pass), `bad` (1 run with a failing case) and
`wobbly` (4 runs whose case `sometimes` fails on the even runs: flaky). The pool holds 4 pods
at once. While no kubelet runs them, the pool's gauges and its status say the same 4 pods and
queued runs; then the kubelet evicts one pod (an infrastructure retry) and runs the rest. Every
series is then scraped over HTTP and checked against what happened; a RESULT posted again
counts nothing more; a restarted operator,
which decides every TestRun again from the same RESULTs, counts no run twice; deleting the
pool, the TestRuns and the Repo takes their series away.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cluster_helpers import NAMESPACE, list_testruns
from run_helpers import cli_env, tl, wait_for
from run_cluster import (  # noqa: F401  (redis_url is a fixture)
    Kubelet, apply_repo, ended_testruns, pods_path, push_project, redis_url, start_operator,
)
from test_operator_runs_e2e import POOL
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name
from testlooper.workerapi import tokens

DEFINITIONS = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
tests:
  good/linux:
    command: sh src/good.sh
    dependencies: {src: HEAD}
    min_cores: 1
    runs: 2
  bad/linux:
    command: sh src/bad.sh
    dependencies: {src: HEAD}
    min_cores: 1
  wobbly/linux:
    command: sh src/wobbly.sh
    dependencies: {src: HEAD}
    min_cores: 1
    runs: 4
"""
GOOD = """printf '{"adds": true, "subtracts": true}' > "$TEST_OUTPUT_DIR/testSummary.json"\n"""
BAD = """printf '{"parses": true, "divides": false}' > "$TEST_OUTPUT_DIR/testSummary.json"\nexit 1\n"""
WOBBLY = """\
if [ $((TEST_LOOPER_RUN_INDEX % 2)) = 0 ]; then ok=false; else ok=true; fi
printf '{"always": true, "sometimes": %s}' "$ok" > "$TEST_OUTPUT_DIR/testSummary.json"
[ "$ok" = true ]
"""
ENDED = ("Succeeded", "Failed", "Error", "Cancelled")


class EvictingKubelet(Kubelet):
    """Runs every pod, but evicts the ones named (as a node under memory pressure would)."""

    def __init__(self, kube, root, evict: set[str]):
        super().__init__(kube, root)
        self.evict = set(evict)

    def run(self, pod):
        name = pod["metadata"]["name"]
        if name not in self.evict:
            return super().run(pod)
        self.kube.api("PATCH", pods_path(name) + "/status", {"status": {
            "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}},
            content_type="application/merge-patch+json")
        self.ran[name] = "Evicted"


def scrape(operator) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, every sample /metrics shows now."""
    status, text = operator.get("/metrics")
    assert status == 200, text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float | None:
    """The sample with exactly these labels, None when there is none."""
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples, name: str) -> dict[tuple, float]:
    return {labels: sample for (sample_name, labels), sample in samples.items() if sample_name == name}


def phases_listed(kube) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in list_testruns(kube):
        phase = (item.get("status") or {}).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def phase_gauge(samples) -> dict[str, int]:
    return {dict(labels)["phase"]: int(count) for labels, count in series(samples, "testlooper_testruns").items()
            if dict(labels)["namespace"] == NAMESPACE and count}


def pool_gauges(samples, pool="linux") -> tuple:
    return tuple(value(samples, f"testlooper_pool_{what}", namespace=NAMESPACE, pool=pool)
                 for what in ("workers", "cores", "queued_runs"))


def pool_status(kube, pool="linux") -> tuple:
    status = kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools/{pool}").get("status") or {}
    return status.get("workers"), status.get("cores"), status.get("queued")


def post_result(kube, operator, testrun: str, run: int, body: dict) -> tuple[int, str]:
    """POST a RESULT for (run, attempt 1) as its agent would, with the token derived for it."""
    secret = kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/testlooper-operator")["data"]["secret"]
    run_id = pod_builder.run_id(NAMESPACE, testrun, run, 1)
    request = urllib.request.Request(operator.url(f"/runs/{run_id}/result"), data=json.dumps(body).encode(),
                                     method="POST", headers={
                                         "Content-Type": "application/json",
                                         "Authorization": f"Bearer {tokens.run_token(base64.b64decode(secret), run_id)}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_run_metrics_say_what_the_runs_did(kube, tmp_path, redis_url):
    url, commit = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "good.sh": GOOD, "bad.sh": BAD,
                                          "wobbly.sh": WOBBLY})
    operator = start_operator(kube, tmp_path, redis_url, POOL, args=["--pool-status-interval", "1"])
    names = {task: testrun_name("demo", commit, task) for task in ("good/linux", "bad/linux", "wobbly/linux")}
    evicted = pod_builder.run_pod_name(names["good/linux"], 1, 1)
    repo_labels = {"namespace": NAMESPACE, "repo": "demo"}
    with operator:
        apply_repo(kube, url)
        # No kubelet yet: 4 pods (maxWorkers) are created and stay Pending, 3 runs wait.
        wait_for(lambda: len(kube.api("GET", pods_path())["items"]) == 4, timeout=60, what="the pool full")
        wait_for(lambda: pool_gauges(scrape(operator)) == (4, 4, 3), timeout=20,
                 what=lambda: f"the pool gauges at 4 workers, 4 cores, 3 queued: {pool_gauges(scrape(operator))}")
        wait_for(lambda: pool_status(kube) == (4, 4, 3), timeout=20,
                 what=lambda: f"the WorkerPool's status at 4 workers, 4 cores, 3 queued: {pool_status(kube)}")
        wait_for(lambda: phase_gauge(scrape(operator)) == phases_listed(kube), timeout=10,
                 what=lambda: f"TestRuns by phase as listed: {phase_gauge(scrape(operator))} {phases_listed(kube)}")

        with EvictingKubelet(kube, tmp_path / "node", {evicted}) as kubelet:
            try:
                by_task = wait_for(lambda: ended_testruns(kube, 3), timeout=120, interval=0.3,
                                   what="the three TestRuns ended")
            finally:
                assert kubelet.errors == [], kubelet.errors
        assert {task: (item["status"]["result"], item["status"]["runsSummary"]) for task, item in by_task.items()} == {
            "good/linux": ("passed", "2/2"), "bad/linux": ("failed", "0/1"), "wobbly/linux": ("flaky", "2/4")}
        assert by_task["good/linux"]["status"]["infraRetries"] == 1
        cases = [item["status"]["cases"] for item in by_task.values()]

        wait_for(lambda: phase_gauge(scrape(operator)) == {"Succeeded": 1, "Failed": 2}, timeout=10,
                 what=lambda: f"TestRuns by phase: {phase_gauge(scrape(operator))}")
        wait_for(lambda: value(scrape(operator), "testlooper_flaky_cases", branch="main", **repo_labels) == 2,
                 timeout=20, what=lambda: f"2 flaky cases: {series(scrape(operator), 'testlooper_flaky_cases')}")
        wait_for(lambda: pool_gauges(scrape(operator)) == (0, 0, 0) and pool_status(kube) == (0, 0, 0), timeout=20,
                 what=lambda: f"the pool empty: {pool_gauges(scrape(operator))} {pool_status(kube)}")
        samples = scrape(operator)
        assert phase_gauge(samples) == phases_listed(kube)
        # Each run once, whatever the decisions that saw its RESULT; the evicted attempt is no run.
        assert series(samples, "testlooper_runs_finished_total") == {
            (("namespace", NAMESPACE), ("repo", "demo"), ("result", "failed")): 3,
            (("namespace", NAMESPACE), ("repo", "demo"), ("result", "passed")): 4}
        # good 2x2 passed; bad 1 passed 1 failed; wobbly: always 4 passed, sometimes 2 and 2.
        assert value(samples, "testlooper_test_cases_total", result="passed", **repo_labels) == 11
        assert value(samples, "testlooper_test_cases_total", result="failed", **repo_labels) == 3
        assert sum(c["passed"] for c in cases) == 11 and sum(c["failed"] for c in cases) == 3  # as the TestRuns say
        assert value(samples, "testlooper_run_duration_seconds_count", kind="test", **repo_labels) == 7
        assert 0 < value(samples, "testlooper_run_duration_seconds_sum", kind="test", **repo_labels) < 7 * 60
        assert value(samples, "testlooper_run_duration_seconds_bucket", kind="test", le="+Inf", **repo_labels) == 7
        # 7 runs and the evicted one's retry got a pod; 3 of them waited for room.
        assert value(samples, "testlooper_run_queue_wait_seconds_count", namespace=NAMESPACE, pool="linux") == 8
        assert value(samples, "testlooper_run_queue_wait_seconds_sum", namespace=NAMESPACE, pool="linux") > 0
        assert series(samples, "testlooper_infra_retries_total") == {
            (("namespace", NAMESPACE), ("reason", "Evicted")): 1}

        # The agent of wobbly's run 2 posts its RESULT again (a retry after a lost answer), and
        # another one too: the first RESULT stands, and no run or case is counted again.
        same = {"result": "failed", "cases": [{"name": "always", "success": True},
                                              {"name": "sometimes", "success": False}]}
        other = {"result": "passed", "cases": [{"name": "always", "success": True}]}
        for body in (same, other):
            status, answer = post_result(kube, operator, names["wobbly/linux"], run=2, body=body)
            assert status == 200, answer
        time.sleep(2)  # the decisions the RESULTs asked for
        again = scrape(operator)
        for name in ("testlooper_runs_finished_total", "testlooper_test_cases_total",
                     "testlooper_run_duration_seconds_count"):
            assert series(again, name) == series(samples, name), name

        # A restart decides every TestRun again, from the same RESULTs: no run is counted again,
        # and the gauges are counted again from the objects.
        assert operator.stop() == 0
        operator.start()
        wait_for(lambda: phase_gauge(scrape(operator)) == {"Succeeded": 1, "Failed": 2}, timeout=20,
                 what=lambda: f"TestRuns by phase after the restart: {phase_gauge(scrape(operator))}")
        wait_for(lambda: value(scrape(operator), "testlooper_flaky_cases", branch="main", **repo_labels) == 2,
                 timeout=20, what="the flaky cases counted again after the restart")
        wait_for(lambda: pool_gauges(scrape(operator)) == (0, 0, 0), timeout=20, what="the pool counted again")
        for task in names.values():  # an edit of each TestRun makes one more decision of it
            kube.api("PATCH", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns/{task}",
                     {"metadata": {"annotations": {"test/nudge": "1"}}}, content_type="application/merge-patch+json")
        time.sleep(2)  # their decisions
        samples = scrape(operator)
        assert series(samples, "testlooper_runs_finished_total") == {}
        assert series(samples, "testlooper_test_cases_total") == {}

        # Deleted: the pool, the TestRuns, the Repo; their series go.
        kube.api("DELETE", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools/linux")
        wait_for(lambda: pool_gauges(scrape(operator)) == (None, None, None), timeout=20,
                 what=lambda: f"the deleted pool's gauges gone: {pool_gauges(scrape(operator))}")
        for task in names.values():
            kube.api("DELETE", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns/{task}")
        kube.api("DELETE", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos/demo")
        wait_for(lambda: series(scrape(operator), "testlooper_flaky_cases") == {}, timeout=20,
                 what="the deleted Repo's flaky cases gone")
        wait_for(lambda: phase_gauge(scrape(operator)) == {}, timeout=20,
                 what=lambda: f"no TestRun counted: {phase_gauge(scrape(operator))}")
    assert "Traceback" not in operator.log(), operator.log()


def test_a_pool_status_interval_too_short_is_refused_in_one_line(tmp_path):
    done = tl(["operator", "--namespace", NAMESPACE, "--cache-dir", str(tmp_path / "cache"),
               "--pool-status-interval", "0"], cli_env(tmp_path), timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith("--pool-status-interval must be at least 0.5 seconds, not 0")
