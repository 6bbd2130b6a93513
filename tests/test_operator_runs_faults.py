"""Bad input and faults, end to end (issue 9): the real `testlooper operator` process with the
Kubernetes emulator, a real redis-server and real git, and a kubelet thread that plays the node,
including its faults: a pod evicted, deleted by hand, stuck pulling its image; Redis stopped
mid-run; tokens of one run used on another; hostile RESULT bodies; 50 runs queued against a
pool's caps while decisions race. Short grace periods come from the operator's flags.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from cluster_helpers import NAMESPACE, events, list_testruns
from kubelet import TestKubelet, run_agent_alone, running_status
from redis_server import RedisServer
from run_cluster import Kubelet, apply_repo, ended_testruns, pods_path, push_project, redis_url, start_operator  # noqa: F401
from run_helpers import wait_for
from test_operator_e2e import TESTRUN_FRESH_READ, check_rbac_subset
from testlooper.cli.main import main as cli_main
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name
from testlooper.store import open_store
from testlooper.store.logstream import LogStreams

SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
TESTRUNS_PATH = f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns"
PASS = 'printf \'{"works": true}\' > "$TEST_OUTPUT_DIR/testSummary.json"; echo "ran $0"\n'
FAIL = 'echo "this build is broken"; exit 1\n'
# Short limits, so that each fault is seen within a second or two.
FAST = ["--image-pull-grace", "1", "--missing-pod-grace", "1", "--result-grace", "2", "--heartbeat-grace", "20",
        "--pending-timeout", "60"]


def pool(**spec):
    return {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "linux"},
            "spec": {"provider": "kubernetes", "platform": "linux", "defaultImage": "busybox:1.36", "maxWorkers": 8,
                     **spec}}


def definitions(tests: dict[str, str], builds: dict[str, str] | None = None) -> str:
    """A definitions file: each test and build `name: extra YAML fields` on the linux environment."""
    text = "looper_version: 5\nenvironments:\n  linux:\n    platform: linux\n    image: {name: \"busybox:1.36\"}\n"
    for section, tasks in (("builds", builds or {}), ("tests", tests)):
        if tasks:
            text += f"{section}:\n" + "".join(f"  {name}/linux:\n    dependencies: {{src: HEAD}}\n{fields}"
                                             for name, fields in tasks.items())
    return text


def secret_token(kube, pod) -> str:
    secret = kube.api("GET", f"{SECRETS_PATH}/{pod['metadata']['annotations'][pod_builder.TOKEN_SECRET_ANNOTATION]}")
    return base64.b64decode(secret["data"][pod_builder.TOKEN_KEY]).decode()


def patch_pod_status(kube, name, status) -> int:
    code, _ = kube._call("PATCH", pods_path(name) + "/status", {"status": status},
                         content_type="application/merge-patch+json")
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KillableKubelet(TestKubelet):
    """A TestKubelet whose containers can be killed from outside, as a kubelet kills a deleted pod's."""

    __test__ = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processes = []

    def _start(self, pod, container, run):
        process = super()._start(pod, container, run)
        self.processes.append(process)
        return process

    def kill(self):
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class FaultKubelet(Kubelet):
    """The node, with faults: `plan(pod)` says what happens to each pod the operator creates:
    "run" (its containers run, tests/kubelet.py), "agent" (the agent alone, with the pod's
    token), "evict", "delete" (by hand, with kubectl), "image-pull" (stuck in ImagePullBackOff)
    or "hold" (Running, nothing runs until `release`). Each pod goes in a thread of its own.
    A deleted pod's containers are killed. Every list of the pods is a sample of what exists at
    once: `peak_pods` and `peak_cores` count the pods that are not Succeeded or Failed."""

    def __init__(self, kube, root, plan=lambda pod: "run"):
        super().__init__(kube, root)
        self.plan = plan
        self.seen: dict[str, float] = {}  # pod name -> when first listed (monotonic)
        self.seen_at: dict[str, float] = {}  # the same, time.time()
        self.ended: dict[str, float] = {}  # pod name -> when its end was patched
        self.peak_pods = 0
        self.peak_cores = 0.0
        self.released = threading.Event()
        self._nodes: dict[str, KillableKubelet] = {}
        self._threads: list[threading.Thread] = []

    def __exit__(self, *exc):
        self.released.set()
        super().__exit__(*exc)
        for node in list(self._nodes.values()):
            node.kill()
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self):
        while not self._stop.is_set():
            pods = self.kube.api("GET", pods_path())["items"]
            self._sample(pods)
            present = {pod["metadata"]["name"] for pod in pods if not pod["metadata"].get("deletionTimestamp")}
            for name, node in list(self._nodes.items()):
                if name not in present:
                    node.kill()  # deleted: its containers go
            for pod in pods:
                name = pod["metadata"]["name"]
                if name not in self.seen and name in present:
                    self.seen[name], self.seen_at[name] = time.monotonic(), time.time()
                    thread = threading.Thread(target=self._take, args=(pod,), daemon=True)
                    self._threads.append(thread)
                    thread.start()
            time.sleep(0.1)

    def _sample(self, pods):
        live = [pod for pod in pods if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        cores = sum(float(container.get("resources", {}).get("requests", {}).get("cpu", 0))
                    for pod in live for container in pod["spec"]["containers"] if container["name"] == "test")
        self.peak_pods = max(self.peak_pods, len(live))
        self.peak_cores = max(self.peak_cores, cores)

    def _take(self, pod):
        name = pod["metadata"]["name"]
        try:
            getattr(self, "_" + self.plan(pod).replace("-", "_"))(pod)
        except Exception as error:  # said by the test, not lost in a thread
            self.errors.append(f"{name}: {type(error).__name__}: {error}")
            self.ran[name] = "error"

    def _run(self, pod):
        name = pod["metadata"]["name"]
        secret_name = pod["metadata"]["annotations"][pod_builder.TOKEN_SECRET_ANNOTATION]
        secret = self.kube.api("GET", f"{SECRETS_PATH}/{secret_name}")
        node = self._nodes[name] = KillableKubelet(self.root / name, secrets={secret_name: secret})
        patch_pod_status(self.kube, name, {"startTime": _now(), "phase": "Pending"})
        run = node.run_pod(pod, timeout=120, on_running=lambda p: patch_pod_status(self.kube, name, running_status(p)))
        assert patch_pod_status(self.kube, name, run.status(pod)) in (200, 404)
        self.ended[name] = time.monotonic()
        self.ran[name] = run.phase

    def _agent(self, pod):
        name = pod["metadata"]["name"]
        patch_pod_status(self.kube, name, {"startTime": _now(), **running_status(pod)})
        secret_name = pod["metadata"]["annotations"][pod_builder.TOKEN_SECRET_ANNOTATION]
        secret = self.kube.api("GET", f"{SECRETS_PATH}/{secret_name}")
        (self.root / name).mkdir(parents=True)
        code = run_agent_alone(pod, {secret_name: secret}, self.root / name, timeout=120)
        phase = "Succeeded" if code == 0 else "Failed"
        assert patch_pod_status(self.kube, name, {"phase": phase}) in (200, 404)
        self.ended[name] = time.monotonic()
        self.ran[name] = phase

    def _evict(self, pod):
        name = pod["metadata"]["name"]
        patch_pod_status(self.kube, name, {"startTime": _now(), **running_status(pod)})
        time.sleep(0.3)
        # What the kubelet writes when node pressure makes it evict a pod.
        patch_pod_status(self.kube, name, {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51Mi.",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                            "message": "The node was low on resource: memory.", "lastTransitionTime": _now()}]})
        self.ran[name] = "Evicted"

    def _delete(self, pod):
        name = pod["metadata"]["name"]
        patch_pod_status(self.kube, name, {"startTime": _now(), **running_status(pod)})
        time.sleep(0.3)
        self.kube.kubectl("delete", "pod", name, "-n", NAMESPACE, "--wait=false")
        self.ran[name] = "Deleted"

    def _image_pull(self, pod):
        name = pod["metadata"]["name"]
        first = pod["spec"]["initContainers"][0]
        message = f'Back-off pulling image "{first["image"]}"'
        patch_pod_status(self.kube, name, {
            "phase": "Pending", "startTime": _now(),
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}],
            "initContainerStatuses": [{"name": first["name"], "image": first["image"], "imageID": "", "ready": False,
                                       "restartCount": 0, "started": False,
                                       "state": {"waiting": {"reason": "ImagePullBackOff", "message": message}}}]})
        self.ran[name] = "ImagePullBackOff"

    def _hold(self, pod):
        name = pod["metadata"]["name"]
        patch_pod_status(self.kube, name, {"startTime": _now(), **running_status(pod)})
        self.released.wait()
        status, _ = self.kube._call("GET", pods_path(name))
        if status == 200 and not self._stop.is_set():
            self._run(pod)
        else:
            self.ran[name] = "gone"


def task_of(pod) -> tuple[str, int, int]:
    """(TestRun name, run index, attempt) of a run pod."""
    _, testrun, index, attempt = pod["metadata"]["annotations"][pod_builder.RUN_ID_ANNOTATION].split(".")
    return testrun, int(index), int(attempt)


def by_task(kube) -> dict:
    return {item["spec"]["task"]: item for item in list_testruns(kube)}


def recorded_runs(redis_url, commit):
    store = open_store(redis_url)
    try:
        return store.runs(f"{NAMESPACE}/demo", commit, with_cases=True)
    finally:
        store.close()


# -- the flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--max-infra-retries", "many", "--max-infra-retries must be a whole number of retries (0 or more), not 'many'"),
    ("--max-infra-retries", "-1", "--max-infra-retries must be 0 or more (0: never retry), not -1"),
    ("--pending-timeout", "10m", "--pending-timeout must be a number of seconds, not '10m'"),
    ("--image-pull-grace", "0", "--image-pull-grace must be a number of seconds greater than 0, not '0'"),
    ("--heartbeat-grace", "-5", "--heartbeat-grace must be a number of seconds greater than 0, not '-5'"),
    ("--heartbeat-grace", "inf", "--heartbeat-grace must be a number of seconds greater than 0, not 'inf'"),
    ("--missing-pod-grace", "nan", "--missing-pod-grace must be a number of seconds greater than 0, not 'nan'"),
    ("--result-grace", "", "--result-grace must be a number of seconds, not ''"),
])
def test_a_bad_phase_machine_flag_is_one_clear_line_and_starts_nothing(tmp_path, capsys, flag, value, message):
    code = cli_main(["operator", "--namespace", "ci", "--cache-dir", str(tmp_path / "cache"), flag, value])
    captured = capsys.readouterr()
    assert code == 2 and captured.err == f"testlooper: error: {message}\n" and captured.out == ""
    assert not (tmp_path / "cache").exists()  # refused before anything was made


