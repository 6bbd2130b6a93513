"""Helpers for the pod tests: resolved tasks, TestRun and WorkerPool objects, manifest checks,
and one run of a built pod through the test kubelet against a real worker API server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kubelet import PodRun, TestKubelet
from testlooper.definitions import resolve_text
from testlooper.kube import pods
from testlooper.kube.objects import build_testrun

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "examples" / "demo"
COMMIT = "c" * 40
NAMESPACE = "ci"
WORKER_IMAGE = "ghcr.io/testlooper/worker:0.1.0"


def demo_definitions() -> dict:
    """`testlooper definitions --json` of examples/demo, as the command prints it."""
    done = subprocess.run([sys.executable, "-m", "testlooper", "definitions", "--json"], cwd=DEMO,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator")},
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def resolved_tasks(text: str) -> dict:
    """The builds and tests of a definitions file, resolved by the engine."""
    definitions = resolve_text(text, "testlooper.yml")
    return {**definitions["builds"], **definitions["tests"]}


def testrun_object(task: dict, *, kind: str | None = None, namespace: str = NAMESPACE) -> dict:
    repo = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo",
            "metadata": {"name": "demo", "namespace": namespace, "uid": "repo-uid-1"}}
    testrun = build_testrun(repo, commit=COMMIT, branch="main", task=task, kind=kind or task["kind"], runs=1,
                            depends_on=[], worker_pool=None, priority=0)
    testrun["metadata"]["uid"] = "testrun-uid-" + testrun["metadata"]["name"][-6:]
    return testrun


testrun_object.__test__ = False  # its name starts with "test": tests importing it must not collect it


def pool_object(**spec) -> dict:
    return {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "linux", "namespace": NAMESPACE, "uid": "pool-uid-1"},
            "spec": {"provider": "kubernetes", **spec}}


CHECK_MANIFESTS = """
import json, sys
import kubernetes_validate
from kubernetes import client
api = client.ApiClient()
for line in sys.stdin:
    document = json.loads(line)
    try:
        kubernetes_validate.validate(document, "1.32.0", strict=True)
        problem = ""
    except kubernetes_validate.ValidationError as error:
        problem = str(error)
    typed = api.deserialize(line, "V1" + document["kind"], "application/json")
    print(json.dumps({"problem": problem, "round_tripped": api.sanitize_for_serialization(typed)}))
"""


def check_manifests(*documents: dict) -> list[dict]:
    """Each document validated with kubernetes-validate --strict (Kubernetes 1.32, as the
    kubectl here) and round-tripped through the official client's typed model. In a child
    process: the schemas and the client's models are large, and the suite's memory tests measure
    this process's peak."""
    done = subprocess.run([sys.executable, "-c", CHECK_MANIFESTS],
                          input="".join(json.dumps(document) + "\n" for document in documents),
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


@dataclass
class PodOutcome:
    run_id: str
    token: str
    pod: dict
    kubelet_run: PodRun
    result: dict | None
    log_text: str
    artifacts: dict
    workspace: Path


def run_task_in_pod(server, task, tmp_path, *, inputs=None, source=None, pool=None, timeout=90,
                    deadline_grace_seconds=60, assignment_changes=None, kind=None, path=None,
                    shell=None) -> PodOutcome:
    """Registers a run of ``task`` with the API server, builds its Secret and Pod, and runs the
    pod through the test kubelet; returns what the API received."""
    testrun = testrun_object(task, kind=kind)
    the_run_id = pods.run_id(NAMESPACE, testrun["metadata"]["name"], 1, 1)
    source = source or DEMO
    assignment = {"task": task, "commit": COMMIT, "commit_message": "Add the calculator\n",
                  "source": {"path": str(source)},
                  "inputs": inputs if inputs is not None else {"src": {"kind": "source", "path": str(source)}},
                  "run_index": 0, "attempt": 1, "cores": 1, "ram_gb": 1, **(assignment_changes or {})}
    token = server.register_run(the_run_id, assignment, inputs_by_url=True)
    secret = pods.build_run_secret(testrun, the_run_id, token)
    pod = pods.build_run_pod(testrun, run_index=1, attempt=1, pool=pool or pool_object(), api_url=server.url,
                             worker_image=WORKER_IMAGE, token_secret_name=secret["metadata"]["name"],
                             heartbeat_seconds=0.2, kill_grace_seconds=1,
                             deadline_grace_seconds=deadline_grace_seconds)
    node = tmp_path / f"node-{testrun['metadata']['name'][-10:]}"
    kubelet = TestKubelet(node, secrets={secret["metadata"]["name"]: secret}, path=path, shell=shell)
    kubelet_run = kubelet.run_pod(pod, timeout=timeout)
    status = server.status(the_run_id)
    return PodOutcome(run_id=the_run_id, token=token, pod=pod, kubelet_run=kubelet_run,
                      result=server.wait_result(the_run_id, 0), log_text=Path(status.log_path).read_text(),
                      artifacts=status.artifacts, workspace=Path(kubelet_run.volumes["workspace"]))
