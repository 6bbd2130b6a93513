"""A cluster user's day, end to end (issue 9): the real `testlooper operator` process against the
Kubernetes emulator, a real redis-server, real git, the real kubectl for what the user does, and
tests/run_cluster.py's kubelet thread running each pod's containers as local processes.

1. kubectl applies a WorkerPool and a Repo; a commit is pushed with a build, a test consuming
   it, and a test of `runs: 4` one of whose cases fails on the even runs (by the run index the
   agent puts in the environment), so exactly 2 of 4.
2. The build's pod runs first; the tests are Blocked until it has succeeded.
3. Phases, results, run and case tallies, `kubectl get testruns`, the Repo's branch tally (within
   seconds of the last TestRun ending, long before the next poll), the Redis history, metrics.
4. A second push that breaks a case: `testlooper history --repo` shows it `broken`.
5. `testlooper rerun --add 2` adds runs; they run and count.
6. `kubectl patch ... spec.cancel: true` stops a running TestRun promptly.
7. (the other tests) SIGKILL and restart of the operator mid-run, and an operator down for 60 s
   while a run ends: nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from cluster_helpers import (
    NAMESPACE,
    WEBHOOK_SECRET,
    events,
    list_testruns,
    repo_object,
    signed_push,
)
from gitrepo import GitRepo
from operator_process import OPERATOR_DIR, OperatorProcess
from redis_server import RedisServer, free_port
from run_cluster import Kubelet
from test_operator_metrics_e2e import phase_gauge, scrape, series, value
from run_helpers import wait_for
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name
from testlooper.store import open_store

ENDED = ("Succeeded", "Failed", "Error", "Cancelled")
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
  flaky/linux:
    command: sh src/flaky.sh
    dependencies: {src: HEAD, app: app/linux}
    runs: 4
"""
SLOW_TEST = """\
  slow/linux:
    command: sh src/slow.sh
    dependencies: {src: HEAD}
"""
BUILD = 'mkdir -p "$TEST_BUILD_OUTPUT_DIR" && echo 42 > "$TEST_BUILD_OUTPUT_DIR/answer" && echo built\n'
CHECK = """\
answer=$(cat "$TEST_INPUTS/app/answer")
if [ "$answer" = {expected} ]; then ok=true; else ok=false; fi
printf '{{"answer_is_right": %s, "runs_at_all": true}}' "$ok" > "$TEST_OUTPUT_DIR/testSummary.json"
[ "$ok" = true ]
"""
# The odd runs pass, the even ones fail (a task passes or fails by its exit code): 2 of 4,
# whatever order the pods run in.
FLAKY = """\
if [ $((TEST_LOOPER_RUN_INDEX % 2)) = 1 ]; then ok=true; else ok=false; fi
printf '{"sometimes": %s, "always": true}' "$ok" > "$TEST_OUTPUT_DIR/testSummary.json"
[ "$ok" = true ]
"""
SLOW = 'echo started; sleep 120\n'
MANIFESTS = f"""\
apiVersion: v1
kind: Secret
metadata: {{name: demo-webhook}}
stringData: {{secret: {WEBHOOK_SECRET}}}
---
apiVersion: testlooper.dev/v1alpha1
kind: WorkerPool
metadata: {{name: linux}}
spec: {{provider: kubernetes, platform: linux, defaultImage: "busybox:1.36", maxWorkers: 6}}
---
apiVersion: testlooper.dev/v1alpha1
kind: Repo
metadata: {{name: demo}}
spec:
  url: {{url}}
  branches: [main]
  pollIntervalSeconds: 600
  webhookSecret: demo-webhook
"""


@pytest.fixture
def redis():
    with RedisServer() as server:
        yield server


def operator_for(kube, tmp_path, redis_url: str, port: int) -> OperatorProcess:
    return OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE], port=port, args=[
        "--store", redis_url, "--api-url", f"http://127.0.0.1:{port}", "--worker-image", "testlooper/worker:test"])


def commit_testruns(kube, commit: str) -> dict[str, dict]:
    return {item["spec"]["task"]: item for item in list_testruns(kube, **{"testlooper.dev/commit": commit})}


