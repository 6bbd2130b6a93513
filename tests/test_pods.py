"""A run's Pod and Secret (kube/pods.py), and the pod run end to end: the test kubelet runs the
built pod's containers (prepare, then test and report together) against a real worker API."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kubelet import PodRefused, TestKubelet, run_agent_alone, running_status
from pod_helpers import (DEMO, NAMESPACE, WORKER_IMAGE, check_manifests, demo_definitions, pool_object,
                         resolved_tasks, run_task_in_pod, testrun_object)
from testlooper.kube import pods
from worker_helpers import api_server  # noqa: F401

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the pods' script needs /bin/sh")

TOKEN = "f" * 64


@pytest.fixture(scope="module")
def demo():
    return demo_definitions()


def build(task, pool=None, **options):
    testrun = testrun_object(task)
    return testrun, pods.build_run_pod(testrun, run_index=2, attempt=3, pool=pool or pool_object(),
                                       api_url="http://testlooper-api.ci:8080", worker_image=WORKER_IMAGE,
                                       token_secret_name="the-token", **options)


def containers(pod):
    spec = pod["spec"]
    return {container["name"]: container for container in spec["initContainers"] + spec["containers"]}


# -- names -----------------------------------------------------------------------------------------


def test_pod_names_are_deterministic_dns_labels():
    assert pods.run_pod_name("demo-0123abcd-unit-linux-9f8e7d6c5b", 2, 1) == "demo-0123abcd-unit-linux-9f8e7d6c5b-r2-a1"
    long_name = "x" * 60
    cut = pods.run_pod_name(long_name, 100000, 12)
    assert cut == pods.run_pod_name(long_name, 100000, 12)
    assert len(cut) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cut) and cut.endswith("-r100000-a12")
    # Names that cut alike stay apart; unusual characters are made DNS-safe.
    assert pods.run_pod_name(long_name + "a", 1, 1) != pods.run_pod_name(long_name + "b", 1, 1)
    assert re.fullmatch(r"[a-z0-9-]+", pods.run_pod_name("Odd.Name", 1, 1))
    assert pods.run_id("ci", "demo-x", 3, 2) == "ci.demo-x.3.2"
    with pytest.raises(ValueError, match="run index"):
        pods.run_pod_name("demo", 0, 1)


# -- the built manifests ---------------------------------------------------------------------------


def test_every_demo_task_builds_a_valid_pod_and_secret(demo):
    tasks = {**demo["builds"], **demo["tests"]}
    documents = []
    for task in tasks.values():
        testrun, pod = build(task)
        documents += [pod, pods.build_run_secret(testrun, pods.run_id(NAMESPACE, testrun["metadata"]["name"], 2, 3),
                                                 TOKEN)]
    checked = check_manifests(*documents)
    assert [entry["problem"] for entry in checked] == [""] * len(documents)
    # The typed models know every field written: nothing is dropped or renamed on the way.
    assert [entry["round_tripped"] for entry in checked] == documents


def test_the_pod_layout(demo):
    task = demo["tests"]["unit/linux"]
    testrun, pod = build(task)
    name = testrun["metadata"]["name"]
    metadata, spec = pod["metadata"], pod["spec"]
    assert metadata["name"] == f"{name}-r2-a3" and metadata["namespace"] == NAMESPACE
    assert metadata["labels"] == {"testlooper.dev/testrun": name, "testlooper.dev/run-index": "2",
                                  "testlooper.dev/attempt": "3", "app.kubernetes.io/managed-by": "testlooper"}
    assert metadata["annotations"] == {"testlooper.dev/run-id": f"ci.{name}.2.3",
                                       "testlooper.dev/token-secret": "the-token"}
    assert metadata["ownerReferences"] == [{"apiVersion": "testlooper.dev/v1alpha1", "kind": "TestRun", "name": name,
                                            "uid": testrun["metadata"]["uid"], "controller": True,
                                            "blockOwnerDeletion": True}]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["shareProcessNamespace"] is False
    assert spec["activeDeadlineSeconds"] == 120 + pods.DEFAULT_DEADLINE_GRACE_SECONDS  # the demo's test_timeout
    assert [container["name"] for container in spec["initContainers"]] == ["prepare"]
    assert [container["name"] for container in spec["containers"]] == ["test", "report"]
    by_name = containers(pod)
    test = by_name["test"]
    assert test["image"] == "python:3.11-slim"  # the task's image.name
    assert test["command"] == ["/bin/sh", pods.STAGE_SCRIPT]
    assert [mount["name"] for mount in test["volumeMounts"]] == ["workspace"]  # no token, no agent
    assert "env" not in test
    for worker in ("prepare", "report"):
        container = by_name[worker]
        assert container["image"] == WORKER_IMAGE and container["command"][:3] == ["python3", "-S", "-E"]
        assert {mount["name"] for mount in container["volumeMounts"]} == {"agent", "workspace", "token"}
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == pods.DEFAULT_WORKER_USER
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert "--token-file" in container["args"]
        assert container["env"] == [{"name": "TESTLOOPER_API_URL", "value": "http://testlooper-api.ci:8080"}]
    assert by_name["prepare"]["command"][3] == pods.AGENT_IN_IMAGE
    assert by_name["report"]["command"][3] == pods.AGENT_COPY  # the copy prepare made
    assert test["securityContext"] == {"allowPrivilegeEscalation": False}  # as the image says
    token_volume = next(volume for volume in spec["volumes"] if volume["name"] == "token")
    assert token_volume["secret"]["secretName"] == "the-token"


def test_resources_security_and_placement_follow_the_task_and_the_pool(demo):
    task = {**demo["tests"]["unit/linux"], "min_cores": 2, "max_cores": 4, "min_ram_gb": 1.5, "timeout_seconds": 30,
            "image": {}}
    pool = pool_object(defaultImage="busybox:1.36", testRunAsUser=1000, nodeSelector={"pool": "ci"},
                       tolerations=[{"key": "ci", "operator": "Exists", "effect": "NoSchedule"}])
    _testrun, pod = build(task, pool, deadline_grace_seconds=90)
    test = containers(pod)["test"]
    assert test["image"] == "busybox:1.36"  # the task names no image: the pool's default
    assert test["resources"] == {"requests": {"cpu": "2", "memory": "1536Mi"}, "limits": {"cpu": "4"}}
    assert test["securityContext"] == {"allowPrivilegeEscalation": False, "runAsUser": 1000, "runAsGroup": 1000,
                                       "runAsNonRoot": True}
    assert containers(pod)["report"]["securityContext"]["runAsUser"] == 1000
    assert pod["spec"]["securityContext"]["fsGroup"] == 1000
    assert pod["spec"]["activeDeadlineSeconds"] == 120
    assert pod["spec"]["nodeSelector"] == {"pool": "ci", "kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == [{"key": "ci", "operator": "Exists", "effect": "NoSchedule"}]
    assert check_manifests(pod)[0]["problem"] == ""
    with pytest.raises(ValueError, match="names no image"):
        build({**task, "image": {}}, pool_object())
    with pytest.raises(ValueError, match="Windows tasks and pools cannot run as pods yet"):
        build(task, pool_object(platform="windows", defaultImage="mcr.microsoft.com/windows/nanoserver"))


def test_a_pod_in_another_namespace_has_no_owner_reference(demo):
    # An owner in another namespace counts as absent: the garbage collector would delete the pod.
    testrun, pod = build(demo["tests"]["unit/linux"], pool_object(namespace="runners"))
    assert pod["metadata"]["namespace"] == "runners" and "ownerReferences" not in pod["metadata"]
    secret = pods.build_run_secret(testrun, "ci.x.2.3", TOKEN, namespace="runners")
    assert secret["metadata"]["namespace"] == "runners" and "ownerReferences" not in secret["metadata"]


def test_the_secret_holds_the_token_and_the_pod_never_does(demo):
    testrun, pod = build(demo["tests"]["unit/linux"])
    secret = pods.build_run_secret(testrun, pods.run_id(NAMESPACE, testrun["metadata"]["name"], 2, 3), TOKEN)
    assert secret["metadata"]["name"] == pods.run_secret_name(testrun["metadata"]["name"], 2, 3)
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "TestRun"
    assert TOKEN not in json.dumps(pod)


# -- the pod, run ----------------------------------------------------------------------------------


def test_the_demo_build_and_test_run_as_pods(demo, api_server, tmp_path):
    built = run_task_in_pod(api_server, demo["builds"]["calc/linux"], tmp_path)
    assert built.kubelet_run.phase == "Succeeded", built.log_text
    assert built.kubelet_run.init_exit_codes == {"prepare": 0}
    assert built.kubelet_run.exit_codes == {"test": 0, "report": 0}
    assert built.result["result"] == "passed" and built.result["exit_code"] == 0
    assert "build ok" in built.log_text
    (artifact,) = built.artifacts.values()
    with tarfile.open(artifact.path) as packed:
        assert "lib/calc.py" in packed.getnames()
    assert built.result["artifacts"] == [{"name": "", "format": "Tar", "size": artifact.size}]
    # The statuses a test patches into the API, as a kubelet would, are valid Pod statuses.
    final = built.kubelet_run.status(built.pod)
    assert final["phase"] == "Succeeded"
    assert [entry["state"]["terminated"]["exitCode"] for entry in final["containerStatuses"]] == [0, 0]
    checked = check_manifests({**built.pod, "status": running_status(built.pod)}, {**built.pod, "status": final})
    assert [entry["problem"] for entry in checked] == ["", ""]

    # The test consumes the build's artifact, served by the API like any input.
    tested = run_task_in_pod(api_server, demo["tests"]["unit/linux"], tmp_path,
                             inputs={"src": {"kind": "source", "path": str(DEMO)},
                                     "calc": {"kind": "build", "path": artifact.path}})
    assert tested.result["result"] == "passed", tested.log_text
    assert sorted(case["name"] for case in tested.result["cases"]) == ["test_add", "test_multiply", "test_subtract"]
    assert all(case["success"] for case in tested.result["cases"])
    assert "PASS test_add" in tested.log_text
    assert tested.kubelet_run.mounts["test"] == ["workspace"]


STAGED = """
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "alpine:3.20"}, test_timeout: 60}
  with_setup:
    platform: linux
    image: {name: "alpine:3.20", setup_script_contents: 'echo setup >> "$TEST_OUTPUT_DIR/trace"'}
