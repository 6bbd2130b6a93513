"""Shared helpers for the worker tests: a real API server, task builders, and a real agent process."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlooper.worker.server import WorkerApiServer

OPERATOR_DIR = Path(__file__).resolve().parents[1] / "operator"
WHOLE_OUTPUT = {"name": "", "directory": "", "include_patterns": [], "exclude_patterns": [], "format": "Tar"}


@pytest.fixture
def api_server(tmp_path):
    server = WorkerApiServer(artifact_root=tmp_path / "artifacts")
    server.start()
    yield server
    server.stop()


def stage(command="", *, cleanup="", always_run=False, order=0, artifacts=(), list_tests_command="",
          run_tests_command=""):
    return {"command": command, "cleanup": cleanup, "always_run": always_run, "order": order,
            "artifacts": list(artifacts), "list_tests_command": list_tests_command,
            "run_tests_command": run_tests_command}


def artifact(name, directory="", *, include=(), exclude=(), format="Tar"):
    return {"name": name, "directory": directory, "include_patterns": list(include),
            "exclude_patterns": list(exclude), "format": format}


def make_task(command=None, *, stages=None, kind="test", variables=None, timeout_seconds=60, setup_script=""):
    """A resolved TASK as docs/design.md describes it; ``command`` is the one-stage shorthand."""
    if stages is None:
        stages = [stage(command, artifacts=[WHOLE_OUTPUT])]
    return {"name": f"{kind}/linux", "kind": kind, "environment": "linux", "platform": "linux", "image": {},
            "variables": variables or {}, "dependencies": {}, "stages": stages, "setup_script": setup_script,
            "timeout_seconds": timeout_seconds, "min_cores": 0, "max_cores": 0, "min_ram_gb": 0,
            "min_disk_gb": 0, "max_retries": 0, "retry_wait_seconds": 0, "runs": 1, "project": "",
            "configuration": "", "hash": "0" * 40}


def make_assignment(task, source_dir, *, inputs=None, commit_message="Fix the frobnicator\n"):
    return {"task": task, "commit": "a" * 40, "commit_message": commit_message,
            "source": {"path": str(source_dir)}, "inputs": inputs or {},
            "run_index": 0, "attempt": 1, "cores": 4, "ram_gb": 8}


def make_source(directory):
    """A small source tree with an executable script, as a commit's checkout would be."""
    directory.mkdir(parents=True)
    script = directory / "script.sh"
    script.write_text("#!/bin/sh\necho script-ran-from-$(basename $(dirname $0))\n")
    script.chmod(0o755)
    (directory / "README").write_text("the project\n")
    return directory


@dataclass
class AgentRun:
    run_id: str
    result: dict | None  # as the server received it
    returncode: int
    stderr: str
    workdir: Path
    log_text: str
    peak_rss_kib: int  # of the agent and the commands it ran, but see agent_peak_rss_kib
    # The agent's own peak, read from /proc while it ran. ru_maxrss above also holds the peak of
    # the pytest process that spawned it (Linux carries the pre-exec high-water mark over exec),
    # so it grows with whatever the suite imported before.
    agent_peak_rss_kib: int = 0


class AgentProcess:
    """A real ``python -m testlooper.worker.agent`` against ``server``, started on construction."""

    def __init__(self, server, assignment, workdir, *, run_id=None, extra_args=(), env=None, inputs_by_url=False,
                 token=None):
        self.server = server
        self.run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
        self.workdir = Path(workdir)
        registered_token = server.register_run(self.run_id, assignment, inputs_by_url=inputs_by_url)
        self._stderr_path = self.workdir.parent / f"{self.run_id}.stderr"
        with open(self._stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "testlooper.worker.agent", "--api", server.url, "--run-id", self.run_id,
                 "--workdir", str(self.workdir), "--heartbeat-seconds", "0.2", "--kill-grace-seconds", "1",
                 *extra_args],
                env=agent_environment(token or registered_token, env), stdout=subprocess.DEVNULL, stderr=stderr)

    def wait_for_phase(self, prefix, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.status(self.run_id).phase.startswith(prefix):
                return
            time.sleep(0.05)
        raise AssertionError(f"the agent never reached phase {prefix!r}")

    def finish(self, timeout=60):
        """Waits for the agent to exit (through wait4, to get its peak RSS) and gathers the run."""
        deadline = time.monotonic() + timeout
        agent_peak = 0
        while True:
            agent_peak = max(agent_peak, _high_water_kib(self.process.pid))
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the agent did not finish within {timeout} s")
            time.sleep(0.02)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        log_path = self.server.status(self.run_id).log_path
        return AgentRun(run_id=self.run_id, result=self.server.wait_result(self.run_id, 0),
                        returncode=self.process.returncode, stderr=self._stderr_path.read_text(),
                        workdir=self.workdir, log_text=Path(log_path).read_text(errors="replace"),
                        peak_rss_kib=usage.ru_maxrss, agent_peak_rss_kib=agent_peak)


def _high_water_kib(pid: int) -> int:
    """The process's peak resident memory since its exec (VmHWM), or 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_agent(server, assignment, workdir, **options):
    timeout = options.pop("timeout", 60)
    return AgentProcess(server, assignment, workdir, **options).finish(timeout)


def agent_environment(token, extra=None):
    environment = {key: value for key, value in os.environ.items() if key != "TESTLOOPER_SHELL"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(OPERATOR_DIR), os.environ.get("PYTHONPATH")]))
    environment["TESTLOOPER_WORKER_TOKEN"] = token
    environment.update(extra or {})
    return environment


def call_api(server, method, path, *, token=None, body=b"", headers=None):
    """One raw request to the server; returns (status, body bytes)."""
    host, port = server.url.rsplit("/", 1)[-1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def call_api_json(server, method, path, *, token=None, document=None):
    body = b"" if document is None else json.dumps(document).encode()
    status, answer = call_api(server, method, path, token=token, body=body)
    return status, json.loads(answer) if answer else None