def test_the_phase_machine_flags_become_its_settings():
    from testlooper.cli.main import build_parser
    from testlooper.cli.operator_cmd import phase_settings
    from testlooper.decisions.phases import Settings

    parse = lambda *flags: phase_settings(build_parser().parse_args(["operator", "-n", "ci", *flags]))  # noqa: E731
    assert parse() == Settings()
    assert parse("--max-infra-retries", "0", "--pending-timeout", "90", "--image-pull-grace", "1.5",
                 "--heartbeat-grace", "12", "--missing-pod-grace", "2", "--result-grace", "3") == Settings(
        max_infra_retries=0, pending_timeout_seconds=90.0, image_pull_grace_seconds=1.5, heartbeat_grace_seconds=12.0,
        missing_pod_grace_seconds=2.0, result_grace_seconds=3.0)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["operator"].format_help().split())
    defaults = Settings()  # --help states the Settings' own defaults
    for flag, value in (("--max-infra-retries", defaults.max_infra_retries),
                        ("--pending-timeout", defaults.pending_timeout_seconds),
                        ("--image-pull-grace", defaults.image_pull_grace_seconds),
                        ("--heartbeat-grace", defaults.heartbeat_grace_seconds),
                        ("--missing-pod-grace", defaults.missing_pod_grace_seconds),
                        ("--result-grace", defaults.result_grace_seconds)):
        stated = re.search(re.escape(flag) + r" (?:N|SECONDS) [^\[]*?\(default: ([^)]*)\)", help_text)
        assert stated and stated.group(1) == f"{value:g}", flag


