"""`testlooper rerun`: a cluster user asks a TestRun for more runs, against the emulator."""

from __future__ import annotations

import subprocess
import sys

from operator_process import OPERATOR_DIR
from testlooper.kube.objects import build_testrun

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_testrun(kube, runs: int = 4) -> str:
    kube.create_namespace("team-a")
    repo = kube.api("POST", "/apis/testlooper.dev/v1alpha1/namespaces/team-a/repos",
                    {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "demo"},
                     "spec": {"url": "https://git.example.com/demo.git"}})
    body = build_testrun(repo, commit=COMMIT, branch="main", task={"name": "flaky/linux", "kind": "test"},
                         kind="test", runs=runs, depends_on=[], worker_pool=None, priority=0)
    created = kube.api("POST", "/apis/testlooper.dev/v1alpha1/namespaces/team-a/testruns", body)
    return created["metadata"]["name"]


def rerun(kube, *args: str) -> subprocess.CompletedProcess:
    env = kube.client_env("user", namespace="team-a")
    env["PYTHONPATH"] = str(OPERATOR_DIR)
    return subprocess.run([sys.executable, "-m", "testlooper", "rerun", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def runs_of(kube, name: str) -> int:
    return kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/team-a/testruns/{name}")["spec"]["runs"]


def test_rerun_doubles_or_raises_runs(kube):
    name = make_testrun(kube, runs=4)
    done = rerun(kube, name)
    assert (done.returncode, done.stdout) == (0, f"{name}: runs 4 -> 8 (4 more)\n"), done.stderr
    assert runs_of(kube, name) == 8
    assert rerun(kube, name, "--add", "2").returncode == 0 and runs_of(kube, name) == 10
    assert rerun(kube, name, "-n", "team-a", "--runs", "20").returncode == 0 and runs_of(kube, name) == 20


def test_rerun_says_what_is_wrong_in_one_line(kube):
    name = make_testrun(kube, runs=4)
    lower = rerun(kube, name, "--runs", "3")
    assert (lower.returncode, lower.stderr) == (
        2, f"testlooper: error: TestRun {name} already has 4 runs: --runs can only raise it (runs already made are kept)\n")
    missing = rerun(kube, "no-such-run")
    assert (missing.returncode, missing.stderr) == (
        2, "testlooper: error: no TestRun no-such-run in namespace team-a (kubectl get testruns -n team-a)\n")
    too_many = rerun(kube, name, "--runs", "100001")
    assert too_many.returncode == 2 and "from 1 to 100000" in too_many.stderr
    assert runs_of(kube, name) == 4


def test_rerun_with_no_reachable_cluster_is_one_line(tmp_path):
    from kube_emulator import write_kubeconfig
    from redis_server import free_port

    path = tmp_path / "kubeconfig"
    write_kubeconfig(str(path), f"http://127.0.0.1:{free_port()}", client="user", namespace="team-a")
    env = {"KUBECONFIG": str(path), "PYTHONPATH": str(OPERATOR_DIR), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "testlooper", "rerun", "some-run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "testlooper: error: cannot reach the cluster: [Errno 111] Connection refused\n"), done.stderr
    assert "Traceback" not in done.stderr