tests:
  staged/linux:
    environment: with_setup
    stages:
      - {command: 'echo third >> "$TEST_OUTPUT_DIR/trace"', order: 3}
      - {command: 'echo first >> "$TEST_OUTPUT_DIR/trace"', order: 1,
         cleanup: 'echo first-cleanup >> "$TEST_OUTPUT_DIR/trace"'}
      - {list_tests_command: 'echo listed-case > "$TEST_LOOPER_TEST_LIST_OUTPUT"', order: 2,
         run_tests_command: 'echo "second ran $(cat "$TEST_LOOPER_TESTS_TO_RUN")" >> "$TEST_OUTPUT_DIR/trace"',
         artifacts: [{name: trace, include_patterns: [trace], format: Zip}]}
      - {command: 'env > "$TEST_OUTPUT_DIR/environment"; echo "<testsuite><testcase classname=\\"s\\" name=\\"ok\\"/></testsuite>" > "$TEST_OUTPUT_DIR/junit.xml"',
         order: 4}
  failing/linux:
    stages:
      - {command: 'echo before; exit 7', order: 1, cleanup: 'echo cleanup-ran >> "$TEST_OUTPUT_DIR/trace"'}
      - {command: 'echo skipped-stage-ran >> "$TEST_OUTPUT_DIR/trace"', order: 2}
      - {command: 'echo always >> "$TEST_OUTPUT_DIR/trace"', order: 3, always_run: true}
  slow/linux:
    timeout: 2
    stages:
      - {command: 'echo started; sleep 60', order: 1, cleanup: 'echo cleanup-after-timeout >> "$TEST_OUTPUT_DIR/trace"'}
      - {command: 'echo never >> "$TEST_OUTPUT_DIR/trace"', order: 2, always_run: true}