# -- infrastructure failures are retried, a real failure only per max_retries -------------------

def test_evicted_deleted_and_image_pull_pods_are_retried_and_a_failing_build_only_per_max_retries(kube, tmp_path, redis_url):
    tests = {name: "    command: sh src/pass.sh\n" for name in ("evicted", "deleted", "pulling", "never-pulls")}
    tests["needs-broken"] = "    command: sh src/pass.sh\n    dependencies: {src: HEAD, broken: broken/linux}\n"
    builds = {"broken": "    command: sh src/fail.sh\n    max_retries: 1\n    retry_wait_seconds: 2\n"}
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tests, builds).replace(
        "  needs-broken/linux:\n    dependencies: {src: HEAD}\n", "  needs-broken/linux:\n"),
        "pass.sh": PASS, "fail.sh": FAIL})
    names = {task: testrun_name("demo", commit, f"{task}/linux") for task in [*tests, *builds]}
    faults = {(names["evicted"], 1): "evict", (names["deleted"], 1): "delete", (names["pulling"], 1): "image-pull"}

    def plan(pod):
        testrun, _, attempt = task_of(pod)
        return "image-pull" if testrun == names["never-pulls"] else faults.get((testrun, attempt), "run")

    operator = start_operator(kube, tmp_path, redis_url, pool(), args=[*FAST, "--max-infra-retries", "1"])
    with operator, FaultKubelet(kube, tmp_path / "node", plan) as kubelet:
        apply_repo(kube, url)
        try:
            ended = wait_for(lambda: ended_testruns(kube, 6), timeout=90, interval=0.3, what="the six TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        status = {task.split("/")[0]: item["status"] for task, item in ended.items()}
        for task, reason in (("evicted", "Evicted"), ("deleted", "PodDeleted"), ("pulling", "ImagePullBackOff")):
            assert (status[task]["phase"], status[task]["result"], status[task]["runsSummary"]) == (
                "Succeeded", "passed", "1/1"), (task, status[task])
            assert [(a["run"], a["attempt"], a["reason"]) for a in status[task]["attempts"]] == [(1, 1, reason)], task
            assert status[task]["infraRetries"] == 1
            assert pod_builder.run_pod_name(names[task], 1, 2) in kubelet.seen, task  # the retry's pod
        assert status["evicted"]["attempts"][0]["message"].startswith("The node was low on resource: memory.")
        assert status["pulling"]["attempts"][0]["message"] == \
            'ImagePullBackOff: Back-off pulling image "testlooper/worker:test"'
        # --max-infra-retries 1: the second attempt lost to the infrastructure ends the run as an error.
        never = status["never-pulls"]
        assert (never["phase"], never["result"], never["runCounts"]["errored"]) == ("Error", "error", 1), never
        assert [(a["attempt"], a["reason"]) for a in never["attempts"]] == [(1, "ImagePullBackOff"), (2, "ImagePullBackOff")]
        # A build that fails for real: retried once (max_retries: 1) after retry_wait_seconds, then not again.
        broken = status["broken"]
        assert (broken["phase"], broken["result"], broken["runsSummary"]) == ("Failed", "failed", "0/1"), broken
        assert [(a["attempt"], a["reason"]) for a in broken["attempts"]] == [(1, "BuildRetried")]
        assert "infraRetries" not in broken or broken["infraRetries"] == 0
        second = pod_builder.run_pod_name(names["broken"], 1, 2)
        first_verdict = next(run for run in recorded_runs(redis_url, commit) if run.task == "broken/linux")
        received = first_verdict.started_at + first_verdict.duration_seconds  # when its RESULT came
        assert kubelet.seen_at[second] - received >= 2  # retry_wait_seconds: 2
        assert (status["needs-broken"]["phase"], status["needs-broken"]["result"]) == ("Failed", "blocked")
        time.sleep(2.5)  # past another retry wait: no third attempt of the build, no other pod
        pods_made = sorted(kubelet.seen)
        assert pod_builder.run_pod_name(names["broken"], 1, 3) not in pods_made
        assert len(pods_made) == 3 * 2 + 2 + 2, pods_made  # three faults retried once, never-pulls twice, the build twice
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events(kube)}
        assert {(names["evicted"], "Evicted"), (names["deleted"], "PodDeleted"), (names["pulling"], "ImagePullBackOff"),
                (names["never-pulls"], "RunError")} <= reasons
    recorded = {(run.task, run.attempt): run.result for run in recorded_runs(redis_url, commit)}
    assert recorded == {("evicted/linux", 2): "passed", ("deleted/linux", 2): "passed", ("pulling/linux", 2): "passed",
                        ("broken/linux", 1): "failed", ("broken/linux", 2): "failed"}
    assert "Traceback" not in operator.log(), operator.log()


