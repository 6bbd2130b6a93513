"""The operator's worker API backend against real services: a real redis-server, a real bare git
mirror, the real agent process, and the history store's own Redis code."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace

import pytest
import redis

from gitrepo import GitRepo
from redis_server import RedisServer
from testlooper.store.redis_store import RedisHistoryStore
from testlooper.workerapi import tokens
from testlooper.workerapi.cluster import (
    ClusterBackend, ClusterRun, DiskArtifactStore, InputSource, make_run_id, parse_run_id,
)
from testlooper.workerapi.local import ThreadedSite
from testlooper.workerapi.protocol import build_root_app
from worker_helpers import agent_environment, artifact, call_api, call_api_json, make_task, stage

SECRET = b"operator-secret-for-tests"
COMMIT_FILES = {"README": "the project\n", "lib/util.sh": "echo util-from-lib\n", "run.sh": "echo ran\n"}


class Runs:
    """The operator's view of its runs, as the RunDirectory contract asks (a dict here: which
    runs exist is the operator's TestRuns' business, not this backend's)."""

    def __init__(self):
        self.runs = {}

    async def describe(self, run_id):
        return self.runs.get(run_id)


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture
def mirror(tmp_path):
    work = GitRepo(tmp_path / "upstream")
    commit = work.commit(COMMIT_FILES, "first")
    bare = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "--quiet", "--mirror", str(work.path), str(bare)], check=True)
    return str(bare), commit


class Api:
    """A ClusterBackend served on loopback; `restart()` makes a new one on the same port, state."""

    def __init__(self, tmp_path, redis_url, mirror):
        self.runs = Runs()
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.client.flushdb()
        self.history = RedisHistoryStore(redis_url)
        self.artifacts = DiskArtifactStore(str(tmp_path / "artifacts"))
        self.git_dir, self.commit = mirror
        self.results = []
        self.port = 0
        self._start()

    def _start(self):
        async def on_result(run, result):
            self.results.append((run.run_id, result["result"]))

        self.backend = ClusterBackend(secret=SECRET, runs=self.runs, client=self.client, history=self.history,
                                      artifacts=self.artifacts, on_result=on_result)
        self.site = ThreadedSite(lambda: build_root_app(self.backend), port=self.port)
        self.site.start()
        self.port = int(self.site.url.rsplit(":", 1)[1])
        self.url = self.site.url

    def restart(self):
        self.site.stop()
        self._start()

    def add(self, index, *, task=None, attempt=1, inputs=None, testrun="tr"):
        run_id = make_run_id("ns", testrun, index, attempt)
        task = task or make_task("true")
        self.runs.runs[run_id] = ClusterRun(
            run_id=run_id, git_dir=self.git_dir, commit=self.commit, repo="ns/repo", task=task["name"],
            kind=task["kind"], run_index=index, attempt=attempt, branch="main", inputs=inputs or {},
            assignment={"task": task, "commit": self.commit, "commit_message": "first\n", "run_index": index,
                        "attempt": attempt, "cores": 1, "ram_gb": 1})
        return run_id, tokens.run_token(SECRET, run_id)

    def close(self):
        self.site.stop()
        self.history.close()


@pytest.fixture
def api(tmp_path, redis_url, mirror):
    served = Api(tmp_path, redis_url, mirror)
    yield served
    served.close()


