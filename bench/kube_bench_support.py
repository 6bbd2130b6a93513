"""Helpers for benches that run an operator against the Kubernetes emulator
(tests/kube_emulator.py).

    from kube_bench_support import Emulator, OperatorProcess, cpu_seconds
    with Emulator() as kube:                      # its own process, on a free loopback port
        with OperatorProcess(kube, ["-m", "kopf", "run", "--standalone", "-n", "bench",
                                    "bench/bare_operator.py"], client="bare") as operator:
            operator.wait_until_watching("example.testlooper.dev", "widgets")
            before = operator.cpu_seconds()
            ...
            kube.wait_for_count("example.testlooper.dev", "v1alpha1", "parts", 500, "bench")

CPU time comes from /proc/PID/stat (user + system, of that process alone), resident memory from
/proc/PID/status, so the emulator's own work never counts as the operator's.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from kube_fixtures import KubeEmulatorProcess  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its children not included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Emulator(KubeEmulatorProcess):
    """The emulator process, with what benches ask of it beyond the tests' needs."""

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def wait_for_count(self, group: str, version: str, resource: str, count: int,
                       namespace: str | None = None, label_selector: str = "",
                       timeout: float = 600) -> int:
        """Block until `resource` holds `count` objects; the emulator answers the moment the
        last one is stored (a long poll, no listing). Returns the count reached."""
        query = {"group": group, "version": version, "resource": resource, "count": count,
                 "timeout": timeout, "labelSelector": label_selector}
        if namespace is not None:
            query["namespace"] = namespace
        url = f"{self.url}/_testing/wait?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=timeout + 10) as response:
            answer = json.loads(response.read())
        if not answer["reached"]:
            raise TimeoutError(f"{resource}: {answer['count']} of {count} after {timeout} s")
        return answer["count"]


class OperatorProcess:
    """A Python process (e.g. `-m kopf run ...`) talking to the emulator as `client`, so that
    its requests are told apart from the bench's own."""

    def __init__(self, kube: Emulator, arguments: list[str], client: str = "operator",
                 env: dict | None = None, python: str = sys.executable):
        self.kube = kube
        self.client = client
        self.log_path = tempfile.mktemp(prefix=f"testlooper-{client}-", suffix=".log")
        environment = kube.client_env(client, base=env)
        environment.setdefault("PYTHONPATH", str(ROOT / "operator"))
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([python, *arguments], env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def resident_bytes(self) -> int:
        return resident_bytes(self.process.pid)

    def log(self) -> str:
        return pathlib.Path(self.log_path).read_text()

    def wait_until_watching(self, group: str, resource: str, timeout: float = 30) -> None:
        """Block until the operator has opened a watch on the resource (kopf is then ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (group, resource, "watch") in self.kube.permissions(self.client):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the operator never watched {resource}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        if exc_info[0] is None:
            os.unlink(self.log_path)