# -- tokens and hostile RESULTs, through the operator's own server ------------------------------

def call(operator, method, run_id, action, token=None, body=b"", content_type="application/json"):
    """One worker API request to the operator; (status, answer)."""
    request = urllib.request.Request(operator.url(f"/runs/{urllib.parse.quote(run_id, safe='')}/{action}"),
                                     data=body if method in ("POST", "PUT") else None, method=method,
                                     headers={"Content-Type": content_type,
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def claimed_length_only(operator, run_id, token, length) -> int:
    """POSTs a RESULT's headers claiming `length` bytes, sends none of them, and returns the status."""
    connection = http.client.HTTPConnection("127.0.0.1", operator.port, timeout=10)
    try:
        connection.putrequest("POST", f"/runs/{run_id}/result")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


HOSTILE_NAMES = ["../../../../etc/passwd", "a/b/c", "..", "/absolute", "ünïcødé ✓ 测试 🧪", "tab\there", "%2e%2e%2f"]


def test_tokens_open_only_their_run_and_hostile_results_are_refused_or_stored_as_sent(kube, tmp_path, redis_url):
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions({"pair": "    command: sh src/pass.sh\n    runs: 2\n"}),
                                          "pass.sh": PASS})
    name = testrun_name("demo", commit, "pair/linux")
    operator = start_operator(kube, tmp_path, redis_url, pool(), args=FAST)
    with operator, FaultKubelet(kube, tmp_path / "node", plan=lambda pod: "hold") as kubelet:
        apply_repo(kube, url)
        pods = wait_for(lambda: len(items := kube.api("GET", pods_path())["items"]) == 2 and items,
                        timeout=30, what="both runs' pods")
        token = {task_of(pod)[1]: secret_token(kube, pod) for pod in pods}
        run_a, run_b = (pod_builder.run_id(NAMESPACE, name, index, 1) for index in (1, 2))
        assert call(operator, "GET", run_a, "assignment", token[1])[0] == 200
        # Run A's token on run B, everything the protocol has: 401, and nothing is told of B.
        for method, action, body in (("GET", "assignment", b""), ("GET", "source", b""), ("GET", "inputs/src", b""),
                                     ("POST", "heartbeat", b"{}"), ("POST", "log?offset=0", b"forged\n"),
                                     ("PUT", "artifacts/_?format=Tar", b"x"),
                                     ("POST", "result", json.dumps({"result": "failed"}).encode())):
            for wrong in (token[1], None, "Bearer", token[1][:-2] + "AA"):
                status, answer = call(operator, method, run_b, action, wrong, body)
                assert status == 401, (method, action, wrong, status, answer)
                assert json.loads(answer) == {"error": "a valid bearer token for this run is required"}
        # A token for a run id of another TestRun, or of another attempt of the same run: 401 too.
        for other in (pod_builder.run_id(NAMESPACE, "someone-else", 1, 1), pod_builder.run_id(NAMESPACE, name, 1, 2),
                      pod_builder.run_id("other-namespace", name, 1, 1)):
            assert call(operator, "GET", other, "assignment", token[1])[0] == 401, other

        # Hostile RESULT bodies on run A with its real token: refused, nothing recorded.
        assert claimed_length_only(operator, run_a, token[1], 64 * 1024 * 1024 + 1) == 413
        refused = [b"not json", b"[1, 2]", b'"passed"', b"{\"result\": \"passed\"", json.dumps({"result": "great"}).encode(),
                   json.dumps({"result": "passed", "cases": {"a": True}}).encode(),
                   json.dumps({"result": "passed", "cases": [{"name": "", "success": True}]}).encode(),
                   json.dumps({"result": "passed", "cases": [{"name": 7, "success": True}]}).encode(),
                   json.dumps({"result": "passed", "cases": [{"name": "x", "success": "yes"}]}).encode(),
                   json.dumps({"result": "passed", "cases": [{"name": "nul\u0000byte", "success": True}]}).encode(),
                   b'{"result": "passed", "cases": [{"name": "\\ud800", "success": true}]}',
                   json.dumps({"result": "passed", "cases": [{"name": "x" * 5000, "success": True}]}).encode(),
                   json.dumps({"result": "passed", "cases": [{"name": "x", "success": True,
                                                             "duration_seconds": -1}]}).encode()]
        for body in refused:
            status, answer = call(operator, "POST", run_a, "result", token[1], body)
            assert status == 400 and json.loads(answer)["error"], (body[:60], status, answer)
        assert recorded_runs(redis_url, commit) == []
        # An artifact named to climb out of its directory stays inside the artifact volume.
        status, _ = call(operator, "PUT", run_a, "artifacts/" + urllib.parse.quote("../../../escaped", safe="")
                         + "?format=Tar", token[1], b"not really a tarball", "application/octet-stream")
        assert status == 200
        artifacts = operator.cache_dir / "artifacts"
        stored = [os.path.join(folder, file) for folder, _, files in os.walk(tmp_path) for file in files
                  if "escaped" in file]
        assert stored and all(os.path.realpath(path).startswith(str(artifacts) + os.sep) for path in stored), stored
        # Names with "/", ".." and unicode are only names: stored as sent, read back the same.
        cases = [{"name": case, "success": index % 2 == 1, "duration_seconds": 0.5}
                 for index, case in enumerate(HOSTILE_NAMES)]
        status, answer = call(operator, "POST", run_a, "result", token[1],
                              json.dumps({"result": "failed", "exit_code": 1, "duration_seconds": 1.0,
                                          "cases": cases}).encode())
        assert status == 200, answer
        (record,) = recorded_runs(redis_url, commit)
        assert (record.run_index, record.attempt, record.result) == (1, 1, "failed")
        assert sorted((case.name, case.success) for case in record.cases) == sorted(
            (case["name"], case["success"]) for case in cases)
        # Run A is counted by its first RESULT (its pod goes); run B, released, runs its real agent.
        wait_for(lambda: [task_of(pod)[1] for pod in kube.api("GET", pods_path())["items"]] == [2],
                 what="run A's pod deleted once its RESULT counted")
        kubelet.released.set()
        status = wait_for(lambda: (ended := ended_testruns(kube, 1)) and ended["pair/linux"]["status"],
                          timeout=60, interval=0.3, what="the TestRun ended")
        assert kubelet.errors == [], kubelet.errors
        assert (status["phase"], status["result"], status["runsSummary"]) == ("Failed", "flaky", "1/2"), status
        assert status["failingCases"] == [case["name"] for case in cases if not case["success"]]
    records = {(run.run_index, run.attempt): run for run in recorded_runs(redis_url, commit)}
    assert sorted(records) == [(1, 1), (2, 1)] and records[(2, 1)].result == "passed"
    assert {case.name for case in records[(1, 1)].cases} == set(HOSTILE_NAMES)  # the agent's later post changed nothing
    assert token[1] not in operator.log() and token[2] not in operator.log()
    assert "Traceback" not in operator.log(), operator.log()