"""


@pytest.fixture(scope="module")
def staged():
    return resolved_tasks(STAGED)


SHELLS = [pytest.param(None, id="sh"),
          pytest.param(["busybox", "sh"], id="busybox", marks=pytest.mark.skipif(
              not shutil.which("busybox"), reason="busybox is not installed (alpine and busybox images' sh)")),
          pytest.param(["bash", "--posix"], id="bash", marks=pytest.mark.skipif(
              not shutil.which("bash"), reason="bash is not installed"))]


@pytest.mark.parametrize("shell", SHELLS)
def test_stages_run_in_order_and_the_token_stays_out_of_the_test(staged, api_server, tmp_path, shell):
    outcome = run_task_in_pod(api_server, staged["staged/linux"], tmp_path, shell=shell)
    assert outcome.result["result"] == "passed", outcome.log_text
    trace = (outcome.workspace / "output" / "trace").read_text().split("\n")
    assert trace == ["setup", "first", "first-cleanup", "second ran listed-case", "third", ""]
    assert outcome.result["cases"] == [{"name": "s.ok", "success": True, "duration_seconds": None}]
    assert sorted(outcome.artifacts) == ["trace"]
    assert outcome.artifacts["trace"].format == "Zip"
    # The test container's environment has the task's contract and no token, and nothing in
    # the shared volume holds it, though the worker containers read it.
    environment = (outcome.workspace / "output" / "environment").read_text()
    assert "TEST_LOOPER_TEST_ID=" + outcome.run_id in environment
    assert outcome.token not in environment and "TESTLOOPER_WORKER_TOKEN" not in environment
    assert not any(outcome.token in value for value in outcome.kubelet_run.environments["test"].values())
    holding = [path for path in outcome.workspace.rglob("*")
               if path.is_file() and not path.is_symlink() and outcome.token.encode() in path.read_bytes()]
    assert holding == []
    assert outcome.token not in outcome.log_text


def test_the_script_needs_nothing_but_sh(api_server, tmp_path):
    # No program on PATH at all: the script and these commands use /bin/sh's builtins only.
    tasks = resolved_tasks("""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "busybox:1.36"}}
