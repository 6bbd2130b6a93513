"""What the operator tests that run pods share: a kubelet thread playing the node (tests/kubelet.py
runs each pod's containers), the project pushed to a bare repository, the operator started with
a Redis store and its worker API, and waiting for TestRuns to end."""

from __future__ import annotations

import threading
import time

import pytest

from cluster_helpers import NAMESPACE, list_testruns
from gitrepo import GitRepo
from kubelet import TestKubelet, running_status
from operator_process import OperatorProcess
from redis_server import RedisServer, free_port
from testlooper.kube import pods as pod_builder


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


def start_operator(kube, tmp_path, redis_url, pool: dict, args=()) -> OperatorProcess:
    """The operator (not started yet: a context manager) with the namespace and the pool made;
    `args`: more flags (--heartbeat-grace 3 ...)."""
    kube.create_namespace(NAMESPACE)
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools", pool)
    port = free_port()
    return OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE], port=port, args=[
        "--store", redis_url, "--api-url", f"http://127.0.0.1:{port}", "--worker-image", "testlooper/worker:test",
        *args])


def apply_repo(kube, url: str) -> None:
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos", {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "demo"},
        "spec": {"url": url, "branches": ["main"], "pollIntervalSeconds": 60}})


def ended_testruns(kube, count: int):
    items = list_testruns(kube)
    done = len(items) == count and all((i.get("status") or {}).get("phase") in
                                       ("Succeeded", "Failed", "Error", "Cancelled") for i in items)
    return done and {i["spec"]["task"]: i for i in items}