# -- Redis down mid-run ---------------------------------------------------------------------------

def metric_sum(operator, name) -> float:
    status, text = operator.get("/metrics")
    assert status == 200, text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def recorded_condition(testrun):
    return next((c for c in (testrun.get("status") or {}).get("conditions") or [] if c["type"] == "Recorded"), None)


def test_redis_down_mid_run_decisions_go_on_results_wait_and_land_once(kube, tmp_path):
    gate = tmp_path / "gate"
    wait_gate = ('echo "before the gate"\n'
                 f'i=0; while [ ! -e {gate}{{suffix}} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n')
    url, commit = push_project(tmp_path, {
        "testlooper.yml": definitions({"slow": "    command: sh src/slow.sh\n", "other": "    command: sh src/other.sh\n"}),
        "slow.sh": wait_gate.format(suffix="") + 'echo "after the gate"\n' + PASS,
        "other.sh": wait_gate.format(suffix=".never") + PASS})
    slow, other = (testrun_name("demo", commit, f"{task}/linux") for task in ("slow", "other"))
    redis = RedisServer(persistent=True).start()  # as a production Redis: what it acknowledged survives a restart
    try:
        # A heartbeat grace shorter than the outage: the agents could not beat while Redis was down.
        operator = start_operator(kube, tmp_path, redis.url, pool(maxWorkers=2), args=[*FAST, "--heartbeat-grace", "6"])
        with operator, FaultKubelet(kube, tmp_path / "node") as kubelet:
            apply_repo(kube, url)
            wait_for(lambda: len([p for p in kube.api("GET", pods_path())["items"]
                                  if (p.get("status") or {}).get("phase") == "Running"]) == 2,
                     timeout=30, what="both runs' pods running")
            wait_for(lambda: metric_sum(operator, "testlooper_store_up") == 1, what="the store up")
            redis.stop()
            stopped = time.monotonic()
            wait_for(lambda: metric_sum(operator, "testlooper_store_up") == 0, timeout=15, what="the store said down")
            # The operator goes on deciding: a cancel ends a TestRun, raised runs get pods.
            kube.api("PATCH", f"{TESTRUNS_PATH}/{other}", {"spec": {"cancel": True}},
                     content_type="application/merge-patch+json")
            kube.api("PATCH", f"{TESTRUNS_PATH}/{slow}", {"spec": {"runs": 2}},
                     content_type="application/merge-patch+json")
            wait_for(lambda: by_task(kube)["other/linux"]["status"]["phase"] == "Cancelled", timeout=20,
                     what="the other TestRun cancelled while Redis is down")
            wait_for(lambda: pod_builder.run_pod_name(slow, 2, 1) in kubelet.seen, timeout=20,
                     what="the raised run's pod made while Redis is down")
            condition = wait_for(lambda: recorded_condition(by_task(kube)["slow/linux"]), timeout=20,
                                 what="the condition Recorded")
            assert (condition["status"], condition["reason"]) == ("False", "StoreUnavailable"), condition
            assert "its agents retry" in condition["message"]
            assert metric_sum(operator, "testlooper_store_errors_total") > 0
            time.sleep(max(0.0, stopped + 8 - time.monotonic()))  # down longer than the heartbeat grace
            gate.touch()  # both runs finish; their logs and RESULTs wait for the store
            time.sleep(1)
            assert by_task(kube)["slow/linux"]["status"]["phase"] == "Running"
            redis.start()
            ended = wait_for(lambda: ended_testruns(kube, 2), timeout=60, interval=0.3, what="both TestRuns ended")
            assert kubelet.errors == [], kubelet.errors
            status = ended["slow/linux"]["status"]
            assert (status["phase"], status["result"], status["runsSummary"]) == ("Succeeded", "passed", "2/2"), status
            assert "attempts" not in status and status["cases"] == {"total": 2, "passed": 2, "failed": 0}
            wait_for(lambda: recorded_condition(by_task(kube)["slow/linux"]) is None, what="the condition cleared")
            assert metric_sum(operator, "testlooper_store_up") == 1
            assert ended["other/linux"]["status"]["result"] == "cancelled"
            wait_for(lambda: recorded_condition(by_task(kube)["other/linux"]) is None,
                     what="the cancelled TestRun's condition cleared too")
            assert len(kubelet.seen) == 3  # no attempt was retried
        runs = recorded_runs(redis.url, commit)
        assert [(run.task, run.run_index, run.attempt, run.result) for run in runs] == [
            ("slow/linux", 1, 1, "passed"), ("slow/linux", 2, 1, "passed")]
        streams = LogStreams.from_url(redis.url)
        for index in (1, 2):
            chunks, ended_log = streams.read(pod_builder.run_id(NAMESPACE, slow, index, 1))
            text = b"".join(chunk.data for chunk in chunks).decode()
            assert ended_log and text.count("before the gate") == 1 and text.count("after the gate") == 1, (index, text)
        streams._client.close()
        log = operator.log()
        assert "the store is unreachable" in log and "the store answers again" in log
        assert "Traceback" not in log, log
    finally:
        redis.stop()