def ended(kube, commit: str, tasks: set[str]):
    found = commit_testruns(kube, commit)
    done = set(found) == tasks and all((found[t].get("status") or {}).get("phase") in ENDED for t in tasks)
    return done and found


def kubectl_table(kube, *args: str) -> list[dict[str, str]]:
    lines = kube.kubectl("get", *args, "-n", NAMESPACE).stdout.splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split())) for line in lines[1:]]


def cli(kube, *args: str) -> subprocess.CompletedProcess:
    env = {**kube.client_env("user", namespace=NAMESPACE), "PYTHONPATH": str(OPERATOR_DIR)}
    return subprocess.run([sys.executable, "-m", "testlooper", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def stored_runs(redis_url: str, commit: str, task: str) -> list:
    store = open_store(redis_url)
    try:
        return sorted((run for run in store.runs(f"{NAMESPACE}/demo", commit, with_cases=True) if run.task == task),
                      key=lambda run: (run.run_index, run.attempt))
    finally:
        store.close()


def test_a_users_day_from_kubectl_apply_to_history_rerun_and_cancel(kube, tmp_path, redis):
    work = GitRepo(tmp_path / "work")
    first = work.commit({"testlooper.yml": DEFINITIONS, "build.sh": BUILD, "check.sh": CHECK.format(expected=42),
                         "flaky.sh": FLAKY}, "build, check and a flaky test")
    bare = tmp_path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("push", "--quiet", str(bare), "HEAD:main")
    url = f"file://{bare}"
    kube.create_namespace(NAMESPACE)
    manifests = tmp_path / "day.yaml"
    manifests.write_text(MANIFESTS.replace("{url}", url))
    port = free_port()
    operator = operator_for(kube, tmp_path, redis.url, port)
    build, check, flaky = (testrun_name("demo", first, task) for task in ("app/linux", "check/linux", "flaky/linux"))
    build_phase = lambda pod: (kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns/"  # noqa: E731
                                        f"{build}").get("status") or {}).get("phase")
    with operator, Kubelet(kube, tmp_path / "node", on_take=build_phase) as kubelet:
        # 1. The user applies the pool and the Repo.
        kube.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", str(manifests))
        applied = time.monotonic()
        try:
            by_task = wait_for(lambda: ended(kube, first, {"app/linux", "check/linux", "flaky/linux"}), timeout=120,
                               interval=0.2, what="the first commit's TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        last_ended = time.monotonic()
        print(f"first commit: applied to 3 TestRuns (6 pods) ended in {last_ended - applied:.1f}s")

        # 2. The build ran first: each test's pod appeared only once the build had Succeeded (its
        # agent may still be exiting), and the tests said they were Blocked.
        build_pod = pod_builder.run_pod_name(build, 1, 1)
        assert kubelet.journal[0] == ("started", build_pod), kubelet.journal
        assert kubelet.taken_with.pop(build_pod) in (None, "Running")  # its first write comes with its pod
        assert set(kubelet.taken_with.values()) == {"Succeeded"}, kubelet.taken_with
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)}
        # The pool had room: the build went from its creation to Running, never Queued.
        assert {(check, "Blocked"), (flaky, "Blocked"), (build, "Running")} <= reasons, sorted(reasons)
        assert (build, "Queued") not in reasons
        blocked = next(e for e in events(kube) if (e["involvedObject"]["name"], e["reason"]) == (check, "Blocked"))
        assert build in blocked["message"], blocked

        # 3. Phases, results, tallies, as the user sees them with kubectl too.
        statuses = {task: item["status"] for task, item in by_task.items()}
        assert (statuses["app/linux"]["phase"], statuses["app/linux"]["result"]) == ("Succeeded", "passed")
        assert (statuses["check/linux"]["phase"], statuses["check/linux"]["result"],
                statuses["check/linux"]["runsSummary"], statuses["check/linux"]["casesSummary"]) == (
            "Succeeded", "passed", "1/1", "2/2")
        assert (statuses["flaky/linux"]["phase"], statuses["flaky/linux"]["result"],
                statuses["flaky/linux"]["runsSummary"]) == ("Failed", "flaky", "2/4")
        assert statuses["flaky/linux"]["runCounts"] == {"total": 4, "passed": 2, "failed": 2, "running": 0,
                                                        "queued": 0, "errored": 0, "timedOut": 0}
        assert statuses["flaky/linux"]["cases"] == {"total": 8, "passed": 6, "failed": 2}
        assert statuses["flaky/linux"]["casesSummary"] == "6/8"
        rows = {row["TASK"]: row for row in kubectl_table(kube, "testruns")}
        assert {task: (row["PHASE"], row["RESULT"], row["RUNS"], row["CASES"]) for task, row in rows.items()} == {
            "app/linux": ("Succeeded", "passed", "1/1", "0/0"), "check/linux": ("Succeeded", "passed", "1/1", "2/2"),
            "flaky/linux": ("Failed", "flaky", "2/4", "6/8")}
        # One pod per run, no retry: a failing run's test container exits 1, so its pod Failed.
        wait_for(lambda: len(kubelet.ran) == 6, what="the agents exited")  # they may, after their RESULT
        assert kubelet.ran == {build_pod: "Succeeded", pod_builder.run_pod_name(check, 1, 1): "Succeeded",
                               **{pod_builder.run_pod_name(flaky, index, 1): ("Succeeded", "Failed")[1 - index % 2]
                                  for index in range(1, 5)}}

        # 3. The Repo's branch tally follows within seconds (the next poll is 10 minutes away).
        tally = wait_for(lambda: [b for b in (repo_object(kube).get("status") or {}).get("branches") or []
                                  if b.get("running") == 0], timeout=10, interval=0.2,
                         what="the branch tally with nothing running")
        print(f"branch tally current {time.monotonic() - last_ended:.1f}s after the last TestRun ended")
        assert tally == [{"name": "main", "commit": first, "passed": 2, "failed": 0, "flaky": 1, "running": 0}]
        assert repo_object(kube)["status"]["branchesSummary"] == f"main@{first[:8]} 2 passed 1 flaky"


        # 3. The Redis history: each run once, with its cases.
        runs = stored_runs(redis.url, first, "flaky/linux")
        assert [(run.run_index, run.attempt, run.result) for run in runs] == [
            (1, 1, "passed"), (2, 1, "failed"), (3, 1, "passed"), (4, 1, "failed")]
        assert [{case.name: case.success for case in run.cases} for run in runs[:2]] == [
            {"sometimes": True, "always": True}, {"sometimes": False, "always": True}]
        assert [run.branch for run in runs] == ["main"] * 4

        # 3. Metrics: part 1's, and the runs' (cluster/run_metrics.py).
        assert operator.metric("testlooper_testruns_created_total", namespace=NAMESPACE, repo="demo") == 3
        assert operator.metric("testlooper_repos") == 1
        assert operator.metric("testlooper_reconcile_errors_total", kind="TestRun") == 0
        repo_labels = {"namespace": NAMESPACE, "repo": "demo"}
        wait_for(lambda: phase_gauge(scrape(operator)) == {"Succeeded": 2, "Failed": 1}, timeout=10,
                 what=lambda: f"TestRuns by phase: {phase_gauge(scrape(operator))}")
        wait_for(lambda: value(scrape(operator), "testlooper_flaky_cases", branch="main", **repo_labels) == 2,
                 timeout=20, what=lambda: f"2 flaky cases: {series(scrape(operator), 'testlooper_flaky_cases')}")
        samples = scrape(operator)
        # build, check and flaky's odd runs passed; its even ones failed; 2 + 6 cases passed, 2 failed.
        assert {result: value(samples, "testlooper_runs_finished_total", result=result, **repo_labels)
                for result in ("passed", "failed")} == {"passed": 4, "failed": 2}
        assert {result: value(samples, "testlooper_test_cases_total", result=result, **repo_labels)
                for result in ("passed", "failed")} == {"passed": 8, "failed": 2}
        assert {kind: value(samples, "testlooper_run_duration_seconds_count", kind=kind, **repo_labels)
                for kind in ("build", "test")} == {"build": 1, "test": 5}
        assert value(samples, "testlooper_run_queue_wait_seconds_count", namespace=NAMESPACE, pool="linux") == 6
        assert series(samples, "testlooper_infra_retries_total") == {}
        assert value(samples, "testlooper_store_up") == 1

        # 4. A second push breaks a case (and adds a slow test, cancelled in 6).
        second = work.commit({"check.sh": CHECK.format(expected=43),
                              "testlooper.yml": DEFINITIONS + SLOW_TEST, "slow.sh": SLOW}, "expect 43")
        work.git("push", "--quiet", str(bare), "HEAD:main")
        status, _ = operator.webhook("/webhooks/github", *signed_push(url, second))
        assert status == 202
        wait_for(lambda: all((commit_testruns(kube, second).get(task, {}).get("status") or {}).get("phase") in ENDED
                             for task in ("app/linux", "check/linux", "flaky/linux")),
                 timeout=120, interval=0.2, what="the second commit's build, check and flaky tests ended")
        assert commit_testruns(kube, second)["check/linux"]["status"]["result"] == "failed"
        shown = cli(kube, "history", "--store", redis.url, "--repo", f"{NAMESPACE}/demo")
        assert shown.returncode == 0, shown.stderr
        broken = [line.split() for line in shown.stdout.splitlines() if line.startswith("broken")]
        assert ["broken", "check/linux", "::", "answer_is_right", "failed", "0/1"] in broken, shown.stdout
        as_json = json.loads(cli(kube, "history", "--store", redis.url, "--repo", f"{NAMESPACE}/demo",
                                 "--json").stdout)
        assert [entry["class"] for entry in as_json["tasks"]["check/linux"]["answer_is_right"]] == ["broken", "new"]

        # 5. More runs of the flaky test of the first commit: 5 passes, 6 fails.
        added = cli(kube, "rerun", flaky, "--add", "2")
        assert (added.returncode, added.stdout) == (0, f"{flaky}: runs 4 -> 6 (2 more)\n"), added.stderr
        def reopened_and_ended():
            status = commit_testruns(kube, first)["flaky/linux"]["status"]
            # Reopened, it has 6 runs and no completionTime until the last of them ends.
            return status["runCounts"]["total"] == 6 and status.get("completionTime") and status

        rerun = wait_for(reopened_and_ended, timeout=60, interval=0.2, what="the added runs counted")
        assert (rerun["phase"], rerun["result"], rerun["runsSummary"], rerun["runCounts"]["total"]) == (
            "Failed", "flaky", "3/6", 6)
        assert [(run.run_index, run.result) for run in stored_runs(redis.url, first, "flaky/linux")][4:] == [
            (5, "passed"), (6, "failed")]

        # 6. The user cancels the slow test while it runs.
        slow = testrun_name("demo", second, "slow/linux")
        slow_pod = pod_builder.run_pod_name(slow, 1, 1)
        wait_for(lambda: slow_pod in kubelet.running() and
                 commit_testruns(kube, second)["slow/linux"]["status"].get("phase") == "Running", timeout=60,
                 what=lambda: f"the slow test running: kubelet running {kubelet.running()}, ran {kubelet.ran}, "
                              f"status {commit_testruns(kube, second)['slow/linux'].get('status')}")
        time.sleep(1)  # its agent is heartbeating by now
        asked = time.monotonic()
        kube.kubectl("patch", "testrun", slow, "-n", NAMESPACE, "--type", "merge", "-p", '{"spec": {"cancel": true}}')
        cancelled = wait_for(lambda: commit_testruns(kube, second)["slow/linux"]["status"].get("phase") == "Cancelled"
                             and commit_testruns(kube, second)["slow/linux"]["status"], timeout=30, interval=0.1,
                             what="the slow test Cancelled")
        wait_for(lambda: slow_pod in kubelet.ended_at, timeout=30, interval=0.1, what="the slow test's agent stopped")
        print(f"cancel reached the agent in {kubelet.ended_at[slow_pod] - asked:.1f}s")
        assert cancelled["result"] == "cancelled"
        assert kubelet.ended_at[slow_pod] - asked < 8, "the agent heartbeats every 5 s and must hear of it then"
        wait_for(lambda: kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"] == [],
                 what="every pod deleted")
        wait_for(lambda: [s["metadata"]["name"] for s in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")
                          ["items"] if s["metadata"]["name"].startswith(slow)] == [], what="its token Secret deleted")
        said = (kubelet.runs[slow_pod].volumes["workspace"] / "log.txt").read_text()
        assert "[testlooper] result: cancelled (cancelled through the API)" in said, said
        assert [(run.run_index, run.result) for run in stored_runs(redis.url, second, "slow/linux")] == [
            (1, "cancelled")]  # so history knows the commit is not tested in full
        # The cancelled TestRun counts nowhere in the branch tally, at once.
        tally = wait_for(lambda: [b for b in repo_object(kube)["status"]["branches"] if b.get("running") == 0],
                         timeout=10, interval=0.2, what="the tally without the cancelled run")
        assert tally == [{"name": "main", "commit": second, "passed": 1, "failed": 1, "flaky": 1, "running": 0}]
        samples = scrape(operator)
        assert value(samples, "testlooper_runs_finished_total", result="cancelled", **repo_labels) == 1
        # 6 runs of the first commit, 2 added, 6 of the second: 8 passed (the odd ones), 6 failed.
        assert {result: value(samples, "testlooper_runs_finished_total", result=result, **repo_labels)
                for result in ("passed", "failed")} == {"passed": 8, "failed": 6}
        assert "Traceback" not in operator.log(), operator.log()


