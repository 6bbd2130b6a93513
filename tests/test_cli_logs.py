"""`testlooper logs`: a cluster user reads a TestRun's run logs, against the emulator and a real
redis-server, with the chunks posted through the worker API (test_workerapi_cluster's `Api`,
the operator's ClusterBackend on loopback). This test plays the operator's status writes; the
real operator and kubelet are in test_operator_runs_e2e.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from operator_process import OPERATOR_DIR
from redis_server import free_port
from test_workerapi_cluster import Api, mirror, redis_url, result_document  # noqa: F401 - fixtures
from testlooper.kube.objects import build_testrun
from testlooper.store.logstream import LogStreams
from testlooper.workerapi import tokens
from testlooper.workerapi.cluster import ClusterRun, make_run_id
from worker_helpers import call_api, call_api_json, make_task

NAMESPACE = "team-a"
SECRET = b"operator-secret-for-tests"  # the Api helper's
TESTRUNS = f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/testruns"
NOW = "2026-01-01T00:00:00Z"


def placed(attempt: int) -> dict:
    """A status.active entry, as the operator writes it for a run whose pod is made."""
    return {"attempt": attempt, "state": "Placed", "since": NOW}


class Cluster:
    """A TestRun in the emulator whose status this test writes, and its runs in the worker API."""

    def __init__(self, kube, api, runs: int):
        self.kube, self.api = kube, api
        kube.create_namespace(NAMESPACE)
        repo = kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos",
                        {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "demo"},
                         "spec": {"url": "https://git.example.com/demo.git"}})
        body = build_testrun(repo, commit=api.commit, branch="main", task={"name": "check/linux", "kind": "test"},
                             kind="test", runs=runs, depends_on=[], worker_pool=None, priority=0)
        self.name = kube.api("POST", TESTRUNS, body)["metadata"]["name"]
        self.offsets: dict[str, int] = {}

    def status(self, **fields) -> None:
        self.kube.api("PATCH", f"{TESTRUNS}/{self.name}/status", {"status": fields},
                      content_type="application/merge-patch+json")

    def start(self, index: int, attempt: int = 1) -> str:
        """The run (index, attempt) known to the worker API, as the operator describes it."""
        run_id = make_run_id(NAMESPACE, self.name, index, attempt)
        task = {**make_task("true"), "name": "check/linux"}
        self.api.runs.runs[run_id] = ClusterRun(
            run_id=run_id, git_dir=self.api.git_dir, commit=self.api.commit, repo=f"{NAMESPACE}/demo",
            task="check/linux", kind="test", run_index=index, attempt=attempt, branch="main",
            assignment={"task": task, "commit": self.api.commit, "commit_message": "", "run_index": index,
                        "attempt": attempt, "cores": 1, "ram_gb": 1})
        return run_id

    def log(self, run_id: str, data: bytes) -> None:
        """A chunk posted as the agent posts it."""
        offset = self.offsets.get(run_id, 0)
        status, answer = call_api(self.api, "POST", f"/runs/{run_id}/log?offset={offset}",
                                  token=tokens.run_token(SECRET, run_id), body=data)
        assert status == 200, answer
        self.offsets[run_id] = offset + len(data)

    def result(self, run_id: str, outcome: str = "passed") -> None:
        status, answer = call_api_json(self.api, "POST", f"/runs/{run_id}/result",
                                       token=tokens.run_token(SECRET, run_id), document=result_document(outcome))
        assert status == 200, answer


@pytest.fixture
def api(tmp_path, redis_url, mirror):  # noqa: F811
    served = Api(tmp_path, redis_url, mirror)
    yield served
    served.close()


def logs_command(kube, store_url, *args: str) -> list[str]:
    return [sys.executable, "-m", "testlooper", "logs", *args, *(["--store", store_url] if store_url else [])]


def logs_env(kube) -> dict:
    env = kube.client_env("user", namespace=NAMESPACE)
    env["PYTHONPATH"] = str(OPERATOR_DIR)
    env.pop("TESTLOOPER_STORE", None)
    return env


def logs(kube, store_url, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(logs_command(kube, store_url, *args), env=logs_env(kube), capture_output=True,
                          text=True, timeout=60)


def test_logs_shows_every_run_under_a_header_or_one_run_saying_its_attempt(kube, api):
    cluster = Cluster(kube, api, runs=3)
    first, second = cluster.start(1), cluster.start(2)
    cluster.log(first, b"run one starts\n")
    cluster.log(first, b"run one ends\n")
    cluster.log(second, "dévelopment ✓\n".encode())
    cluster.log(second, b"no newline at the end")
    cluster.result(first)
    cluster.status(phase="Running", startedRuns=2, active={"2": placed(1)})

    every = logs(kube, api.redis_url, cluster.name)
    assert every.returncode == 0, every.stderr
    assert every.stdout == ("==> run 1, attempt 1 <==\nrun one starts\nrun one ends\n"
                            "==> run 2, attempt 1 <==\ndévelopment ✓\nno newline at the end\n"
                            "==> run 3 of 3: not started yet <==\n")
    one = logs(kube, api.redis_url, cluster.name, "--run", "2", "-n", NAMESPACE)
    assert (one.returncode, one.stdout) == (0, "dévelopment ✓\nno newline at the end\n"), one.stderr
    assert one.stderr == f"testlooper: run 2 of {cluster.name}, attempt 1\n"


def test_logs_shows_the_latest_attempt_and_says_why_the_earlier_ones_were_lost(kube, api):
    cluster = Cluster(kube, api, runs=1)
    lost = cluster.start(1, attempt=1)
    cluster.log(lost, b"attempt one, its node went away\n")
    retried = cluster.start(1, attempt=2)
    cluster.log(retried, b"attempt two\n")
    cluster.result(retried)
    cluster.status(phase="Succeeded", result="passed", startedRuns=1,
                   attempts=[{"run": 1, "attempt": 1, "reason": "NodeLost", "message": "node gone", "time": NOW}])
    shown = logs(kube, api.redis_url, cluster.name, "--run", "1")
    assert (shown.returncode, shown.stdout) == (0, "attempt two\n"), shown.stderr
    assert shown.stderr == f"testlooper: run 1 of {cluster.name}, attempt 2 (earlier attempt 1: NodeLost)\n"


def test_a_gap_left_by_the_capped_stream_is_said_where_it_is(kube, api):
    api.backend.logs = LogStreams(api.client, max_entries=5)  # as the operator's, with a small cap
    cluster = Cluster(kube, api, runs=1)
    run_id = cluster.start(1)
    for index in range(300):
        cluster.log(run_id, b"line %03d\n" % index)
    cluster.status(phase="Running", startedRuns=1, active={"1": placed(1)})
    shown = logs(kube, api.redis_url, cluster.name, "--run", "1")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    kept = len(lines) - 1
    assert 5 <= kept < 300 and lines[-1] == "line 299"
    missing = (300 - kept) * 9
    assert lines[0] == (f"[testlooper logs] {missing} bytes of this log are missing here (bytes 0-{missing - 1}): "
                        "the operator keeps only the latest part of a long log")
    assert lines[1] == f"line {300 - kept:03d}"


def test_follow_prints_chunks_as_they_come_and_exits_when_the_run_ends(kube, api):
    cluster = Cluster(kube, api, runs=2)
    run_id = cluster.start(2)
    cluster.log(run_id, b"before\n")
    cluster.status(phase="Running", startedRuns=2, active={"1": placed(1),
                                                          "2": placed(1)})
    follower = subprocess.Popen(logs_command(kube, api.redis_url, cluster.name, "--run", "2", "-f"),
                                env=logs_env(kube), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"before\n"
        for index in range(3):
            cluster.log(run_id, b"chunk %d\n" % index)
            assert follower.stdout.readline() == b"chunk %d\n" % index  # as it comes, not at the end
        cluster.log(run_id, b"the last words")
        time.sleep(0.5)
        assert follower.poll() is None  # still running: the run has not ended
        cluster.result(run_id)  # the RESULT ends the log; run 1 (and the TestRun) still runs
        assert follower.wait(timeout=20) == 0
        assert follower.stdout.read() == b"the last words\n"
        assert follower.stderr.read().decode() == f"testlooper: run 2 of {cluster.name}, attempt 1\n"
    finally:
        follower.kill()
        follower.wait()


def test_follow_every_run_prefixes_lines_takes_new_runs_and_attempts_and_ends_with_the_testrun(kube, api):
    cluster = Cluster(kube, api, runs=2)
    cluster.status(phase="Queued", startedRuns=0)
    follower = subprocess.Popen(logs_command(kube, api.redis_url, cluster.name, "-f"), env=logs_env(kube),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = cluster.start(1)
        cluster.log(first, b"one: hello\none: half")
        cluster.status(phase="Running", startedRuns=1, active={"1": placed(1)})
        assert follower.stdout.readline() == b"[run 1] one: hello\n"
        cluster.log(first, b" a line\n")
        assert follower.stdout.readline() == b"[run 1] one: half a line\n"
        # Run 2 starts, loses its first attempt to the node, and its second one passes.
        lost = cluster.start(2)
        cluster.log(lost, b"two: first try\n")
        cluster.status(startedRuns=2, active={"2": placed(1)})
        assert follower.stdout.readline() == b"[run 2] two: first try\n"
        retried = cluster.start(2, attempt=2)
        cluster.status(active={"2": placed(2)},
                       attempts=[{"run": 2, "attempt": 1, "reason": "Evicted", "message": "evicted", "time": NOW}])
        assert follower.stdout.readline() == (b"[run 2] [testlooper logs] attempt 1 ended without a result "
                                              b"(Evicted); attempt 2 follows\n")
        cluster.log(retried, b"two: second try\n")
        assert follower.stdout.readline() == b"[run 2] two: second try\n"
        cluster.result(first)
        cluster.result(retried)
        time.sleep(1.5)
        assert follower.poll() is None  # the TestRun has not ended yet
        cluster.status(phase="Succeeded", result="passed", active=None)
        assert follower.wait(timeout=20) == 0
        assert follower.stdout.read() == b""
        assert follower.stderr.read().decode() == f"testlooper: TestRun {cluster.name} ended: Succeeded, passed\n"
    finally:
        follower.kill()
        follower.wait()


def test_ctrl_c_stops_following_quietly(kube, api):
    import signal

    cluster = Cluster(kube, api, runs=1)
    run_id = cluster.start(1)
    cluster.log(run_id, b"going on\n")
    cluster.status(phase="Running", startedRuns=1, active={"1": placed(1)})
    follower = subprocess.Popen(logs_command(kube, api.redis_url, cluster.name, "-f"), env=logs_env(kube),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"[run 1] going on\n"
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=20) == 130
        assert follower.stderr.read() == b""
    finally:
        follower.kill()
        follower.wait()


def test_logs_says_what_is_wrong_in_one_line(kube, api, tmp_path):
    cluster = Cluster(kube, api, runs=2)
    missing = logs(kube, api.redis_url, "no-such-run")
    assert (missing.returncode, missing.stderr) == (
        2, f"testlooper: error: no TestRun no-such-run in namespace {NAMESPACE} (kubectl get testruns -n {NAMESPACE})\n")
    out_of_range = logs(kube, api.redis_url, cluster.name, "--run", "3")
    assert (out_of_range.returncode, out_of_range.stderr) == (
        2, f"testlooper: error: TestRun {cluster.name} has 2 runs: --run must be from 1 to 2, not 3\n")
    assert logs(kube, api.redis_url, cluster.name, "--run", "0").returncode == 2
    nothing_started = logs(kube, api.redis_url, cluster.name)
    assert (nothing_started.returncode, nothing_started.stderr) == (
        2, f"testlooper: error: no run of TestRun {cluster.name} has started yet (the TestRun is Pending): "
           "follow it with -f\n")
    cluster.start(1)
    cluster.status(phase="Running", startedRuns=1, active={"1": placed(1)})
    no_log = logs(kube, api.redis_url, cluster.name, "--run", "1")
    assert (no_log.returncode, no_log.stderr) == (
        2, f"testlooper: error: run 1 of TestRun {cluster.name} (attempt 1) has no log yet: its pod has not "
           "started logging\n")
    not_started = logs(kube, api.redis_url, cluster.name, "--run", "2")
    assert not_started.stderr == (f"testlooper: error: run 2 of TestRun {cluster.name} has not started yet "
                                  "(the TestRun is Running): follow it with -f\n")
    no_store = logs(kube, "", cluster.name)
    assert (no_store.returncode, no_store.stderr) == (
        2, "testlooper: error: the logs are in the operator's Redis: pass --store redis://HOST:PORT/DB "
           "(or set $TESTLOOPER_STORE)\n")
    port = free_port()
    down = logs(kube, f"redis://127.0.0.1:{port}/0", cluster.name, "-f")
    assert down.returncode == 2 and down.stderr.startswith(
        f"testlooper: error: cannot reach the store redis://127.0.0.1:{port}/0: ")
    assert "Connection refused" in down.stderr and len(down.stderr.splitlines()) == 1
    sqlite = logs(kube, str(tmp_path / "history.db"), cluster.name)
    assert sqlite.stderr.startswith("testlooper: error: --store must be the operator's redis:// URL")
    for done in (missing, out_of_range, no_log, down, sqlite):
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_store_going_down_while_following_is_one_line(kube, tmp_path, mirror):  # noqa: F811
    from redis_server import RedisServer

    server = RedisServer().start()
    served = Api(tmp_path, server.url, mirror)
    try:
        cluster = Cluster(kube, served, runs=1)
        run_id = cluster.start(1)
        cluster.log(run_id, b"up\n")
        cluster.status(phase="Running", startedRuns=1, active={"1": placed(1)})
        follower = subprocess.Popen(logs_command(kube, server.url, cluster.name, "-f"), env=logs_env(kube),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert follower.stdout.readline() == b"[run 1] up\n"
            server.stop()
            assert follower.wait(timeout=60) == 2
            stderr = follower.stderr.read().decode()
            assert stderr.startswith("testlooper: error: cannot reach the store redis://") and \
                len(stderr.splitlines()) == 1, stderr
        finally:
            follower.kill()
            follower.wait()
    finally:
        served.close()
        server.stop()