# -- caps under load and racing decisions ---------------------------------------------------------

class Racer:
    """Pokes the TestRuns' decisions from outside while admission runs: labels patched through
    the API, and annotations through kubectl, over and over (each is a TestRun event)."""

    def __init__(self, kube):
        self.kube = kube
        self.patches = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._patch, daemon=True),
                         threading.Thread(target=self._annotate, daemon=True)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _patch(self):
        while not self._stop.is_set():
            for testrun in list_testruns(self.kube):
                status, _ = self.kube._call("PATCH", f"{TESTRUNS_PATH}/{testrun['metadata']['name']}",
                                            {"metadata": {"labels": {"poked": str(self.patches)}}},
                                            content_type="application/merge-patch+json")
                self.patches += status == 200
            time.sleep(0.2)

    def _annotate(self):
        while not self._stop.is_set():
            done = self.kube.kubectl("annotate", "testruns", "--all", "-n", NAMESPACE, f"poked={time.time()}",
                                     "--overwrite", check=False)
            self.patches += done.returncode == 0 and done.stdout.count("annotated")


def test_caps_hold_with_50_runs_queued_decisions_racing_and_a_restart(kube, tmp_path, redis_url):
    tests = {"many": "    command: sh src/pass.sh\n    runs: 30\n    min_cores: 1\n",
             "wide": "    command: sh src/pass.sh\n    runs: 10\n    min_cores: 2\n",
             **{f"one-{index}": "    command: sh src/pass.sh\n    min_cores: 1\n" for index in range(10)}}
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tests), "pass.sh": PASS})
    operator = start_operator(kube, tmp_path, redis_url, pool(maxWorkers=3, maxCores=4), args=FAST)
    started = time.monotonic()
    with operator, FaultKubelet(kube, tmp_path / "node", plan=lambda pod: "agent") as kubelet, Racer(kube) as racer:
        apply_repo(kube, url)
        # New TestRuns are admission's first (decisions/phases.py `leave_to_admission`): those a
        # round found no room for say so at once, not after admission's 10 s wait.
        waiting = wait_for(lambda: [t for t in list_testruns(kube) if (t.get("status") or {}).get("phase") == "Queued"],
                           timeout=8, interval=0.2, what="TestRuns Queued for want of room")
        assert all(t["status"]["message"] == "waiting for room in WorkerPool linux" for t in waiting), waiting
        # A restart midway: the new process counts the pods it finds, not what the old one knew.
        wait_for(lambda: len(recorded_runs(redis_url, commit)) >= 15, timeout=120, interval=0.3, what="15 runs recorded")
        operator.stop()
        operator.start()
        try:
            ended = wait_for(lambda: ended_testruns(kube, 12), timeout=240, interval=0.5, what="the 12 TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        print(f"50 runs through a pool of 3 workers and 4 cores, {racer.patches} racing patches: "
              f"{time.monotonic() - started:.1f}s")
        assert kubelet.peak_pods == 3, kubelet.peak_pods  # reached, never passed
        assert kubelet.peak_cores <= 4, kubelet.peak_cores
        assert racer.patches > 50
        for task, item in ended.items():
            status, runs = item["status"], {"many/linux": 30, "wide/linux": 10}.get(task, 1)
            assert (status["phase"], status["result"], status["runsSummary"]) == (
                "Succeeded", "passed", f"{runs}/{runs}"), (task, status)
            assert "attempts" not in status, (task, status["attempts"])
        assert len(kubelet.seen) == 50  # one pod per run: nothing retried, nothing made twice
    runs = recorded_runs(redis_url, commit)
    assert len(runs) == 50 and {run.result for run in runs} == {"passed"}
    assert sorted(run.run_index for run in runs if run.task == "many/linux") == list(range(1, 31))
    used = kube.permissions(client="operator")
    check_rbac_subset(used)
    assert TESTRUN_FRESH_READ in used  # the racer's writes conflict with ours: decided again, read fresh
    assert "Traceback" not in operator.log(), operator.log()