tests:
  bare/linux:
    stages:
      - {command: 'printf "%s\\n" one >> "$TEST_OUTPUT_DIR/trace"', order: 1, cleanup: 'echo two >> "$TEST_OUTPUT_DIR/trace"'}
      - {command: 'echo "{\\"case\\": true}" > "$TEST_OUTPUT_DIR/testSummary.json"; exit 0', order: 2}
""")
    outcome = run_task_in_pod(api_server, tasks["bare/linux"], tmp_path, path="/nonexistent")
    assert outcome.result["result"] == "passed", outcome.log_text
    assert (outcome.workspace / "output" / "trace").read_text() == "one\ntwo\n"
    assert outcome.result["cases"] == [{"name": "case", "success": True, "duration_seconds": None}]


def test_a_log_past_its_limit_stops_the_task(api_server, tmp_path):
    tasks = resolved_tasks("""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "alpine:3.20"}}
tests:
  chatty/linux:
    max_log_mb: 1
    command: 'i=0; while [ $i -lt 40000 ]; do echo "line $i of a task that talks too much"; i=$((i+1)); done; sleep 30'
""")
    started = time.monotonic()
    outcome = run_task_in_pod(api_server, tasks["chatty/linux"], tmp_path)
    assert outcome.result["result"] == "failed", outcome.log_text
    assert "the log passed its limit of 1 MiB" in outcome.result["error"]
    assert time.monotonic() - started < 25
    assert len(outcome.log_text.encode()) <= 1024 * 1024 + 4096
    assert "bytes of output cut here" in outcome.log_text and "[testlooper] result: failed" in outcome.log_text


def test_each_stage_is_packed_before_the_next_runs(api_server, tmp_path):
    tasks = resolved_tasks("""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "alpine:3.20"}}
