"""`testlooper logs` on runs the real operator ran as pods (tests/test_operator_runs_e2e.py's
operator process, emulator, redis-server and kubelet): `-f` started before the build's pod
prints its log as it comes and ends with the TestRun; the test's two runs show afterwards."""

from __future__ import annotations

import subprocess
import sys

from cluster_helpers import NAMESPACE, list_testruns
from operator_process import OPERATOR_DIR
from run_helpers import wait_for
from run_cluster import Kubelet, apply_repo, ended_testruns, push_project, redis_url, start_operator  # noqa: F401
from test_operator_runs_e2e import BUILD, CHECK, DEFINITIONS, POOL
from testlooper.kube.objects import testrun_name


def logs_command(name: str, store: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "testlooper", "logs", name, "--store", store, *args]


def test_logs_follows_a_real_build_pod_and_shows_each_run_of_its_test(kube, tmp_path, redis_url):  # noqa: F811
    url, commit = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "build.sh": BUILD, "check.sh": CHECK})
    env = kube.client_env("user", namespace=NAMESPACE)
    env["PYTHONPATH"] = str(OPERATOR_DIR)
    build_name = testrun_name("demo", commit, "app/linux")
    check_name = testrun_name("demo", commit, "check/linux")
    with start_operator(kube, tmp_path, redis_url, POOL) as operator:
        apply_repo(kube, url)
        wait_for(lambda: len(list_testruns(kube)) == 2, timeout=60, what="the TestRuns made")
        # Followed before any pod runs: it waits for the run, then prints as the agent streams.
        follower = subprocess.Popen(logs_command(build_name, redis_url, "-f"), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            with Kubelet(kube, tmp_path / "node") as kubelet:
                wait_for(lambda: ended_testruns(kube, 2), timeout=90, interval=0.3, what="both TestRuns ended")
                assert kubelet.errors == [], kubelet.errors
            stdout, stderr = follower.communicate(timeout=30)
        finally:
            follower.kill()
            follower.wait()
        assert follower.returncode == 0, stderr
        assert "[run 1] built\n" in stdout and "[run 1] [testlooper] result: passed" in stdout, stdout
        assert stderr == f"testlooper: TestRun {build_name} ended: Succeeded, passed\n"

        shown = subprocess.run(logs_command(check_name, redis_url), env=env, capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        first, second = shown.stdout.split("==> run 2, attempt 1 <==\n")
        assert first.startswith("==> run 1, attempt 1 <==\n") and "answer 42\n" in first
        assert "answer 42\n" in second and "[testlooper] result: passed" in second
        one = subprocess.run(logs_command(check_name, redis_url, "--run", "2"), env=env, capture_output=True,
                             text=True, timeout=60)
        assert (one.returncode, one.stdout, one.stderr) == (
            0, second, f"testlooper: run 2 of {check_name}, attempt 1\n")
    assert "Traceback" not in operator.log()


SLOW_DEFINITIONS = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
tests:
  slow/linux:
    command: sh src/slow.sh
    dependencies: {src: HEAD}
"""
SLOW = 'i=0; while [ $i -lt 600 ]; do echo "tick $i"; i=$((i+1)); sleep 0.2; done\n'


def test_logs_follow_ends_when_the_user_cancels_the_testrun(kube, tmp_path, redis_url):  # noqa: F811
    url, commit = push_project(tmp_path, {"testlooper.yml": SLOW_DEFINITIONS, "slow.sh": SLOW})
    env = kube.client_env("user", namespace=NAMESPACE)
    env["PYTHONPATH"] = str(OPERATOR_DIR)
    name = testrun_name("demo", commit, "slow/linux")
    with start_operator(kube, tmp_path, redis_url, POOL) as operator, Kubelet(kube, tmp_path / "node") as kubelet:
        apply_repo(kube, url)
        wait_for(lambda: len(list_testruns(kube)) == 1, timeout=60, what="the TestRun made")
        follower = subprocess.Popen(logs_command(name, redis_url, "-f"), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            while "tick 3" not in follower.stdout.readline():
                assert follower.poll() is None, follower.stderr.read()
            kube.kubectl("patch", "testrun", name, "-n", NAMESPACE, "--type", "merge", "-p", '{"spec": {"cancel": true}}')
            stdout, stderr = follower.communicate(timeout=60)
        finally:
            follower.kill()
            follower.wait()
        assert follower.returncode == 0, stderr
        assert stderr == f"testlooper: TestRun {name} ended: Cancelled, cancelled\n"
        assert "tick 599" not in stdout
        status = list_testruns(kube)[0]["status"]
        assert (status["phase"], status["result"]) == ("Cancelled", "cancelled")
        wait_for(lambda: kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"] == [],
                 what="the run's pod deleted")
        assert kubelet.errors == [], kubelet.errors
    assert "Traceback" not in operator.log()