def run_agent(api, run_id, token, workdir):
    done = subprocess.run([sys.executable, "-m", "testlooper.worker.agent", "--api", api.url, "--run-id", run_id,
                           "--workdir", str(workdir), "--heartbeat-seconds", "0.2"],
                          env=agent_environment(token), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return api.backend


def log_text(api, run_id):
    chunks, ended = api.backend.logs.read(run_id, count=100000)
    return b"".join(chunk.data for chunk in chunks).decode(), ended


# -- tokens --------------------------------------------------------------------------------------


def test_tokens_are_derived_from_the_secret_and_open_only_their_run():
    token = tokens.run_token(SECRET, "ns.tr.1.1")
    assert len(token) == 64 and token == tokens.run_token(SECRET, "ns.tr.1.1")
    assert tokens.verify(SECRET, "ns.tr.1.1", token)
    assert not tokens.verify(SECRET, "ns.tr.2.1", token)
    assert not tokens.verify(b"another secret", "ns.tr.1.1", token)
    assert not tokens.verify(SECRET, "ns.tr.1.1", "") and not tokens.verify(SECRET, "ns.tr.1.1", token.upper())
    with pytest.raises(ValueError):
        tokens.run_token(b"", "ns.tr.1.1")


def test_run_ids_name_testrun_index_and_attempt():
    assert parse_run_id(make_run_id("team-a", "web-3f2a", 7, 2)) == ("team-a", "web-3f2a", 7, 2)
    for bad in ("a.b.c", "a.b.1.x", "a..1.1", "a.b.1.1.1"):
        with pytest.raises(ValueError):
            parse_run_id(bad)


def test_a_token_for_run_a_gets_401_on_run_b(api):
    run_a, token_a = api.add(1)
    run_b, token_b = api.add(2)

    for path in ("assignment", "source"):
        assert call_api(api, "GET", f"/runs/{run_b}/{path}", token=token_a)[0] == 401
    status, answer = call_api_json(api, "POST", f"/runs/{run_b}/result", token=token_a,
                                   document={"result": "passed", "cases": []})
    assert status == 401 and "token" in answer["error"]
    assert call_api(api, "POST", f"/runs/{run_b}/log?offset=0", token=token_a, body=b"forged")[0] == 401
    assert api.backend.logs.size(run_b) == 0 and api.history.runs("ns/repo", api.commit) == []
    # The token is checked before the run is looked up: a stranger learns nothing of which runs exist.
    assert call_api(api, "GET", "/runs/ns.gone.1.1/assignment", token=token_a)[0] == 401
    assert call_api(api, "GET", "/runs/ns.gone.1.1/assignment",
                    token=tokens.run_token(SECRET, "ns.gone.1.1"))[0] == 404
    assert call_api(api, "GET", f"/runs/{run_a}/assignment", token=token_a)[0] == 200


def test_the_same_token_opens_its_run_after_a_restart(api):
    run_id, token = api.add(1)
    api.restart()
    status, assignment = call_api_json(api, "GET", f"/runs/{run_id}/assignment", token=token)
    assert status == 200 and assignment["run_id"] == run_id and assignment["source"] == {"url": "source"}


# -- a real agent against it ---------------------------------------------------------------------


def test_a_build_and_its_consumer_run_from_the_mirror_with_logs_in_redis_and_history_recorded(api, tmp_path):
    build = make_task(stages=[stage('cat "$TEST_SRC_DIR/README"; mkdir -p "$TEST_BUILD_OUTPUT_DIR/out"; '
                                    'echo built > "$TEST_BUILD_OUTPUT_DIR/out/x.txt"',
                                    artifacts=[artifact("out", "out")])], kind="build")
    build_run, build_token = api.add(1, task=build, testrun="build")
    run_agent(api, build_run, build_token, tmp_path / "w1")

    text, ended = log_text(api, build_run)
    assert "the project" in text and "[testlooper] result: passed" in text and ended
    assert api.artifacts.find(build_run, "out") is not None

    test = make_task('cat bin/x.txt lib/util.sh; sh "$TEST_SRC_DIR/run.sh"; '
                     'echo \'{"a/../b": true, "ünï": false}\' '
                     '> "$TEST_OUTPUT_DIR/testSummary.json"')
    test_run, test_token = api.add(1, task=test, testrun="test", inputs={
        "bin": InputSource("build", run_id=build_run, artifact="out"),
        "lib": InputSource("source", path="lib"),
    })
    run_agent(api, test_run, test_token, tmp_path / "w2")
    text, _ = log_text(api, test_run)
    assert "built" in text and "util-from-lib" in text and "ran" in text

    recorded = {run.task: run for run in api.history.runs("ns/repo", api.commit, with_cases=True)}
    assert recorded["build/linux"].result == "passed"
    assert recorded["test/linux"].result == "passed"  # the command passed; one of its cases did not
    assert {case.name: case.success for case in recorded["test/linux"].cases} == {"a/../b": True, "ünï": False}
    assert sorted(api.results) == [(build_run, "passed"), (test_run, "passed")]


def test_a_commit_git_cannot_archive_is_404_not_an_empty_tar(api):
    run_id, token = api.add(1)
    api.runs.runs[run_id] = replace(api.runs.runs[run_id], commit="0" * 40)
    status, body = call_api(api, "GET", f"/runs/{run_id}/source", token=token)
    assert status == 404 and b"cannot archive" in body


def test_the_source_tarball_is_the_commit(api):
    run_id, token = api.add(1)
    status, body = call_api(api, "GET", f"/runs/{run_id}/source", token=token)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        files = {member.name: tar.extractfile(member).read().decode() for member in tar if member.isfile()}
    assert files == COMMIT_FILES


# -- recording exactly once ----------------------------------------------------------------------


def result_document(outcome="passed", cases=()):
    return {"result": outcome, "exit_code": 0 if outcome == "passed" else 1, "duration_seconds": 1.5, "error": "",
            "cases": [{"name": name, "success": success, "duration_seconds": 0.1} for name, success in cases]}


def test_a_result_posted_twice_lands_once_and_the_first_counts(api):
    run_id, token = api.add(1)
    first = result_document("failed", [("case", False)])
    assert call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=first)[0] == 200
    second = result_document("passed", [("case", True)])
    assert call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=second)[0] == 200

    (run,) = api.history.runs("ns/repo", api.commit, with_cases=True)
    assert run.result == "failed" and [case.success for case in run.cases] == [False]
    counts = api.history.case_counts("ns/repo", [api.commit])[api.commit]
    assert counts[("test/linux", "case")] == (1, 1)