builds:
  packed/linux:
    stages:
      - {command: 'echo built > "$TEST_BUILD_OUTPUT_DIR/first"', order: 1, artifacts: [{name: first}]}
      - {command: 'rm "$TEST_BUILD_OUTPUT_DIR/first"; echo later > "$TEST_BUILD_OUTPUT_DIR/second"', order: 2,
         artifacts: [{name: second, format: Files}]}
""")
    outcome = run_task_in_pod(api_server, tasks["packed/linux"], tmp_path)
    assert outcome.result["result"] == "passed", outcome.log_text
    with tarfile.open(outcome.artifacts["first"].path) as packed:
        assert packed.getnames() == ["first"]  # what stage 1 left, though stage 2 removed it
    assert sorted(os.listdir(outcome.artifacts["second"].path)) == ["second"]
    assert [entry["name"] for entry in outcome.result["artifacts"]] == ["first", "second"]


def test_a_failing_stage_fails_the_run(staged, api_server, tmp_path):
    outcome = run_task_in_pod(api_server, staged["failing/linux"], tmp_path)
    assert outcome.result["result"] == "failed" and outcome.result["exit_code"] == 7
    assert (outcome.workspace / "output" / "trace").read_text().split() == ["cleanup-ran", "always"]
    assert "stage 2/3: skipped, an earlier step failed" in outcome.log_text
    assert outcome.kubelet_run.exit_codes == {"test": 7, "report": 0}  # the report container did its job


@pytest.mark.parametrize("shell", SHELLS)
def test_the_timeout_stops_the_step_and_still_runs_its_cleanup(staged, api_server, tmp_path, shell):
    started = time.monotonic()
    outcome = run_task_in_pod(api_server, staged["slow/linux"], tmp_path, shell=shell)
    assert outcome.result["result"] == "timeout", outcome.log_text
    assert outcome.result["error"] == "timed out after 2 s"
    assert time.monotonic() - started < 30  # the 60 s sleep was stopped
    assert (outcome.workspace / "output" / "trace").read_text().split() == ["cleanup-after-timeout"]
    assert "stage 2/2: not run (timeout)" in outcome.log_text
    assert outcome.kubelet_run.phase != "Succeeded" and outcome.kubelet_run.reason == ""


def test_kubernetes_stopping_the_pod_is_an_error_not_a_verdict(staged, api_server, tmp_path):
    # activeDeadlineSeconds with no grace fires before the task's own timeout: the kubelet sends
    # SIGTERM, and the report container says the infrastructure ended the run.
    task = {**staged["slow/linux"], "timeout_seconds": 3}
    outcome = run_task_in_pod(api_server, task, tmp_path, deadline_grace_seconds=0)
    assert outcome.kubelet_run.reason == "DeadlineExceeded"
    assert outcome.kubelet_run.status(outcome.pod)["reason"] == "DeadlineExceeded"
    assert outcome.result["result"] == "error"
    assert "stopped by Kubernetes" in outcome.result["error"]


def test_cancelling_through_the_api_stops_the_pod(staged, api_server, tmp_path):
    task = {**staged["slow/linux"], "timeout_seconds": 60}
    testrun = testrun_object(task)
    the_run_id = pods.run_id(NAMESPACE, testrun["metadata"]["name"], 1, 1)

    def cancel_once_running():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            run = api_server.find_run(the_run_id)
            if run is not None and run.phase.startswith("s1"):
                api_server.cancel(the_run_id)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_once_running, daemon=True)
    canceller.start()
    outcome = run_task_in_pod(api_server, task, tmp_path)
    canceller.join()
    assert outcome.result["result"] == "cancelled" and outcome.result["error"] == "cancelled through the API"
    assert outcome.result["artifacts"] == []  # as locally: a cancelled run uploads nothing


def test_a_prepare_failure_is_reported_and_stops_the_pod(demo, api_server, tmp_path):
    outcome = run_task_in_pod(api_server, demo["tests"]["unit/linux"], tmp_path,
                              inputs={"src": {"kind": "source", "path": str(tmp_path / "missing")}})
    assert outcome.kubelet_run.init_exit_codes == {"prepare": 1} and outcome.kubelet_run.exit_codes == {}
    assert outcome.kubelet_run.phase == "Failed"
    assert outcome.result["result"] == "error"
    assert outcome.result["error"].startswith("cannot fetch input 'src': ")
    assert "cannot fetch input 'src'" in outcome.log_text


def test_the_report_container_follows_no_link_to_the_token(api_server, tmp_path):
    # The task points result files and an artifact at the token file the report container can
    # read; the result and the artifact never carry the token.
    secret_file = "__SECRET__"
    tasks = resolved_tasks(f"""