def test_the_recorded_condition_comes_once_keeps_its_time_and_goes_and_the_health_says_each_change():
    from testlooper.cluster.store_health import StoreHealth, recorded_conditions

    ready = {"type": "Ready", "status": "True", "reason": "Fine", "message": "", "lastTransitionTime": "t0"}
    assert recorded_conditions({"conditions": [ready]}, True, "t1") is None  # nothing to say, nothing written
    down = recorded_conditions({"conditions": [ready]}, False, "t1")
    assert down[0] == ready and {k: down[1][k] for k in ("type", "status", "reason", "lastTransitionTime")} == {
        "type": "Recorded", "status": "False", "reason": "StoreUnavailable", "lastTransitionTime": "t1"}
    assert recorded_conditions({"conditions": down}, False, "t2") is None  # said already: no write
    assert recorded_conditions({"conditions": down}, True, "t3") == [ready]
    changes = []
    health = StoreHealth()
    health.on_change = changes.append
    health.answered()
    health.failed("heartbeat", "ConnectionError")
    health.failed("append_log", "ConnectionError")
    before = time.time()
    health.answered()
    assert changes == [False, True] and health.up and health.back_since >= before


def test_a_new_testrun_says_a_phase_within_the_wait_even_when_every_admission_round_fails(kube, tmp_path, redis_url):
    """A new TestRun is admission's first, and says Queued at most admission's wait (10 s)
    after its creation even when no round can say: here every round fails (the run pods
    cannot be listed; a pool's spec.namespace the operator may not read gives the same). Those
    whose event made no decision (cluster/runs.py `_left_to_admission`) have their own timer
    for it (review of session 4: before, they kept no phase while admission failed)."""
    tests = {f"one-{index}": "    command: sh src/pass.sh\n" for index in range(8)}
    url, _ = push_project(tmp_path, {"testlooper.yml": definitions(tests), "pass.sh": PASS})
    operator = start_operator(kube, tmp_path, redis_url, pool(maxWorkers=3), args=FAST)
    with operator:
        # From now on the operator cannot list pods: count_pool_usage fails, so does every round.
        kube.inject_fault("list", 500, times=100000, resource="pods", client="operator")
        apply_repo(kube, url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_testruns(kube)) < 8:
            time.sleep(0.2)
        assert len(list_testruns(kube)) == 8
        # More TestRuns, one every 0.3 s: the rounds list the pools every 2 s, so some of these
        # events find that listing less than a second old (PoolReader.known).
        model = list_testruns(kube)[0]
        for index in range(10):
            kube.api("POST", TESTRUNS_PATH, {
                "apiVersion": model["apiVersion"], "kind": model["kind"],
                "metadata": {"name": f"extra-{index}", "labels": model["metadata"].get("labels") or {},
                             "annotations": model["metadata"].get("annotations") or {},
                             "ownerReferences": model["metadata"].get("ownerReferences") or []},
                "spec": model["spec"]})
            time.sleep(0.3)
        time.sleep(20)  # twice admission's wait (Settings.admission_wait_seconds = 10 s)
        said = {t["metadata"]["name"]: (t.get("status") or {}).get("phase") for t in list_testruns(kube)}
        assert "admission in namespace" in operator.log()  # the rounds did fail
        assert all(said.values()), f"TestRuns with no phase 20 s after their creation: {said}"