def test_fifty_results_of_one_testrun_at_once_each_land_once(api):
    runs = [api.add(index) for index in range(1, 51)]
    statuses = []

    def post(run_id, token, index):
        document = result_document("passed" if index % 5 else "failed", [("shared", index % 5 != 0)])
        statuses.append(call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=document)[0])
        statuses.append(call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=document)[0])

    threads = [threading.Thread(target=post, args=(run_id, token, index))
               for index, (run_id, token) in enumerate(runs, start=1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 100
    recorded = api.history.runs("ns/repo", api.commit)
    assert sorted(run.run_index for run in recorded) == list(range(1, 51))
    counts = api.history.case_counts("ns/repo", [api.commit])[api.commit]
    assert counts[("test/linux", "shared")] == (50, 10) and counts[("test/linux", "")] == (50, 10)


def test_a_result_arriving_again_after_a_restart_lands_once(api):
    run_id, token = api.add(3)
    document = result_document("passed", [("case", True)])
    assert call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=document)[0] == 200
    api.restart()
    assert call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=document)[0] == 200
    assert len(api.history.runs("ns/repo", api.commit)) == 1
    assert api.history.case_counts("ns/repo", [api.commit])[api.commit][("test/linux", "case")] == (1, 0)


def test_a_result_that_could_not_be_recorded_is_recorded_when_posted_again(api, tmp_path, redis_url):
    """The agent's retry after a 503 (the store was down) is what records it; nothing is lost."""
    run_id, token = api.add(4)
    healthy = api.backend.history
    down = RedisServer().start()  # the history in a Redis of its own, which then goes away
    api.backend.history = RedisHistoryStore(down.url)
    down.stop()
    try:
        status, answer = call_api_json(api, "POST", f"/runs/{run_id}/result", token=token,
                                       document=result_document())
        assert status == 503 and "cannot record" in answer["error"]
    finally:
        api.backend.history = healthy
    assert call_api_json(api, "POST", f"/runs/{run_id}/result", token=token, document=result_document())[0] == 200
    assert len(api.history.runs("ns/repo", api.commit)) == 1


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"result": "great"}).encode(), 400),
    (json.dumps({"result": "passed", "cases": [{"name": "", "success": True}]}).encode(), 400),
    (json.dumps({"result": "passed", "cases": [{"name": "x", "success": "yes"}]}).encode(), 400),
    (b'{"result": "passed", "cases": [{"name": "\\ud800", "success": true}]}', 400),
    (json.dumps({"result": "passed", "cases": [{"name": "a\x00b", "success": True}]}).encode(), 400),
    (json.dumps({"result": "passed", "cases": [{"name": "x" * 5000, "success": True}]}).encode(), 400),
    (json.dumps({"result": "passed", "cases": [{"name": "x", "success": True,
                                                "duration_seconds": "long"}]}).encode(), 400),
])
def test_malformed_results_are_refused_and_nothing_is_recorded(api, body, status):
    run_id, token = api.add(1)
    answer_status, answer = call_api(api, "POST", f"/runs/{run_id}/result", token=token, body=body)
    assert answer_status == status and json.loads(answer)["error"]
    assert api.history.runs("ns/repo", api.commit) == [] and api.results == []


def test_a_result_body_over_the_cap_is_refused_unread(api):
    run_id, token = api.add(1)
    status, answer = call_api(api, "POST", f"/runs/{run_id}/result", token=token,
                              headers={"Content-Length": str(65 * 1024 * 1024)})
    assert status == 413 and b"at most" in answer


@pytest.mark.parametrize("segment", ["..%2F..%2Fescape", "%2E%2E", "a%2Fb", "%C3%BCn%C3%AF"])
def test_hostile_artifact_names_stay_inside_the_artifact_volume(api, tmp_path, segment):
    run_id, token = api.add(1)
    assert call_api(api, "PUT", f"/runs/{run_id}/artifacts/{segment}?format=Tar", token=token, body=b"data")[0] == 200
    root = os.path.realpath(api.artifacts.root)
    stored = [os.path.join(directory, name) for directory, _, names in os.walk(root) for name in names]
    assert len(stored) == 1 and os.path.realpath(stored[0]).startswith(root + os.sep)
    assert not (tmp_path / "escape").exists()