def test_a_changed_testrun_is_read_again_at_once_not_after_the_descriptions_two_seconds(kube, tmp_path,
                                                                                         monkeypatch):
    """The worker API keeps what a run is for 2 s (an agent heartbeats every few seconds); a
    TestRun's change (spec.cancel) must not wait that long to reach the heartbeat's answer."""
    import asyncio

    from testlooper.cluster.context import OperatorContext, OperatorOptions
    from testlooper.cluster.runs import TestRunDirectory
    from testlooper.kube.api import KubeApi
    from testlooper.kube.objects import build_testrun

    kube.create_namespace(NAMESPACE)
    repo = kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos", {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "demo"},
        "spec": {"url": "https://git.example.com/demo.git"}})
    body = build_testrun(repo, commit="0123456789abcdef0123456789abcdef01234567", branch="main",
                         task={"name": "slow/linux", "kind": "test", "dependencies": {"src": {"kind": "source"}}},
                         kind="test", runs=1, depends_on=[], worker_pool=None, priority=0)
    name = kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns", body)["metadata"]["name"]
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig("operator"))
    api = KubeApi()

    path = f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns/{name}"

    async def cancel_seen() -> tuple[bool, ...]:
        directory = TestRunDirectory(OperatorContext(OperatorOptions(cache_dir=str(tmp_path)), api, None))
        run_id = pod_builder.run_id(NAMESPACE, name, 1, 1)
        directory.testrun_seen(kube.api("GET", path))
        before = (await directory.describe(run_id)).cancel
        kube.api("PATCH", path, {"spec": {"cancel": True}}, content_type="application/merge-patch+json")
        kept = (await directory.describe(run_id)).cancel  # within the 2 s: the description kept
        # What the TestRun's event does: a status write alone changes nothing an agent is told...
        directory.testrun_seen({**kube.api("GET", path), "spec": {"cancel": False}, "status": {"phase": "Running"}})
        still_kept = (await directory.describe(run_id)).cancel
        directory.testrun_seen(kube.api("GET", path))  # ...the cancel does
        seen = before, kept, still_kept, (await directory.describe(run_id)).cancel
        await api.aclose()
        return seen

    try:
        assert asyncio.run(cancel_seen()) == (False, False, False, True)
    finally:
        api.close()


