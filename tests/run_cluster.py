"""What the operator tests that run pods share: a kubelet thread playing the node (tests/kubelet.py
runs each pod's containers), the project pushed to a bare repository, the operator started with
a Redis store and its worker API, and waiting for TestRuns to end."""

from __future__ import annotations

import threading
import time

import pytest

from cluster_helpers import NAMESPACE, list_testruns
from gitrepo import GitRepo
from kubelet import PodAbandoned, TestKubelet, running_status
from operator_process import OperatorProcess
from redis_server import RedisServer, free_port
from testlooper.kube import pods as pod_builder


def pods_path(name: str = "") -> str:
    return f"/api/v1/namespaces/{NAMESPACE}/pods" + (f"/{name}" if name else "")


class Kubelet:
    """Plays the node: a thread that takes each pod the operator creates in NAMESPACE, once, and
    runs it to its end with tests/kubelet.py's TestKubelet, in a thread of its own (runs of one
    TestRun run side by side), patching the pod's status as a kubelet would: Pending with a
    startTime, Running, then Succeeded or Failed.

        kubelet.ran        # {pod name: the phase it ended in}
        kubelet.journal    # [("started" | "ended", pod name), ...] in the order they happened
        kubelet.ended_at   # {pod name: time.monotonic() when its containers had all exited}
        kubelet.taken_with # {pod name: what on_take(pod) returned as the pod was taken}

    Unlike a kubelet it does not stop a deleted pod's containers: a pod the operator deletes (a
    cancelled TestRun) runs on until its agent stops by itself, so a test sees the agent stop
    through the worker API, which is what must work when a node is slow to act on a delete. At
    the end of the `with`, the containers still running are killed."""

    def __init__(self, kube, root, pod_timeout: float = 180, on_take=None):
        self.kube = kube
        self.root = root
        self.pod_timeout = pod_timeout
        self.on_take = on_take  # called with each pod as it is taken, before it runs
        self.ran: dict[str, str] = {}  # pod name -> phase it ended in
        self.labels: dict[str, dict] = {}  # pod name -> its labels
        self.runs: dict = {}  # pod name -> its kubelet.PodRun, once ended
        self.journal: list[tuple[str, str]] = []
        self.ended_at: dict[str, float] = {}
        self.taken_with: dict[str, object] = {}
        self.errors: list[str] = []
        self._taken: set[str] = set()
        self._lock = threading.Lock()
        self._pod_threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)
        for thread in list(self._pod_threads):
            thread.join(timeout=self.pod_timeout)

    def running(self) -> list[str]:
        """The pods taken whose containers have not all exited yet."""
        with self._lock:
            return sorted(self._taken - set(self.ran))

    def _loop(self):
        while not self._stop.is_set():
            for pod in self.kube.api("GET", pods_path())["items"]:
                name = pod["metadata"]["name"]
                if name in self._taken or pod["metadata"].get("deletionTimestamp"):
                    continue
                if self.on_take is not None:
                    self.taken_with[name] = self.on_take(pod)
                with self._lock:
                    self._taken.add(name)
                    self.journal.append(("started", name))
                thread = threading.Thread(target=self._run_reporting, args=(pod,), daemon=True)
                self._pod_threads.append(thread)
                thread.start()
            time.sleep(0.1)

    def _run_reporting(self, pod):
        name = pod["metadata"]["name"]
        try:
            phase = self.run(pod)
        except PodAbandoned:  # the test is over: what it ran is of no interest any more
            phase = "abandoned"
        except Exception as error:  # said by the test, not lost in a thread
            self.errors.append(f"{name}: {type(error).__name__}: {error}")
            phase = "error"
        with self._lock:
            self.ended_at[name] = time.monotonic()
            self.journal.append(("ended", name))
            # A subclass's run may say how the pod ended itself (an eviction) and return None.
            self.ran[name] = phase if phase is not None else self.ran.get(name, "error")

    def run(self, pod) -> str:
        name = pod["metadata"]["name"]
        self.labels[name] = dict(pod["metadata"].get("labels") or {})
        secret_name = pod["metadata"]["annotations"][pod_builder.TOKEN_SECRET_ANNOTATION]
        secret = self.kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name}")
        kubelet = TestKubelet(self.root / name, secrets={secret_name: secret}, stop=self._stop)
        self._patch_status(name, {"startTime": _now(), "phase": "Pending"})
        run = kubelet.run_pod(pod, timeout=self.pod_timeout,
                              on_running=lambda p: self._patch_status(name, running_status(p)))
        self.runs[name] = run
        self._patch_status(name, run.status(pod))
        return run.phase

    def _patch_status(self, name: str, status: dict) -> None:
        # The pod may be gone already: the operator deletes it once its RESULT is counted.
        code, answer = self.kube._call("PATCH", pods_path(name) + "/status", {"status": status},
                                       content_type="application/merge-patch+json")
        assert code in (200, 404), answer


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
