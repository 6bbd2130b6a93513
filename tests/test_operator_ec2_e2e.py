"""Runs as EC2 instances, end to end (issue 10): the real `testlooper operator` process against
the Kubernetes emulator, a real redis-server, git and a real moto_server standing in for EC2
(boto3 in the operator pointed at it by AWS_ENDPOINT_URL, with fake keys), and this test as the
machines: tests/ec2_player.py boots each instance the operator launches from its user-data
(the Linux script itself under bash; the Windows one read off its script), so the agent, run
locally with the run's token, does the run through the operator's worker API.
"""

from __future__ import annotations

import base64
import json
import shlex
import threading
import time

import pytest

from cluster_helpers import NAMESPACE, condition, list_testruns, repo_object
from ec2_player import (
    LINUX_AMI, WINDOWS_AMI, Ec2Player, Ec2FaultProxy, make_network, moto_client, parse_windows_user_data, reset_moto,
)
from moto_server import start_moto_server
from run_cluster import apply_repo, ended_testruns, push_project, redis_url, start_operator  # noqa: F401
from redis_server import free_port
from run_helpers import wait_for
from test_operator_e2e import check_rbac_subset
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name
from testlooper.store import open_store
from testlooper.workerapi import tokens

WORKER_TAG = "testlooper-worker"
HOST_IPS = {"git.internal": "10.0.0.10"}
LINUX_TYPES = [{"type": "t3.medium", "cores": 2, "ramGb": 4, "hourlyPrice": 0.0416},
               {"type": "m5.xlarge", "cores": 4, "ramGb": 16, "hourlyPrice": 0.192},
               {"type": "r5.8xlarge", "cores": 32, "ramGb": 256, "hourlyPrice": 2.016}]
WINDOWS_TYPES = LINUX_TYPES[:2]
NODE_POOL = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "nodes"},
             "spec": {"provider": "kubernetes", "platform": "linux", "priority": 10, "defaultImage": "busybox:1.36",
                      "maxWorkers": 4, "maxPodRamGb": 64}}
# Short timers, so that a sweep, a pool status and a lost instance are seen within seconds.
FAST = ["--ec2-sweep-interval", "1", "--pool-status-interval", "1", "--missing-pod-grace", "3",
        "--result-grace", "3"]
SUMMARY = """printf '{"%s": true, "on_the_machine": true}' "$1" > "$TEST_OUTPUT_DIR/testSummary.json"\n"""


def ec2_pool(name, platform, network, types, **caps):
    ami = {"windowsAmi": WINDOWS_AMI} if platform == "windows" else {"linuxAmi": LINUX_AMI}
    return {"apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": name},
            "spec": {"provider": "ec2", "platform": platform, **caps,
                     "ec2": {"region": "us-east-1", "vpcId": network["vpc"], "subnetId": network["subnet"],
                             "securityGroupIds": [network["group"]], "instanceTypes": types, "hostIps": HOST_IPS,
                             **ami}}}


def definitions(tasks: str) -> str:
    return f"""\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {{name: "busybox:1.36"}}
  windows:
    platform: windows
    image: {{name: "mcr.microsoft.com/windows/servercore:ltsc2022"}}
{tasks}"""


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    clock = tmp_path_factory.mktemp("moto") / "launch-clock"
    process, port = start_moto_server(launch_clock_file=clock)
    yield f"http://127.0.0.1:{port}", clock
    process.kill()
    process.wait()


@pytest.fixture
def ec2(moto, tmp_path):
    """(endpoint, boto3 client, network, launch clock file, player), moto fresh; the player stops
    at the test's end with none of its machines' processes left."""
    endpoint, clock = moto
    reset_moto(endpoint)
    clock.write_text("")
    client = moto_client(endpoint)
    player = Ec2Player(endpoint, tmp_path / "ec2", worker_tags=[WORKER_TAG])
    with player:
        yield endpoint, client, make_network(client), clock, player
    assert player.machine_processes() == []


