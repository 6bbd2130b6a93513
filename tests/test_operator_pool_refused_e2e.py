"""A WorkerPool the CRD admits but the operator's model refuses (a rule the CRD cannot say
without CEL) takes no run, and says why: condition Accepted False with the one-line refusal,
and a warning in the log. Mended, it says Accepted True and takes the run."""

from __future__ import annotations

import copy

from cluster_helpers import NAMESPACE, list_testruns
from run_cluster import apply_repo, push_project, redis_url, start_operator  # noqa: F401
from run_helpers import wait_for

DEFINITIONS = """\
looper_version: 5
environments:
  windows:
    platform: windows
    image: {name: "mcr.microsoft.com/windows/nanoserver:ltsc2022"}
tests:
  check/windows:
    command: echo checked
"""
POOL = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "pods"},
        "spec": {"provider": "kubernetes", "maxWorkers": 2}}
WINDOWS = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "windows"},
           "spec": {"provider": "ec2", "platform": "windows", "maxWorkers": 1,
                    "ec2": {"region": "us-east-1", "vpcId": "vpc-0a1b2c3d", "subnetId": "subnet-0a1b2c3d",
                            "securityGroupIds": ["sg-0a1b2c3d"], "windowsAmi": "ami-0a1b2c3d",
                            "instanceTypes": [{"type": "m5.xlarge", "cores": 4, "ramGb": 16}],
                            "reuse": True, "minLifetimeSeconds": 600}}}
POOLS = f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools"


def accepted(kube, name):
    status = kube.api("GET", f"{POOLS}/{name}").get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Accepted"), None)


def test_a_refused_pool_says_why_takes_no_run_and_takes_it_once_mended(kube, tmp_path, redis_url):
    url, _ = push_project(tmp_path, {"testDefinitions.yml": DEFINITIONS})
    with start_operator(kube, tmp_path, redis_url, POOL, args=["--pool-status-interval", "0.5"]) as operator:
        kube.api("POST", POOLS, WINDOWS)
        refused = wait_for(lambda: accepted(kube, "windows"), timeout=20)
        assert (refused["status"], refused["reason"]) == ("False", "SpecRefused")
        assert refused["message"] == ("spec.ec2.reuse: is not supported by this operator yet: each run gets its "
                                      "own instance, terminated when the run ends")
        assert wait_for(lambda: accepted(kube, "pods"), timeout=20)["status"] == "True"
        apply_repo(kube, url)
        testrun = wait_for(lambda: [t for t in list_testruns(kube) if (t.get("status") or {}).get("phase")], timeout=30)[0]
        assert testrun["status"]["phase"] == "Queued" and "workerPool" not in testrun["status"]
        assert "WorkerPool team-a/windows is refused, and takes no run: spec.ec2.reuse" in operator.log()

        mended = copy.deepcopy(kube.api("GET", f"{POOLS}/windows"))
        del mended["spec"]["ec2"]["reuse"], mended["spec"]["ec2"]["minLifetimeSeconds"]
        kube.api("PUT", f"{POOLS}/windows", mended)
        assert wait_for(lambda: (accepted(kube, "windows") or {}).get("status") == "True", timeout=20)
        placed = wait_for(lambda: [t for t in list_testruns(kube) if (t.get("status") or {}).get("workerPool")], timeout=30)
        assert placed[0]["status"]["workerPool"] == "windows"