def test_log_chunks_keep_the_protocol_resent_and_gaps(api):
    run_id, token = api.add(1)
    assert call_api_json(api, "POST", f"/runs/{run_id}/log?offset=0", token=token) == (200, {"ok": True, "size": 0})
    assert call_api(api, "POST", f"/runs/{run_id}/log?offset=0", token=token, body=b"hello ")[0] == 200
    assert call_api(api, "POST", f"/runs/{run_id}/log?offset=0", token=token, body=b"hello ")[0] == 200
    status, answer = call_api(api, "POST", f"/runs/{run_id}/log?offset=100", token=token, body=b"gap")
    assert status == 409 and json.loads(answer)["size"] == 6
    assert call_api(api, "POST", f"/runs/{run_id}/log?offset=3", token=token, body=b"lo world")[0] == 200
    assert log_text(api, run_id) == ("hello world", False)


def test_heartbeats_are_kept_in_redis_and_answer_cancel(api):
    import asyncio

    run_id, token = api.add(1)
    assert call_api_json(api, "POST", f"/runs/{run_id}/heartbeat", token=token,
                         document={"phase": "stage 1/1"}) == (200, {"cancel": False})
    api.runs.runs[run_id] = replace(api.runs.runs[run_id], cancel=True)
    assert call_api_json(api, "POST", f"/runs/{run_id}/heartbeat", token=token,
                         document={"phase": "stage 1/1"}) == (200, {"cancel": True})
    beat = asyncio.run(api.backend.last_heartbeat(run_id))
    assert beat["phase"] == "stage 1/1" and beat["time"] > 0


def test_what_is_kept_for_many_runs_is_read_at_once_each_its_own(api):
    import asyncio

    (beating, beating_token), (finished, finished_token), (silent, _) = api.add(1), api.add(2), api.add(3)
    assert call_api_json(api, "POST", f"/runs/{beating}/heartbeat", token=beating_token,
                         document={"phase": "stage 1/1"})[0] == 200
    assert call_api_json(api, "POST", f"/runs/{finished}/result", token=finished_token,
                         document=result_document("passed", [("case", True)]))[0] == 200
    kept = asyncio.run(api.backend.kept_for([beating, finished, silent]))
    assert kept[0][0] is None and kept[0][1]["phase"] == "stage 1/1"
    assert kept[1][0]["result"] == "passed" and kept[1][1] is None
    assert kept[2] == (None, None) and asyncio.run(api.backend.kept_for([])) == []


# -- the source cache ----------------------------------------------------------------------------


def test_the_source_cache_makes_one_tarball_for_many_runs_and_serves_the_same_bytes(api, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from testlooper.workerapi.cluster import SourceCache

    streamed_run, streamed_token = api.add(1)
    _, streamed = call_api(api, "GET", f"/runs/{streamed_run}/source", token=streamed_token)
    api.backend.source_cache = SourceCache(str(tmp_path / "sources"))
    runs = [api.add(index) for index in range(2, 12)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda run: call_api(api, "GET", f"/runs/{run[0]}/source", token=run[1]), runs))
    assert all(answer == (200, streamed) for answer in answers)
    assert [name for name in os.listdir(tmp_path / "sources")] and len(os.listdir(tmp_path / "sources")) == 1

    lib_run, lib_token = api.add(20, inputs={"lib": InputSource("source", path="lib")})
    status, body = call_api(api, "GET", f"/runs/{lib_run}/inputs/lib", token=lib_token)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert [member.name for member in tar if member.isfile()] == ["util.sh"]
    # A tree git cannot archive is not cached, and still answers 404.
    api.runs.runs[lib_run] = replace(api.runs.runs[lib_run], commit="0" * 40)
    assert call_api(api, "GET", f"/runs/{lib_run}/source", token=lib_token)[0] == 404


def test_the_source_cache_keeps_at_most_its_size_dropping_the_least_recently_served(api, tmp_path):
    from testlooper.workerapi.cluster import SourceCache

    api.backend.source_cache = SourceCache(str(tmp_path / "sources"), max_bytes=15_000)
    lib_run, token = api.add(1, inputs={"lib": InputSource("source", path="lib")})
    assert call_api(api, "GET", f"/runs/{lib_run}/source", token=token)[0] == 200  # ~10 KB
    assert call_api(api, "GET", f"/runs/{lib_run}/inputs/lib", token=token)[0] == 200  # ~10 KB: the first goes
    assert len(os.listdir(tmp_path / "sources")) == 1
    assert call_api(api, "GET", f"/runs/{lib_run}/source", token=token)[0] == 200  # made again


