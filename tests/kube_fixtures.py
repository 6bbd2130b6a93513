"""The Kubernetes emulator (tests/kube_emulator.py) as a process, and pytest fixtures for it.

    def test_something(kube, kube_process):   # a clean emulator: reset before the test
        kube.kubectl("apply", "--validate=false", "-f", path)
        kube.create_namespace("ns1")
        operator = kube_process(["-m", "kopf", "run", "-A", "--standalone", "op.py"], "operator")
        operator.wait_until_watching("testlooper.dev", "repos")
        wait_until(lambda: kube.api("GET", url).get("status"), "the status")
        kube.permissions(client="operator")       # what that process used

One emulator process serves the whole session; `kube` resets it before each test (objects,
request record, faults; watches are closed), which costs about a millisecond where a fresh
process costs about a second (docs/testing.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
EMULATOR = TESTS / "kube_emulator.py"
FIXTURE_CRDS = TESTS / "fixtures" / "kube"
PROJECT_CRDS = ROOT / "crds"
START_TIMEOUT_SECONDS = 20
sys.path.insert(0, str(TESTS))
from kube_emulator import write_kubeconfig  # noqa: E402


def default_crd_paths() -> list[str]:
    """The project's CRDs (when crds/ exists) and the test fixtures' (a Widget with every kind of
    printer column, kopf's peering resources)."""
    paths = [str(FIXTURE_CRDS)]
    if PROJECT_CRDS.is_dir() and any(PROJECT_CRDS.glob("*.yaml")):
        paths.insert(0, str(PROJECT_CRDS))
    return paths


class KubeEmulatorProcess:
    def __init__(self, crds: list[str] | None = None, namespaces: list[str] | None = None,
                 python: str = sys.executable):
        self.crds = default_crd_paths() if crds is None else crds
        self.namespaces = namespaces or []
        self.python = python
        self.directory = tempfile.mkdtemp(prefix="testlooper-kube-")
        self.kubeconfig_path = os.path.join(self.directory, "kubeconfig")
        self.log_path = os.path.join(self.directory, "emulator.log")
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> KubeEmulatorProcess:
        command = [self.python, str(EMULATOR), "--port", "0", "--kubeconfig",
                   self.kubeconfig_path]
        for path in self.crds:
            command += ["--crds", path]
        for namespace in self.namespaces:
            command += ["--namespace", namespace]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("ready "):
                    self.url = line.split()[1]
                    return self
                if not line:
                    break
            if self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the Kubernetes emulator did not start: {self.log().strip()}")

    def log(self) -> str:
        with open(self.log_path) as log:
            return log.read()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log.close()
        self.process = None

    def __enter__(self) -> KubeEmulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ---------- clients ----------

    def kubeconfig(self, client: str = "tests", namespace: str = "default") -> str:
        """A kubeconfig whose requests the emulator records under `client`."""
        path = os.path.join(self.directory, f"kubeconfig-{client}-{namespace}")
        if not os.path.exists(path):
            write_kubeconfig(path, self.url, client=client, namespace=namespace)
        return path

    def client_env(self, client: str, namespace: str = "default",
                   base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = self.kubeconfig(client, namespace)
        return env

    def kubectl(self, *args: str, client: str = "kubectl", input: str | None = None,
                check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not on the PATH (these machines have v1.32 in /usr/bin)")
        # Its discovery cache stays with this emulator, out of ~/.kube.
        cache = os.path.join(self.directory, "kubectl-cache")
        result = subprocess.run([kubectl, "--kubeconfig", self.kubeconfig(client),
                                 "--cache-dir", cache, *args],
                                input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def _call(self, method: str, path: str, body: Any = None,
              content_type: str = "application/json", client: str = "tests") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {client}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def api(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """Call the API as the test (client "tests"); raises on any error status."""
        status, answer = self._call(method, path, body, **kwargs)
        if status >= 400:
            raise AssertionError(f"{method} {path} answered {status}: {answer}")
        return answer

    def create_namespace(self, name: str) -> dict:
        return self.api("POST", "/api/v1/namespaces",
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # ---------- the testing endpoints ----------

    def reset(self) -> None:
        self.api("POST", "/_testing/reset")

    def requests(self, client: str | None = None) -> list[dict]:
        query = "" if client is None else f"?client={client}"
        return self.api("GET", f"/_testing/requests{query}")["requests"]

    def permissions(self, client: str | None = None) -> set[tuple[str, str, str]]:
        """The distinct (API group, resource[/subresource], verb) a client used."""
        query = "" if client is None else f"?client={client}"
        return {(p["group"], p["resource"], p["verb"])
                for p in self.api("GET", f"/_testing/permissions{query}")["permissions"]}

    def all_objects(self) -> list[dict]:
        """Every object the emulator stores, of every resource and namespace."""
        return self.api("GET", "/_testing/objects")["objects"]

    def inject_fault(self, verb: str, status: int, times: int = 1, group: str | None = None,
                     resource: str | None = None, client: str | None = None,
                     message: str = "injected by the test", delay: float = 0) -> None:
        """The next `times` matching requests wait `delay` s, then fail with `status` (0:
        are served, only late)."""
        self.api("POST", "/_testing/faults", {"verb": verb, "status": status, "times": times,
                                              "group": group, "resource": resource,
                                              "client": client, "message": message,
                                              "delay": delay})

    def close_watches(self) -> int:
        """End every open watch, as an API server restart would; returns how many."""
        return self.api("POST", "/_testing/close-watches")["closed"]


class ClientProcess:
    """A Python process (e.g. `-m kopf run ...`) talking to the emulator as `client`, with its
    output in a log file, so that its requests are told apart from the test's own."""

    def __init__(self, kube: KubeEmulatorProcess, arguments: list[str], client: str = "operator",
                 env: dict | None = None, python: str = sys.executable):
        self.kube = kube
        self.client = client
        self.log_path = os.path.join(kube.directory, f"{client}-{time.monotonic_ns()}.log")
        environment = kube.client_env(client, base=env)
        # This worktree's code is what runs, whatever PYTHONPATH said before.
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "operator"), *filter(None, [environment.get("PYTHONPATH")])])
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([python, *arguments], env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with open(self.log_path) as log:
            return log.read()

    def wait_until_watching(self, group: str, resource: str, timeout: float = 30) -> None:
        """Block until the process has opened a watch on the resource (kopf is then ready)."""
        wait_until(lambda: (group, resource, "watch") in self.kube.permissions(self.client),
                   f"{self.client} watching {resource}", timeout, self)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def wait_until(check, what: str, timeout: float = 15, process: ClientProcess | None = None):
    """Poll `check()` every 50 ms until it returns something true, and return that; fail
    saying what did not happen (with the process's log, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if process is not None and process.process.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({process.process.returncode}):\n"
                                 f"{process.log()[-4000:]}")
        if time.monotonic() > deadline:
            log = f"; its log:\n{process.log()[-4000:]}" if process is not None else ""
            raise AssertionError(f"{what} did not happen within {timeout} s{log}")
        time.sleep(0.05)


def rbac_rules(permissions: set[tuple[str, str, str]]) -> list[dict]:
    """(group, resource, verb) triples as ClusterRole rules, one per group and resource."""
    verbs: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in permissions:
        verbs.setdefault((group, resource), set()).add(verb)
    return [{"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs[key])}
            for key in sorted(verbs) for group, resource in [key]]


def rbac_permissions(role: dict) -> set[tuple[str, str, str]]:
    """What a Role or ClusterRole grants, as (group, resource, verb) triples. A wildcard is
    refused: such a role cannot be compared with what was used."""
    granted = set()
    for rule in role.get("rules") or []:
        if rule.get("nonResourceURLs"):
            continue
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    if "*" in (group, resource, verb):
                        raise ValueError(f"the role grants a wildcard: {rule}")
                    granted.add((group, resource, verb))
    return granted


@pytest.fixture(scope="session")
def kube_emulator_process():
    with KubeEmulatorProcess() as emulator:
        yield emulator


@pytest.fixture
def kube(kube_emulator_process):
    """The session's emulator, reset to its start state (namespace `default` and the CRDs)."""
    kube_emulator_process.reset()
    return kube_emulator_process


@pytest.fixture
def kube_process(kube):
    """Start client processes against the emulator; all are stopped when the test ends.

        operator = kube_process(["-m", "kopf", "run", "--standalone", "-A", path], "operator")
    """
    started: list[ClientProcess] = []

    def start(arguments: list[str], client: str = "operator", env: dict | None = None):
        process = ClientProcess(kube, arguments, client=client, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
