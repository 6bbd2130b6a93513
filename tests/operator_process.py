"""`testlooper operator` as a real process against the Kubernetes emulator, for tests and benches.

    with OperatorProcess(kube, tmp_path, namespaces=["team-a"]) as operator:
        operator.webhook("github", body, {"X-Hub-Signature-256": ...})

Its requests are recorded by the emulator under the client name "operator" (its kubeconfig's
token), so `kube.permissions(client="operator")` is exactly what it used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from redis_server import free_port

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"


class OperatorProcess:
    def __init__(self, kube, directory: Path, namespaces=("team-a",), args=(), client: str = "operator",
                 env: dict | None = None, priority: int | None = None, port: int = 0):
        self.kube = kube
        self.directory = Path(directory)
        self.namespaces = list(namespaces)
        self.args = list(args)
        self.client = client
        self.extra_env = env or {}
        self.priority = priority  # None: --standalone; a number: peering with that priority
        self.fixed_port = port  # known before the start: for --api-url, which names it
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path = self.directory / f"operator-{client}.log"
        self.cache_dir = self.directory / "operator-cache"

    def start(self, ready_timeout: float = 30) -> "OperatorProcess":
        self.port = self.fixed_port or free_port()
        env = self.kube.client_env(self.client)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(OPERATOR_DIR), env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        command = [sys.executable, "-m", "testlooper", "operator", "--api-host", "127.0.0.1",
                   "--api-port", str(self.port), "--cache-dir", str(self.cache_dir)]
        command += ["--standalone"] if self.priority is None else ["--priority", str(self.priority)]
        for namespace in self.namespaces:
            command += ["--namespace", namespace]
        command += self.args
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log()}")
            status, _ = self.get("/readyz")
            if status == 200:
                return self
            time.sleep(0.1)
        raise AssertionError(f"the operator was not ready within {ready_timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)  # its threads' stacks into the log
                time.sleep(1)
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the operator did not stop within {timeout}s of SIGTERM; "
                                     f"its log ends:\n{self.log()[-6000:]}")
        code, self.process = self.process.returncode, None
        return code

    def kill(self) -> None:
        """SIGKILL, as a node lost or an OOM kill ends it: nothing of its own shutdown runs."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def webhook(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        request = urllib.request.Request(self.url(path), data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        status, text = self.get("/metrics")
        assert status == 200, text
        wanted = {f'{key}="{value}"' for key, value in labels.items()}
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            present = set(label_text.rstrip("}").split(",")) if label_text else set()
            if wanted <= present:
                return float(value)
        return 0.0