def test_the_operator_serves_the_worker_api_beside_its_health_and_webhooks(api):
    from testlooper.cluster.context import OperatorContext, OperatorOptions
    from testlooper.cluster.http import build_app

    context = OperatorContext(OperatorOptions(), api=None, metrics=None)
    site = ThreadedSite(lambda: build_app(context, worker_backend=api.backend))
    site.start()
    try:
        run_id, token = api.add(1)

        class At:
            url = site.url

        assert call_api(At, "GET", "/healthz")[0] == 200
        status, assignment = call_api_json(At, "GET", f"/runs/{run_id}/assignment", token=token)
        assert status == 200 and assignment["run_id"] == run_id
        assert call_api(At, "GET", f"/runs/{run_id}/assignment", token="forged")[0] == 401
        status, _ = call_api(At, "GET", f"/runs/{run_id}/source", token=token)
        assert status == 200
    finally:
        site.stop()


def test_redis_down_makes_log_heartbeat_and_result_503s_that_the_agent_retries(api):
    down = RedisServer().start()
    client = redis.Redis.from_url(down.url, socket_connect_timeout=1)
    down.stop()
    backend = ClusterBackend(secret=SECRET, runs=api.runs, client=client, history=api.history,
                             artifacts=api.artifacts)
    site = ThreadedSite(lambda: build_root_app(backend))
    site.start()
    try:
        run_id, token = api.add(1)

        class At:
            url = site.url

        for method, path, body in (("POST", "log?offset=0", b"x"), ("POST", "heartbeat", b"{}"),
                                   ("POST", "result", json.dumps(result_document()).encode())):
            status, answer = call_api(At, method, f"/runs/{run_id}/{path}", token=token, body=body)
            assert status == 503 and b"Redis is unreachable" in answer, (path, status, answer)
        assert api.history.runs("ns/repo", api.commit) == []  # nothing half-recorded
    finally:
        site.stop()


# -- the agent's download ------------------------------------------------------------------------


def test_the_agent_is_served_without_a_token_byte_for_byte_and_runs_a_task(api, tmp_path):
    from testlooper.workerapi.protocol import AGENT_FILE

    status, body = call_api(api, "GET", "/agent.py")
    assert status == 200 and body == open(AGENT_FILE, "rb").read()
    assert call_api(api, "POST", "/agent.py", body=b"x")[0] == 405
    assert call_api(api, "GET", "/agent.py/x")[0] == 404
    # What was downloaded is enough on its own: a machine with only that file completes a run.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "agent.py").write_bytes(body)
    run_id, token = api.add(1, task=make_task("echo from-the-downloaded-agent"))
    done = subprocess.run([sys.executable, "-S", "-E", str(tmp_path / "bare" / "agent.py"), "--api", api.url,
                           "--run-id", run_id, "--workdir", str(tmp_path / "w"), "--heartbeat-seconds", "0.2"],
                          env={**agent_environment(token), "PYTHONPATH": ""}, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path / "bare")
    assert done.returncode == 0, done.stderr
    text, _ = log_text(api, run_id)
    assert "from-the-downloaded-agent" in text and api.results[-1] == (run_id, "passed")


@pytest.mark.parametrize("method, path", [("POST", "heartbeat"), ("POST", "result"),
                                          ("PUT", "artifacts/output?format=Tar")])
def test_a_worker_that_dies_mid_request_is_a_quiet_400_not_a_traceback(api, caplog, tmp_path, method, path):
    """A machine terminated (or a node lost) while its agent sends a heartbeat, a result or an
    artifact: the body ends with the connection. That is the worker's end, not the server's
    error, and nothing half-received is kept."""
    import logging
    import socket
    import time

    run_id, token = api.add(1)
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    host, port = api.url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall((f"{method} /runs/{run_id}/{path} HTTP/1.1\r\nHost: {host}\r\n"
                            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                            "Content-Length: 1000\r\n\r\n{\"phase\": ").encode())
        time.sleep(0.3)  # the handler is reading the body when the connection goes
    time.sleep(0.5)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text
    assert call_api_json(api, "POST", f"/runs/{run_id}/heartbeat", token=token, document={"phase": "x"})[0] == 200
    assert api.results == [] and [path for path in (tmp_path / "artifacts").rglob("*") if path.is_file()] == []
