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
import sys
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from kube_fixtures import ClientProcess, KubeEmulatorProcess  # noqa: E402

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


class OperatorProcess(ClientProcess):
    """An operator process (see tests/kube_fixtures.py), with its CPU time and memory."""

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def resident_bytes(self) -> int:
        return resident_bytes(self.process.pid)