looper_version: 5
environments:
  linux: {{platform: linux, image: {{name: "alpine:3.20"}}}}
tests:
  sneaky/linux:
    stages:
      - command: 'ln -s {secret_file} "$TEST_OUTPUT_DIR/testSummary.json"; ln -s {secret_file} "$TEST_OUTPUT_DIR/leak.xml"; ln -s {secret_file} "$TEST_OUTPUT_DIR/leak"'
        artifacts: [{{name: loot, format: Zip}}, {{name: loot-tar, format: Tar}}]
""")
    task = tasks["sneaky/linux"]
    # Where the kubelet puts the token volume (its mount root mapping): each stage names it.
    testrun = testrun_object(task)
    node = tmp_path / f"node-{testrun['metadata']['name'][-10:]}"
    token_path = node / "volumes" / "token" / "token"
    task = json.loads(json.dumps(task).replace(secret_file, str(token_path)))
    outcome = run_task_in_pod(api_server, task, tmp_path)
    assert outcome.result["result"] == "passed", outcome.log_text
    assert outcome.result["cases"] == []
    assert any("refused: it links outside the workspace" in problem for problem in outcome.result["case_parse_errors"])
    for record in outcome.artifacts.values():
        assert outcome.token.encode() not in Path(record.path).read_bytes()
    assert outcome.token not in json.dumps(outcome.result) and outcome.token not in outcome.log_text


def test_the_kubelet_refuses_a_pod_that_needs_more_than_sh_and_the_agent(demo, tmp_path):
    _testrun, pod = build(demo["tests"]["unit/linux"])
    pod["spec"]["containers"][0]["command"] = ["/usr/bin/make", "test"]
    with pytest.raises(PodRefused, match="runs only /bin/sh and the agent"):
        TestKubelet(tmp_path / "node").run_pod(pod)
    _testrun, pod = build(demo["tests"]["unit/linux"])
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    with pytest.raises(PodRefused, match="only emptyDir and secret"):
        TestKubelet(tmp_path / "node2", secrets={"the-token": {"data": {"token": "eA=="}}}).run_pod(pod)


def test_zip_artifacts_keep_symlinks_as_links(tmp_path):
    # The agent packs a link as a link (unpacking restores it), never what it points to.
    from testlooper.worker import agent

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "real").write_text("content")
    os.symlink("/etc/hostname", tmp_path / "out" / "outside")
    packed = agent.pack_artifact({"name": "z", "format": "Zip"}, str(tmp_path / "out"), str(tmp_path / "z"))
    agent.unpack_archive(packed.path, str(tmp_path / "back"), "z")
    assert os.readlink(tmp_path / "back" / "outside") == "/etc/hostname"
    assert (tmp_path / "back" / "real").read_text() == "content"


def test_shared_files_are_opened_without_following_links_or_blocking_on_fifos(tmp_path):
    from testlooper.worker import agent

    (tmp_path / "token").write_text(TOKEN)
    os.symlink(tmp_path / "token", tmp_path / "events")
    os.mkfifo(tmp_path / "log.txt")
    with pytest.raises(OSError):
        agent.open_shared_file(str(tmp_path / "events"), os.O_RDONLY)
    started = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        agent.open_shared_file(str(tmp_path / "log.txt"), os.O_RDONLY)  # a plain open would block
    assert time.monotonic() - started < 1
    descriptor = agent.open_shared_file(str(tmp_path / "log.txt"), os.O_RDWR, fifo=True)
    os.close(descriptor)


def test_the_agent_alone_runs_a_pod_from_its_annotations(demo, api_server, tmp_path):
    task = demo["builds"]["calc/linux"]
    testrun = testrun_object(task)
    the_run_id = pods.run_id(NAMESPACE, testrun["metadata"]["name"], 1, 1)
    token = api_server.register_run(the_run_id, {
        "task": task, "commit": "c" * 40, "commit_message": "m\n", "source": {"path": str(DEMO)},
        "inputs": {"src": {"kind": "source", "path": str(DEMO)}}, "run_index": 0, "attempt": 1, "cores": 1,
        "ram_gb": 1}, inputs_by_url=True)
    secret = pods.build_run_secret(testrun, the_run_id, token)
    pod = pods.build_run_pod(testrun, run_index=1, attempt=1, pool=pool_object(), api_url=api_server.url,
                             worker_image=WORKER_IMAGE, token_secret_name=secret["metadata"]["name"])
    assert run_agent_alone(pod, {secret["metadata"]["name"]: secret}, tmp_path / "work") == 0
    assert api_server.wait_result(the_run_id, 0)["result"] == "passed"


def test_a_variable_sh_cannot_export_is_a_clear_error(demo, api_server, tmp_path):
    task = {**demo["builds"]["calc/linux"], "variables": {"PYTHON": "python3", "NOT-A-NAME": "x"}}
    outcome = run_task_in_pod(api_server, task, tmp_path)
    assert outcome.kubelet_run.init_exit_codes == {"prepare": 1} and outcome.result["result"] == "error"
    assert outcome.result["error"] == ("variable 'NOT-A-NAME' cannot reach the task through /bin/sh: "
                                       "a name is letters, digits and _")
    assert "fetching the source" not in outcome.log_text  # refused before anything was fetched


def test_a_testrun_not_as_stored_is_refused(demo):
    testrun = testrun_object(demo["tests"]["unit/linux"])
    del testrun["metadata"]["uid"]
    with pytest.raises(ValueError, match="has no metadata.uid"):
        pods.build_run_pod(testrun, run_index=1, attempt=1, pool=pool_object(), api_url="http://api",
                           worker_image=WORKER_IMAGE, token_secret_name="t")
    with pytest.raises(ValueError, match="not a run id"):
        pods.build_run_secret(testrun_object(demo["tests"]["unit/linux"]), "no-dots", TOKEN)


def test_an_artifact_the_api_refuses_makes_the_run_an_error(demo, tmp_path):
    from testlooper.worker.server import WorkerApiServer

    server = WorkerApiServer(artifact_root=tmp_path / "artifacts", max_artifact_bytes=10)
    server.start()
    try:
        outcome = run_task_in_pod(server, demo["builds"]["calc/linux"], tmp_path)
    finally:
        server.stop()
    assert outcome.result["result"] == "error"
    assert outcome.result["error"].startswith("cannot upload artifact '': ")
    assert outcome.kubelet_run.exit_codes["report"] == 0  # the RESULT was delivered


def test_the_pod_modes_say_what_is_missing(tmp_path):
    import subprocess
    import sys

    from kubelet import AGENT_FILE

    environment = {"PATH": os.environ["PATH"]}
    no_url = subprocess.run([sys.executable, "-S", "-E", str(AGENT_FILE), "prepare", "--run-id", "ci.x.1.1",
                             "--workspace", str(tmp_path / "w")], env=environment, capture_output=True, text=True)
    assert no_url.returncode == 2 and "the worker API's URL is needed: --api URL or $TESTLOOPER_API_URL" in no_url.stderr
    no_token = subprocess.run([sys.executable, "-S", "-E", str(AGENT_FILE), "report", "--run-id", "ci.x.1.1",
                               "--workspace", str(tmp_path / "w"), "--result-file", str(tmp_path / "r.json"),
                               "--token-file", str(tmp_path / "missing")],
                              env={**environment, "TESTLOOPER_API_URL": "http://127.0.0.1:9"},
                              capture_output=True, text=True)
    assert no_token.returncode == 2
    assert no_token.stderr.startswith(f"testlooper agent: cannot read the token file {tmp_path / 'missing'}: ")
    assert not (tmp_path / "w").exists()
