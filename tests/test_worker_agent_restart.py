"""The agent rides out a worker API that goes away: its log, heartbeats and RESULT are retried
until the run's deadline, so a server stopped for longer than the old ~15 s of retries and started
again (same port, same secret: the tokens are derived, docs/worker.md) loses nothing."""

from __future__ import annotations

import socket
import time

from testlooper.workerapi.local import WorkerApiServer
from worker_helpers import AgentProcess, make_assignment, make_source, make_task, stage

DOWN_SECONDS = 20  # longer than the agent's old retries (0.5 + 1 + 2 + 4 + 8 s)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_run_finishing_while_the_api_is_down_delivers_its_log_and_result_when_it_returns(tmp_path):
    source = make_source(tmp_path / "checkout")
    port, secret = free_port(), b"s" * 32
    task = make_task("echo before; sleep 2; for i in $(seq 1 2000); do echo line-$i; done; echo after")
    assignment = make_assignment(task, source)
    first = WorkerApiServer(artifact_root=tmp_path / "first", port=port, secret=secret)
    first.start()
    agent = AgentProcess(first, assignment, tmp_path / "work", run_id="ns.tr.1.1")
    second = None
    try:
        agent.wait_for_phase("stage")
        first.stop()  # the task finishes and tries to report while nobody listens
        time.sleep(DOWN_SECONDS)
        assert agent.process.poll() is None, "the agent gave up while the API was down"
        second = WorkerApiServer(artifact_root=tmp_path / "second", port=port, secret=secret)
        second.register_run("ns.tr.1.1", assignment)
        second.start()
        result = second.wait_result("ns.tr.1.1", timeout=60)
        assert agent.process.wait(timeout=30) == 0
        assert result["result"] == "passed" and result["exit_code"] == 0
        # The new server held nothing: the agent was told so (409) and sent the whole log again.
        log = open(second.status("ns.tr.1.1").log_path).read()
        assert "before" in log and "line-2000\nafter" in log and log.count("line-1000\n") == 1
        assert "[testlooper] result: passed" in log
        assert second.status("ns.tr.1.1").artifacts  # the whole-output artifact was uploaded too
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
        if second is not None:
            second.stop()


def test_past_the_run_deadline_the_agent_stops_trying_and_keeps_its_result(tmp_path):
    source = make_source(tmp_path / "checkout")
    task = make_task(stages=[stage("sleep 1")], timeout_seconds=2)  # no artifact: the RESULT is the last word
    assignment = {**make_assignment(task, source), "report_grace_seconds": 1}
    server = WorkerApiServer(artifact_root=tmp_path / "api")
    server.start()
    agent = AgentProcess(server, assignment, tmp_path / "work", run_id="ns.tr.2.1")
    try:
        agent.wait_for_phase("stage")
        server.stop()
        started = time.monotonic()
        assert agent.process.wait(timeout=30) == 1
        assert time.monotonic() - started < 10  # its deadline: about 2 + 1 s after the assignment
        result = (tmp_path / "work" / "result.json").read_text()
        assert '"result": "passed"' in result
    finally:
        if agent.process.poll() is None:
            agent.process.kill()


def test_the_agent_beats_until_its_result_is_delivered(tmp_path):
    # An operator whose store is down answers RESULT with 503 (the agent retries): the run is
    # alive meanwhile, and its heartbeats must say so, or it is taken for lost and run again.
    from testlooper.workerapi.contract import ApiError

    source = make_source(tmp_path / "checkout")
    server = WorkerApiServer(artifact_root=tmp_path / "api")
    refused = {"count": 0, "until": None}
    record = server.backend.record_result

    async def refusing(run, result):
        if refused["until"] is None:
            refused["until"] = time.time() + 4
        if time.time() < refused["until"]:
            refused["count"] += 1
            raise ApiError(503, "the history store cannot be reached now")
        return await record(run, result)

    server.backend.record_result = refusing
    server.start()
    agent = AgentProcess(server, make_assignment(make_task("echo done"), source), tmp_path / "work",
                         run_id="ns.tr.3.1")
    try:
        run = agent.finish(timeout=60)
        assert run.returncode == 0 and run.result["result"] == "passed"
        assert refused["count"] >= 2  # it was refused, then retried
        beat = server.status("ns.tr.3.1").last_heartbeat
        assert beat is not None and beat >= refused["until"] - 1, (beat, refused["until"])
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
        server.stop()


def test_a_source_download_while_the_api_is_down_waits_for_it_to_come_back(tmp_path):
    """A pod that prepares while the operator restarts: its source download is refused (no
    one listens), asked again with backoff, and lands once a server answers on the port. It
    used to end the run as an error ("cannot fetch source: ... Connection refused"), which the
    caps test with a restart caught once."""
    import io
    import tarfile
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from testlooper.worker import agent

    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as tar:
        data = b"print('hello')\n"
        member = tarfile.TarInfo("main.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(packed.getvalue())))
            self.end_headers()
            self.wfile.write(packed.getvalue())

        def log_message(self, *args):
            pass

    port = free_port()
    servers = []

    def come_up_later():
        time.sleep(2)  # the first tries are refused
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    api = agent.ApiClient(f"http://127.0.0.1:{port}", "ns.tr.1.1", "token")
    workspace = agent.Workspace(tmp_path / "work")
    workspace.create_directories()
    threading.Thread(target=come_up_later, daemon=True).start()
    started = time.monotonic()
    try:
        agent.fetch_tree({"url": "source"}, workspace.src, "source", api, agent.StopSignal(), workspace)
    finally:
        if servers:
            servers[0].shutdown()
    assert time.monotonic() - started >= 1.5
    assert open(tmp_path / "work" / "src" / "main.py").read() == "print('hello')\n"