def test_a_pool_created_while_a_round_admits_a_new_testrun_is_not_filled_past_its_max_workers(kube, tmp_path, redis_url):
    """The round counts a new TestRun in the pool the round's listing places it in; its
    admitted decision places it again over the pools it reads itself (a second later, or after
    a WorkerPool event). Here the round's pod listing is slowed (a slow API server, 5,000
    pods) while a pool first by priority, room for one pod, is created: the runs admitted for
    "linux"'s room are not made in "tiny" (review of session 4: all three were), and "tiny"'s
    own round starts one."""
    from testlooper.kube.objects import build_testrun

    operator = start_operator(kube, tmp_path, redis_url, pool(maxWorkers=10), args=FAST)
    with operator:
        base = f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}"
        repo = kube.api("POST", f"{base}/repos", {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo",
                                                  "metadata": {"name": "demo"},
                                                  "spec": {"url": "https://git.example.com/demo.git"}})
        body = build_testrun(repo, commit="0123456789abcdef0123456789abcdef01234567", branch="main",
                             task={"name": "wide/linux", "kind": "test", "platform": "linux",
                                   "dependencies": {"src": {"kind": "source"}}},
                             kind="test", runs=3, depends_on=[], worker_pool=None, priority=0)
        # The next pod listings (the round's count of usage) take 3 s each.
        kube.inject_fault("list", 0, times=4, resource="pods", client="operator", delay=3)
        kube.api("POST", f"{base}/testruns", body)
        time.sleep(1.0)
        tiny = pool(maxWorkers=1, priority=10)
        tiny["metadata"]["name"] = "tiny"
        kube.api("POST", f"{base}/workerpools", tiny)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (list_testruns(kube)[0].get("status") or {}).get("phase"):
            time.sleep(0.2)
        time.sleep(1)
        pods = kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        in_tiny = [p["metadata"]["name"] for p in pods
                   if p["metadata"]["labels"].get("testlooper.dev/worker-pool") == "tiny"]
        status = list_testruns(kube)[0]["status"]
        assert len(in_tiny) <= 1, f"WorkerPool tiny (maxWorkers 1) holds {in_tiny} ({status})"


class WatchCloser:
    """Ends every open watch of the emulator every `every` s, as an API server restarting over
    and over would (kopf's watches and the operator's own watch of the run pods alike)."""

    def __init__(self, kube, every: float = 0.1):
        self.kube, self.every, self.closed = kube, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._close, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _close(self):
        while not self._stop.wait(self.every):
            self.closed += self.kube.close_watches()


def test_pod_events_still_arrive_while_the_api_server_keeps_ending_watches(kube, tmp_path, redis_url):
    """The run pods' watch is the operator's own (cluster/runs.py `_pod_watch`): ended by the
    server, it is made again from the last version it saw, so no pod event is lost. An evicted
    pod and one deleted by hand are retried at once, from their events, not at the heartbeat
    grace (20 s here) that a lost event would have left them to."""
    tests = {name: "    command: sh src/pass.sh\n" for name in ("evicted", "deleted", "fine")}
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tests), "pass.sh": PASS})
    names = {task: testrun_name("demo", commit, f"{task}/linux") for task in tests}
    faults = {(names["evicted"], 1): "evict", (names["deleted"], 1): "delete"}

    def plan(pod):
        testrun, _, attempt = task_of(pod)
        return faults.get((testrun, attempt), "run")

    operator = start_operator(kube, tmp_path, redis_url, pool(), args=FAST)
    with operator, FaultKubelet(kube, tmp_path / "node", plan) as kubelet, WatchCloser(kube) as closer:
        # And two of its watches answered 410 Gone (too old a version): listed again, quietly.
        kube.inject_fault("watch", 410, times=2, resource="pods", client="operator", message="too old a resource version")
        started = time.monotonic()
        apply_repo(kube, url)
        try:
            ended = wait_for(lambda: ended_testruns(kube, 3), timeout=60, interval=0.3, what="the three TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        took = time.monotonic() - started
    assert closer.closed >= 20, closer.closed  # the watches were ended, over and over
    assert took < 15, f"{took:.1f} s: some pod event was lost and waited for a timer"
    watches = [r for r in kube.requests(client="operator") if (r["resource"], r["verb"]) == ("pods", "watch")]
    assert len(watches) >= 5, len(watches)  # made again after each end (and after the two 410s)
    assert "are not watched now" not in operator.log()  # a 410 is no trouble to report
    for task, reason in (("evicted", "Evicted"), ("deleted", "PodDeleted")):
        status = ended[f"{task}/linux"]["status"]
        assert (status["phase"], status["runsSummary"]) == ("Succeeded", "1/1"), status
        assert [(a["attempt"], a["reason"]) for a in status["attempts"]] == [(1, reason)], status
    assert "Traceback" not in operator.log(), operator.log()