STEADY = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
tests:
  steady/linux:
    command: sh src/steady.sh
    dependencies: {src: HEAD}
    runs: RUNS
"""
# It sleeps long enough to be running when the operator dies, and leaves a mark once done.
STEADY_SCRIPT = """\
sleep SECONDS
printf '{"one": true, "two": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
"""


def start_steady(kube, tmp_path, *, runs: int, seconds: float, max_workers: int) -> tuple[str, str]:
    """A Repo whose one commit runs steady/linux `runs` times, each `seconds` long; returns
    (the commit, its TestRun's name)."""
    work = GitRepo(tmp_path / "work")
    commit = work.commit({"testlooper.yml": STEADY.replace("RUNS", str(runs)),
                          "steady.sh": STEADY_SCRIPT.replace("SECONDS", str(seconds))}, "steady")
    bare = tmp_path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("push", "--quiet", str(bare), "HEAD:main")
    manifests = tmp_path / "steady.yaml"
    manifests.write_text(MANIFESTS.replace("{url}", f"file://{bare}").replace("maxWorkers: 6",
                                                                                f"maxWorkers: {max_workers}"))
    kube.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", str(manifests))
    return commit, testrun_name("demo", commit, "steady/linux")


def test_killing_and_restarting_the_operator_mid_run_loses_and_duplicates_nothing(kube, tmp_path, redis):
    """SIGKILL twice: once with two runs running and two waiting for room, once as the later
    runs start. Every run is recorded once, on one pod, and the counts are right."""
    kube.create_namespace(NAMESPACE)
    port = free_port()
    operator = operator_for(kube, tmp_path, redis.url, port)
    with operator, Kubelet(kube, tmp_path / "node") as kubelet:
        commit, name = start_steady(kube, tmp_path, runs=4, seconds=2, max_workers=2)
        wait_for(lambda: len(kubelet.running()) == 2, timeout=60, what="two runs running")
        operator.kill()
        operator.start()
        wait_for(lambda: len(kubelet.journal) >= 3 * 2, timeout=60, interval=0.05,
                 what="the first runs ended and a third started")
        operator.kill()
        operator.start()
        status = wait_for(lambda: (ended(kube, commit, {"steady/linux"}) or {}).get("steady/linux", {}).get("status"),
                          timeout=90, interval=0.2, what="the TestRun ended")
        assert kubelet.errors == []
        wait_for(lambda: len(kubelet.ran) == 4, what="the agents exited")
        assert sorted(kubelet.ran) == [pod_builder.run_pod_name(name, index, 1) for index in range(1, 5)]
        assert set(kubelet.ran.values()) == {"Succeeded"}
    assert (status["phase"], status["result"], status["runsSummary"], status["casesSummary"]) == (
        "Succeeded", "passed", "4/4", "8/8")
    assert status["runCounts"] == {"total": 4, "passed": 4, "failed": 0, "running": 0, "queued": 0,
                                   "errored": 0, "timedOut": 0}
    assert not status.get("infraRetries") and "active" not in status
    runs = stored_runs(redis.url, commit, "steady/linux")
    assert [(run.run_index, run.attempt, run.result, len(run.cases)) for run in runs] == [
        (index, 1, "passed", 2) for index in range(1, 5)]
    assert len(list_testruns(kube)) == 1
    assert "Traceback" not in operator.log(), operator.log()


def test_a_run_that_ends_while_the_operator_is_down_for_60_s_still_lands(kube, tmp_path, redis):
    """The agent retries its log, heartbeats and RESULT until the run's deadline, and the
    operator's heartbeat grace counts from its own start: a minute of outage loses nothing."""
    kube.create_namespace(NAMESPACE)
    port = free_port()
    operator = operator_for(kube, tmp_path, redis.url, port)
    with operator, Kubelet(kube, tmp_path / "node") as kubelet:
        commit, name = start_steady(kube, tmp_path, runs=1, seconds=2, max_workers=2)
        pod = pod_builder.run_pod_name(name, 1, 1)
        wait_for(lambda: [pod_object.get("status", {}).get("phase") for pod_object in
                          kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]] == ["Running"],
                 timeout=60, what="the run's pod Running (its workspace prepared)")
        operator.kill()
        killed = time.monotonic()
        summary = tmp_path / "node" / pod / "volumes" / "workspace" / "output" / "testSummary.json"
        wait_for(summary.exists, timeout=30, what="the task done while the operator is down")
        assert pod in kubelet.running()  # its agent waits to report
        time.sleep(max(0.0, 60 - (time.monotonic() - killed)))
        operator.start()
        restarted = time.monotonic()
        status = wait_for(lambda: (ended(kube, commit, {"steady/linux"}) or {}).get("steady/linux", {}).get("status"),
                          timeout=60, interval=0.2, what="the TestRun ended after the restart")
        print(f"result landed {time.monotonic() - restarted:.1f}s after the operator came back")
        wait_for(lambda: pod in kubelet.ran, what="the agent exited")
        assert kubelet.ran == {pod: "Succeeded"} and kubelet.errors == []
    assert (status["phase"], status["result"], status["runsSummary"], status["casesSummary"]) == (
        "Succeeded", "passed", "1/1", "2/2")
    assert not status.get("infraRetries")
    assert [(run.run_index, run.attempt, run.result) for run in stored_runs(redis.url, commit, "steady/linux")] == [
        (1, 1, "passed")]
    # The log the agent kept sending while the operator was down is in its Redis stream, whole.
    from testlooper.store.logstream import LogStreams

    streams = LogStreams.from_url(redis.url)
    chunks, complete = streams.read(pod_builder.run_id(NAMESPACE, name, 1, 1), count=100000)
    streamed = b"".join(chunk.data for chunk in chunks)
    written = (kubelet.runs[pod].volumes["workspace"] / "log.txt").read_bytes()
    assert complete and [chunk.offset for chunk in chunks] == sorted({chunk.offset for chunk in chunks})
    assert streamed == written, (streamed, written)