def operator_for(kube, tmp_path, redis_url, endpoint, pools, args=()):  # noqa: F811
    """The operator (a context manager) with the pools made and boto3 pointed at moto."""
    operator = start_operator(kube, tmp_path, redis_url, pools[0], args=[*FAST, *args])
    for pool in pools[1:]:
        kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools", pool)
    operator.extra_env.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")})
    return operator


def instance_state(client, instance_id):
    return client.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


def live_instances(client):
    """Every instance in moto not terminated, with or without our tag."""
    pages = client.get_paginator("describe_instances").paginate(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopping", "stopped"]}])
    return [raw for page in pages for reservation in page["Reservations"] for raw in reservation["Instances"]]


def phases(kube) -> str:
    """What a failed wait shows: each TestRun's task, phase and message (else the Repo's status)."""
    if not list_testruns(kube):
        return f"no TestRun; the Repo's status: {repo_object(kube).get('status')}"
    return ", ".join(f"{item['spec']['task']}: {(item.get('status') or {}).get('phase')} "
                     f"{(item.get('status') or {}).get('message', '')}".strip() for item in list_testruns(kube))


def shown(*statuses) -> str:
    """A TestRun status's counts, attempts and message, for an assertion's message."""
    return "; ".join(json.dumps({key: status.get(key) for key in ("phase", "runCounts", "attempts", "message")})
                     for status in statuses)


def workerpool(kube, name):
    return kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools/{name}")


def operator_secret(kube) -> bytes:
    secret = kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/testlooper-operator")
    return base64.b64decode(secret["data"]["secret"])


def linux_user_data_values(script: str) -> dict:
    """The operator URL, run id and token a Linux user-data script sets (its shell assignments)."""
    values = {}
    for line in script.splitlines():
        for name in ("API_URL", "RUN_ID", "export TESTLOOPER_WORKER_TOKEN"):
            if line.startswith(name + "="):
                values[name.split()[-1]] = shlex.split(line[len(name) + 1:])[0]
    return values


def test_a_windows_task_and_a_200_gb_task_launch_their_type_ami_tags_and_user_data_and_pass(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  big/linux:
    command: sh src/summary.sh big_ran
    dependencies: {src: HEAD}
    min_ram_gb: 200
  check/windows:
    command: sh src/summary.sh windows_ran
    dependencies: {src: HEAD}
"""
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pools = [NODE_POOL, ec2_pool("linux-ec2", "linux", network, LINUX_TYPES, maxWorkers=4),
             ec2_pool("windows-ec2", "windows", network, WINDOWS_TYPES, maxWorkers=4)]
    throttling = Ec2FaultProxy(endpoint)  # EC2 says "slow down" to the first launches and listings
    throttling.throttle("RunInstances", 2)
    throttling.throttle("DescribeInstances", 2)
    operator = operator_for(kube, tmp_path, redis_url, throttling.url, pools)
    # EC2 workers reach the operator by another name than --api-url (as through an Ingress).
    ec2_api_url = f"http://localhost:{operator.fixed_port}"
    operator.args += ["--ec2-api-url", ec2_api_url]
    with throttling, operator:
        apply_repo(kube, url)
        by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=60, interval=0.3,
                           what=lambda: f"both TestRuns ended ({phases(kube)}); player errors {player.errors}, boots "
                                        f"{[(b.run_id, b.powered_off) for b in player.boots.values()]}")
        assert player.errors == []
        big, check = by_task["big/linux"]["status"], by_task["check/windows"]["status"]
        assert (big["phase"], big["result"], big["workerPool"]) == ("Succeeded", "passed", "linux-ec2"), big
        assert (check["phase"], check["result"], check["workerPool"]) == ("Succeeded", "passed", "windows-ec2"), check
        assert check["cases"] == {"total": 2, "passed": 2, "failed": 0}
        secret = operator_secret(kube)
        expected = {"big/linux": ("linux", "r5.8xlarge", LINUX_AMI, "linux-ec2"),  # the smallest with 200 GB
                    "check/windows": ("windows", "t3.medium", WINDOWS_AMI, "windows-ec2")}
        for task, (platform, instance_type, ami, pool) in expected.items():
            run_id = f"{NAMESPACE}.{testrun_name('demo', commit, task)}.1.1"
            boot = player.boot_of_run(run_id)
            assert boot is not None, (run_id, sorted(b.run_id for b in player.boots.values()))
            assert (boot.platform, boot.instance_type, boot.ami) == (platform, instance_type, ami), task
            assert boot.tags[WORKER_TAG] == f"{NAMESPACE}/{pool}" and boot.tags["testlooper:pool"] == f"{NAMESPACE}/{pool}"
            assert boot.tags["testlooper:run"] == run_id and boot.tags["testlooper:repo"].endswith("demo"), boot.tags
            assert (boot.subnet_id, boot.security_group_ids) == (network["subnet"], [network["group"]])
            assert boot.shutdown_behaviour == "terminate"
            if platform == "windows":
                script = parse_windows_user_data(boot.user_data)
                carried = {"API_URL": script.api_url, "RUN_ID": script.run_id, "TESTLOOPER_WORKER_TOKEN": script.token}
            else:
                assert boot.user_data.startswith("#!/bin/bash\n")
                carried = linux_user_data_values(boot.user_data)
            # The URL EC2 workers use, the run, and that run's own token: nothing else secret.
            assert carried == {"API_URL": ec2_api_url, "RUN_ID": run_id,
                               "TESTLOOPER_WORKER_TOKEN": tokens.run_token(secret, run_id)}, task
            assert secret.hex() not in boot.user_data and base64.b64encode(secret).decode() not in boot.user_data
            assert carried["TESTLOOPER_WORKER_TOKEN"] not in operator.log()
            assert "10.0.0.10 git.internal" in boot.hosts_file.read_text()
            # The run done, the instance is terminated (by its shutdown, or by the operator).
            wait_for(lambda: instance_state(client, boot.instance_id) == "terminated", timeout=20,
                     what=f"{task}'s instance terminated")
            assert operator.metric("testlooper_ec2_launches_total", namespace=NAMESPACE, pool=pool,
                                   type=instance_type) == 1
        assert len(player.boots) == 2 and live_instances(client) == []
        # The throttled calls were retried after a pause: nothing failed, nothing launched twice.
        assert sorted(throttling.throttled) == ["DescribeInstances"] * 2 + ["RunInstances"] * 2
        assert "EC2 RunInstances throttled (RequestLimitExceeded); retrying in" in operator.log()
        # Each pool's status forgets its instances once they are terminated.
        for pool in ("linux-ec2", "windows-ec2"):
            wait_for(lambda: not (workerpool(kube, pool).get("status") or {}).get("instances"), timeout=10,
                     what=f"{pool}'s status with no instance")
        # The runs' token Secrets (made as for pods) go with their runs.
        wait_for(lambda: [item["metadata"]["name"] for item in
                          kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"]]
                 == ["testlooper-operator"], timeout=10, what="the runs' token Secrets deleted")
        # Nothing of the run controller is left for kopf to wait out at the exit (its 5 s for
        # every task still running, then a cancel): the operator stops at once.
        stopping = time.monotonic()
        assert operator.stop() == 0
        assert time.monotonic() - stopping < 4, operator.log()[-3000:]
    store = open_store(redis_url)
    try:
        recorded = {run.task: run for run in store.runs(f"{NAMESPACE}/demo", commit, with_cases=True)}
    finally:
        store.close()
    assert {task: run.result for task, run in recorded.items()} == {"big/linux": "passed", "check/windows": "passed"}
    assert {case.name for case in recorded["check/windows"].cases} == {"windows_ran", "on_the_machine"}
    check_rbac_subset(kube.permissions(client="operator"))
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_the_caps_hold_under_50_queued_runs_and_the_pool_status_lists_instances_and_cost(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  small/linux:
    command: sleep 0.5; sh src/summary.sh small
    dependencies: {src: HEAD}
    min_cores: 2
    runs: 35
  wide/linux:
    command: sleep 0.5; sh src/summary.sh wide
    dependencies: {src: HEAD}
    min_ram_gb: 10
    runs: 15
"""
    url, _commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    caps = {"maxWorkers": 10, "maxCores": 24, "maxRamGb": 64}
    types = {entry["type"]: entry for entry in LINUX_TYPES[:2]}  # t3.medium (2, 4) and m5.xlarge (4, 16)
    pool = ec2_pool("caps-ec2", "linux", network, list(types.values()), **caps)
    highest = {"workers": 0, "cores": 0, "ramGb": 0}
    statuses, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            live = live_instances(client)
            held = {"workers": len(live), "cores": sum(types[raw["InstanceType"]]["cores"] for raw in live),
                    "ramGb": sum(types[raw["InstanceType"]]["ramGb"] for raw in live)}
            for key, value in held.items():
                highest[key] = max(highest[key], value)
            status = workerpool(kube, "caps-ec2").get("status") or {}
            if status.get("instances"):
                statuses.append(status)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    with operator_for(kube, tmp_path, redis_url, endpoint, [pool]) as operator:
        sampler.start()
        try:
            apply_repo(kube, url)
            by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=80, interval=0.5,
                               what=lambda: f"both TestRuns ended ({phases(kube)}; highest use {highest}, "
                                            f"{len(player.boots)} instances launched, errors {player.errors})")
        finally:
            stop.set()
            sampler.join(timeout=10)
        assert player.errors == []
        small, wide = by_task["small/linux"]["status"], by_task["wide/linux"]["status"]
        assert (small["phase"], small["runsSummary"], wide["phase"], wide["runsSummary"]) == (
            "Succeeded", "35/35", "Succeeded", "15/15"), shown(small, wide)
        # Never past a cap, and the caps were reached: the runs queued for room.
        assert highest["workers"] <= caps["maxWorkers"] and highest["cores"] <= caps["maxCores"] \
            and highest["ramGb"] <= caps["maxRamGb"], highest
        assert highest["workers"] == caps["maxWorkers"] or highest["cores"] >= caps["maxCores"] - 2 \
            or highest["ramGb"] >= caps["maxRamGb"] - 4, highest
        # One instance per run, of the type its task asks for.
        by_type = {}
        for boot in player.boots.values():
            by_type.setdefault(boot.instance_type, set()).add(boot.run_id)
        assert {kind: len(runs) for kind, runs in by_type.items()} == {"t3.medium": 35, "m5.xlarge": 15}, by_type
        assert operator.metric("testlooper_ec2_launches_total", namespace=NAMESPACE, pool="caps-ec2",
                               type="t3.medium") == 35
        # The pool's status listed the instances it held, each with its run, and their cost.
        assert statuses, "the pool's status never listed an instance"
        for status in statuses:
            entries = status["instances"]
            assert len(entries) <= caps["maxWorkers"]
            assert all(entry["instanceId"].startswith("i-") and entry["type"] in types and entry.get("run")
                       and entry["state"] in ("pending", "running", "shutting-down", "stopping", "stopped")
                       for entry in entries), entries
            assert status["costPerHour"] == pytest.approx(sum(types[e["type"]]["hourlyPrice"] for e in entries),
                                                          abs=1e-6), status
        assert any(status["costPerHour"] > 0 for status in statuses)
        wait_for(lambda: live_instances(client) == [], timeout=20, what="every instance terminated")
        wait_for(lambda: not (workerpool(kube, "caps-ec2").get("status") or {}).get("instances"), timeout=10,
                 what="the pool's status with no instance")
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_orphans_are_reaped_by_the_sweep_and_counted_and_nothing_else_is_touched(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, clock, player = ec2
    player.hold(lambda boot: True)  # these machines never boot: only the sweep acts on them
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)

    def launch(tags, launched_ago=0):
        clock.write_text(str(launched_ago))
        try:
            return client.run_instances(ImageId=LINUX_AMI, InstanceType="t3.medium", MinCount=1, MaxCount=1,
                                        SubnetId=network["subnet"], TagSpecifications=[{
                                            "ResourceType": "instance",
                                            "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}],
                                        )["Instances"][0]["InstanceId"]
        finally:
            clock.write_text("")

    ours = {WORKER_TAG: f"{NAMESPACE}/linux-ec2", "testlooper:pool": f"{NAMESPACE}/linux-ec2"}
    # Launched 10 minutes ago for a run no TestRun has (an operator that crashed after launching).
    orphan = launch({**ours, "testlooper:run": f"{NAMESPACE}.gone-0123456789.1.1"}, launched_ago=600)
    untagged_run = launch(ours, launched_ago=600)  # our worker tag and no run tag: an orphan too
    young = launch({**ours, "testlooper:run": f"{NAMESPACE}.gone-0123456789.2.1"})  # within the launch grace
    someone_elses = launch({"Name": "build-box"}, launched_ago=600)
    other_installation = launch({"other-testlooper-worker": f"{NAMESPACE}/linux-ec2",
                                 "testlooper:run": f"{NAMESPACE}.gone-0123456789.3.1"}, launched_ago=600)
    with operator_for(kube, tmp_path, redis_url, endpoint, [pool]) as operator:
        wait_for(lambda: {instance_state(client, orphan), instance_state(client, untagged_run)} == {"terminated"},
                 timeout=20, what="the orphans terminated by the sweep")
        wait_for(lambda: operator.metric("testlooper_ec2_orphans_reaped_total", namespace=NAMESPACE,
                                         pool="linux-ec2") == 2, timeout=10, what="the orphans counted")
        assert operator.metric("testlooper_ec2_terminations_total", namespace=NAMESPACE, pool="linux-ec2",
                               reason="Orphan") == 2
        time.sleep(2.5)  # two more sweeps: still nothing else is touched
        assert {name: instance_state(client, instance) for name, instance in
                {"young": young, "someone else's": someone_elses, "another installation's": other_installation}.items()} \
            == {"young": "running", "someone else's": "running", "another installation's": "running"}
        assert operator.metric("testlooper_ec2_instances", namespace=NAMESPACE, pool="linux-ec2",
                               state="running") == 1
        assert orphan in operator.log() and "Traceback" not in operator.log()


def test_an_instance_terminated_behind_our_back_is_retried_on_a_new_instance_and_passes(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  slow/linux:
    command: sleep 2; sh src/summary.sh survived
    dependencies: {src: HEAD}
"""
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)
    name = testrun_name("demo", commit, "slow/linux")
    first_run, second_run = f"{NAMESPACE}.{name}.1.1", f"{NAMESPACE}.{name}.1.2"
    with operator_for(kube, tmp_path, redis_url, endpoint, [pool]) as operator:
        apply_repo(kube, url)
        first = wait_for(lambda: player.boot_of_run(first_run), timeout=30, what="the first attempt's instance")
        wait_for(lambda: player.agent_running(first.instance_id), timeout=20, what="its agent running")
        player.terminate_behind_back(first.instance_id)  # as from the console, mid-run
        by_task = wait_for(lambda: ended_testruns(kube, 1), timeout=60, interval=0.3,
                           what=lambda: f"the TestRun ended ({phases(kube)}); boots {[(b.run_id, b.powered_off) for b in player.boots.values()]}")
        status = by_task["slow/linux"]["status"]
        assert (status["phase"], status["result"], status["runsSummary"]) == ("Succeeded", "passed", "1/1"), status
        assert [(a["run"], a["attempt"], a["reason"]) for a in status["attempts"]] == [(1, 1, "InstanceLost")]
        second = player.boot_of_run(second_run)
        assert second is not None and second.instance_id != first.instance_id
        assert first.powered_off == "gone" and player.errors == []
        assert operator.metric("testlooper_infra_retries_total", namespace=NAMESPACE, reason="InstanceLost") == 1
        wait_for(lambda: live_instances(client) == [], timeout=20, what="every instance terminated")
        assert len(player.boots) == 2
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_a_task_no_instance_type_fits_ends_as_an_error_unschedulable_naming_the_largest_type(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  huge/linux:
    command: echo never
    min_ram_gb: 2000
"""
    url, _commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks)})
    pools = [NODE_POOL, ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)]
    with operator_for(kube, tmp_path, redis_url, endpoint, pools) as operator:
        apply_repo(kube, url)
        testrun = wait_for(lambda: ended_testruns(kube, 1), timeout=30, interval=0.3,
                           what=lambda: f"the TestRun ended ({phases(kube)})")["huge/linux"]
        status = testrun["status"]
        assert (status["phase"], status["result"], status["runCounts"]["errored"]) == ("Error", "error", 1), status
        why = ("pool linux-ec2: the task asks for 0 cores and 2000 GB of RAM; the largest type on offer is "
               "r5.8xlarge (32 cores, 256 GB)")
        unschedulable = condition(testrun, "Unschedulable")
        assert (unschedulable["status"], unschedulable["message"]) == ("True", why), status
        assert status["message"] == f"unschedulable: {why}"
        time.sleep(1.5)  # it stays so: nothing is launched for it, then or later
        assert player.boots == {} and live_instances(client) == []
        assert list_testruns(kube)[0]["status"]["phase"] == "Error"
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_a_machine_that_never_boots_hangs_or_fails_its_checks_is_retried_and_a_cancelled_runs_instance_goes(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  stuck/linux:
    command: sh src/summary.sh booted
    dependencies: {src: HEAD}
  hung/linux:
    command: touch "$HOME/task-started"; sleep 2; sh src/summary.sh survived
    dependencies: {src: HEAD}
  sick/linux:
    command: touch "$HOME/task-started"; sleep 2; sh src/summary.sh recovered
    dependencies: {src: HEAD}
  cancelled/linux:
    command: sleep 60
    dependencies: {src: HEAD}
"""
    url, commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)
    names = {task: testrun_name("demo", commit, f"{task}/linux") for task in ("stuck", "hung", "sick", "cancelled")}
    first = {task: f"{NAMESPACE}.{name}.1.1" for task, name in names.items()}
    player.hold(lambda boot: boot.run_id == first["stuck"])  # its machine never gets to its user-data
    faults = Ec2FaultProxy(endpoint)  # EC2 as the operator sees it: the sick machine's checks fail
    with faults, operator_for(kube, tmp_path, redis_url, faults.url, [pool],
                              args=["--ec2-boot-timeout", "6", "--heartbeat-grace", "6"]) as operator:
        apply_repo(kube, url)
        boots = {task: wait_for(lambda: player.boot_of_run(first[task]), timeout=30, what=f"the {task} run's instance")
                 for task in ("hung", "sick", "cancelled")}
        # Their tasks have started, so their agents have beaten (an agent beats first, then
        # fetches its run).
        for task in ("hung", "sick"):
            wait_for(lambda: (boots[task].root / "task-started").exists(), timeout=20, what=f"the {task} task started")
        wait_for(lambda: player.agent_running(boots["cancelled"].instance_id), timeout=20,
                 what="the cancelled run's agent")
        player.freeze(boots["hung"].instance_id)  # the machine hangs: its agent falls silent, the instance runs on
        faults.impair(boots["sick"].instance_id)  # EC2 reports its instance status check impaired
        kube.kubectl("patch", "testrun", names["cancelled"], "-n", NAMESPACE, "--type", "merge",
                     "-p", '{"spec": {"cancel": true}}')
        by_task = wait_for(lambda: ended_testruns(kube, 4), timeout=60, interval=0.3,
                           what=lambda: f"the TestRuns ended ({phases(kube)}); boots "
                                        f"{[(b.run_id, b.powered_off) for b in player.boots.values()]}")
        for task, reason in (("stuck", "BootTimedOut"), ("hung", "HeartbeatLost"), ("sick", "StatusChecksFailed")):
            status = by_task[f"{task}/linux"]["status"]
            assert (status["phase"], status["result"]) == ("Succeeded", "passed"), (task, shown(status))
            assert [(a["run"], a["attempt"], a["reason"]) for a in status["attempts"]] == [(1, 1, reason)], task
            assert player.boot_of_run(f"{NAMESPACE}.{names[task]}.1.2") is not None, task
            assert operator.metric("testlooper_ec2_terminations_total", namespace=NAMESPACE, pool="linux-ec2",
                                   reason=reason) == 1, task
        assert by_task["cancelled/linux"]["status"]["phase"] == "Cancelled"
        boots["stuck"] = player.boot_of_run(first["stuck"])
        # The operator terminated the failed ones and the cancelled run's: none is left running.
        wait_for(lambda: {instance_state(client, boot.instance_id) for boot in boots.values()} == {"terminated"},
                 timeout=20, what="the four first instances terminated")
        assert {task: boots[task].powered_off for task in ("hung", "sick", "cancelled")} == {
            "hung": "frozen", "sick": "gone", "cancelled": "gone"}
        assert operator.metric("testlooper_ec2_terminations_total", namespace=NAMESPACE, pool="linux-ec2",
                               reason="RunCancelled") == 1
        wait_for(lambda: live_instances(client) == [], timeout=20, what="every instance terminated")
        assert player.errors == []
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_an_operator_killed_mid_run_finds_its_instances_again_and_launches_none_twice(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  long/linux:
    command: touch "$HOME/task-started"; sleep 3; sh src/summary.sh outlived_the_operator
    dependencies: {src: HEAD}
    runs: 3
"""
    url, _commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES, maxWorkers=3)
    operator = operator_for(kube, tmp_path, redis_url, endpoint, [pool])
    with operator:
        apply_repo(kube, url)
        wait_for(lambda: len(player.boots) == 3 and all((boot.root / "task-started").exists()
                                                        for boot in player.boots.values()),
                 timeout=30, what="three runs' tasks started on their instances")
        # Each run's token is in its Secret, made as for a pod, and is the one its user-data carries.
        secrets = {item["metadata"]["annotations"][pod_builder.RUN_ID_ANNOTATION]:
                   base64.b64decode(item["data"][pod_builder.TOKEN_KEY]).decode()
                   for item in kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets")["items"]
                   if pod_builder.RUN_ID_ANNOTATION in (item["metadata"].get("annotations") or {})}
        assert secrets == {boot.run_id: linux_user_data_values(boot.user_data)["TESTLOOPER_WORKER_TOKEN"]
                           for boot in player.boots.values()}
        operator.kill()  # SIGKILL: nothing of its own shutdown runs; the instances run on
        time.sleep(1)
        operator.start()  # the same port: the agents' URL
        by_task = wait_for(lambda: ended_testruns(kube, 1), timeout=40, interval=0.3,
                           what=lambda: f"the TestRun ended ({phases(kube)})")
        status = by_task["long/linux"]["status"]
        assert (status["phase"], status["result"], status["runsSummary"]) == ("Succeeded", "passed", "3/3"), status
        assert "attempts" not in status, status["attempts"]
        assert status["cases"] == {"total": 6, "passed": 6, "failed": 0}
        # The restarted operator counted the instances it found: it launched none again.
        assert len(player.boots) == 3 and player.errors == []
        assert operator.metric("testlooper_ec2_launches_total", namespace=NAMESPACE, pool="linux-ec2",
                               type="t3.medium") == 0
        wait_for(lambda: live_instances(client) == [], timeout=20, what="every instance terminated")
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_ec2_unreachable_is_the_pools_condition_and_its_runs_wait_then_pass_when_it_answers(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  patient/linux:
    command: sh src/summary.sh waited
    dependencies: {src: HEAD}
"""
    url, _commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)
    ec2_port = free_port()  # nothing answers there yet
    with operator_for(kube, tmp_path, redis_url, f"http://127.0.0.1:{ec2_port}", [pool]) as operator:
        apply_repo(kube, url)
        down = wait_for(lambda: condition(workerpool(kube, "linux-ec2"), "Ec2Available").get("status") == "False"
                        and condition(workerpool(kube, "linux-ec2"), "Ec2Available"), timeout=20,
                        what="the pool's Ec2Available False")
        assert down["reason"] == "Ec2Error" and "\n" not in down["message"], down
        assert down["message"].startswith("EC2 DescribeInstances failed: Could not connect to the endpoint URL"), down
        time.sleep(1.5)  # a sweep and admission rounds more: the run waits, it is not failed
        testrun = list_testruns(kube)[0]
        assert (testrun.get("status") or {}).get("phase") in ("Queued", "Running"), testrun.get("status")
        assert player.boots == {} and live_instances(client) == []
        with Ec2FaultProxy(endpoint, port=ec2_port):  # EC2 answers
            by_task = wait_for(lambda: ended_testruns(kube, 1), timeout=30, interval=0.3,
                               what=lambda: f"the TestRun ended ({phases(kube)})")
            assert by_task["patient/linux"]["status"]["result"] == "passed"
            assert "attempts" not in by_task["patient/linux"]["status"]
            up = wait_for(lambda: condition(workerpool(kube, "linux-ec2"), "Ec2Available").get("status") == "True"
                          and condition(workerpool(kube, "linux-ec2"), "Ec2Available"), timeout=10,
                          what="the pool's Ec2Available True again")
            assert up["reason"] == "Listed"
            wait_for(lambda: live_instances(client) == [], timeout=20, what="every instance terminated")
            assert len(player.boots) == 1
    assert "Traceback" not in operator.log(), operator.log()[-5000:]


def test_a_cluster_internal_operator_url_launches_nothing_and_says_so_in_the_pool(
        kube, tmp_path, redis_url, ec2):  # noqa: F811 - the fixture
    endpoint, client, network, _clock, player = ec2
    tasks = """\
tests:
  stranded/linux:
    command: sh src/summary.sh never
    dependencies: {src: HEAD}
"""
    url, _commit = push_project(tmp_path, {"testlooper.yml": definitions(tasks), "summary.sh": SUMMARY})
    pool = ec2_pool("linux-ec2", "linux", network, LINUX_TYPES)
    internal = "http://testlooper.testlooper.svc:8080"  # an instance outside the cluster never resolves it
    with operator_for(kube, tmp_path, redis_url, endpoint, [pool], args=["--ec2-api-url", internal]) as operator:
        apply_repo(kube, url)
        said = wait_for(lambda: condition(workerpool(kube, "linux-ec2"), "Ec2Available").get("reason")
                        == "UnreachableApiUrl" and condition(workerpool(kube, "linux-ec2"), "Ec2Available"),
                        timeout=20, what="the pool's Ec2Available UnreachableApiUrl")
        assert said["status"] == "False" and internal in said["message"] and "\n" not in said["message"], said
        time.sleep(1.5)
        assert player.boots == {} and live_instances(client) == []
        assert (list_testruns(kube)[0].get("status") or {}).get("phase") in ("Queued", "Running")
    assert "Traceback" not in operator.log(), operator.log()[-5000:]