def test_a_result_kept_before_the_history_store_has_it_is_counted_only_once_it_has(kube, tmp_path, redis):
    """The worker API keeps a RESULT in Redis, then records it in the history store. A decision
    made between the two (another run's event) must not end the TestRun without that run's
    cases: it was seen once as a flaky TestRun ending with 6 of its 8 cases."""
    import redis as redis_client

    from testlooper.store import CaseResult, RunRecord
    from testlooper.workerapi.cluster import ClusterBackend

    kube.create_namespace(NAMESPACE)
    port = free_port()
    with operator_for(kube, tmp_path, redis.url, port) as operator:
        commit, name = start_steady(kube, tmp_path, runs=1, seconds=0, max_workers=2)
        pod = pod_builder.run_pod_name(name, 1, 1)
        pod_path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}"
        wait_for(lambda: [p["metadata"]["name"] for p in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")
                          ["items"]] == [pod], timeout=30, what="the run's pod")
        # What the worker API's first step keeps; the history store does not have it yet.
        result = {"result": "passed", "exit_code": 0, "duration_seconds": 1.0, "error": "",
                  "cases": [{"name": "one", "success": True}, {"name": "two", "success": True}]}
        client = redis_client.Redis.from_url(redis.url)
        client.set(ClusterBackend._key(pod_builder.run_id(NAMESPACE, name, 1, 1), "result"),
                   json.dumps({**result, "received_at": time.time()}))
        client.close()
        kube.api("PATCH", pod_path + "/status", {"status": {"phase": "Running", "startTime": "2026-12-01T10:00:00Z"}},
                 content_type="application/merge-patch+json")  # an event: a decision
        time.sleep(1.5)
        status = commit_testruns(kube, commit)["steady/linux"]["status"]
        assert (status["phase"], status["runCounts"]["running"]) == ("Running", 1), status
        store = open_store(redis.url)
        store.record_run(RunRecord(f"{NAMESPACE}/demo", commit, "steady/linux", "test", 1, 1, "passed", 1.0, 0,
                                   time.time(), "main", [CaseResult("one", True), CaseResult("two", True)]))
        store.close()
        kube.api("PATCH", pod_path + "/status", {"status": {"phase": "Succeeded"}},
                 content_type="application/merge-patch+json")
        status = wait_for(lambda: (ended(kube, commit, {"steady/linux"}) or {}).get("steady/linux", {}).get("status"),
                          timeout=30, what="the TestRun ended")
        assert (status["phase"], status["runsSummary"], status["casesSummary"]) == ("Succeeded", "1/1", "2/2")
        assert "Traceback" not in operator.log(), operator.log()
