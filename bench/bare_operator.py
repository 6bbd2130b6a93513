"""The yardstick for the operator's benches: a bare kopf operator doing the same Kubernetes work
as the Repo handler, and nothing else.

As a kopf operator (`kopf run bench/bare_operator.py`): when a trigger object appears, one
handler creates as many objects of the target resource as its annotation
`bench.testlooper.dev/parts` says (an annotation, which no schema prunes), each shaped like a
TestRun (labels,
annotations, an owner reference, a spec with a resolved definition of about 1 KB), with the
official client, tolerating AlreadyExists; then it writes a count into the trigger's status.
The resources default to the emulator's fixtures (Widget -> Part); set
BARE_TRIGGER=testlooper.dev/v1alpha1/repos/Repo BARE_TARGET=testlooper.dev/v1alpha1/testruns/TestRun
to use the project's own.

With BARE_MODE=pods it is instead the yardstick of runs becoming pods (bench/bench_runs.py): a
create handler on the target resource turns each object into one pod shaped like a run pod (an
init container, a test container and a sidecar, emptyDir volumes, requests, an owner reference),
tolerating AlreadyExists, and does nothing else.

As a script, it measures itself and prints JSON:

    python bench/bare_operator.py [--count 100 --count 500] [--repeat 3] [--idle SECONDS]

For each count, the median of `--repeat` runs, each with a fresh operator on one emulator process
(reset between runs): the time from creating the trigger to the last object stored, and the
operator's CPU time over that span (/proc, the emulator excluded), each also per object.
`--idle` adds the operator's CPU share while idle afterwards, its objects present.
"""

from __future__ import annotations

import hashlib
import os

import kopf
import kubernetes

TRIGGER = os.environ.get("BARE_TRIGGER", "example.testlooper.dev/v1alpha1/widgets/Widget")
TARGET = os.environ.get("BARE_TARGET", "example.testlooper.dev/v1alpha1/parts/Part")
TRIGGER_GROUP, TRIGGER_VERSION, TRIGGER_PLURAL, TRIGGER_KIND = TRIGGER.rsplit("/", 3)
TARGET_GROUP, TARGET_VERSION, TARGET_PLURAL, TARGET_KIND = TARGET.rsplit("/", 3)

PARTS_ANNOTATION = "bench.testlooper.dev/parts"

_api: kubernetes.client.CustomObjectsApi | None = None


def custom_objects() -> kubernetes.client.CustomObjectsApi:
    global _api
    if _api is None:
        _api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config())
    return _api


def part_body(owner: dict, index: int) -> dict:
    """One object with the size and shape of a TestRun."""
    name = owner["metadata"]["name"]
    commit = hashlib.sha1(f"{name}-{owner['metadata'].get('generation')}".encode()).hexdigest()
    task = f"suite{index % 20}/test{index:04d}/linux"
    digest = hashlib.sha1(f"{name}{commit}{task}".encode()).hexdigest()[:10]
    return {
        "apiVersion": f"{TARGET_GROUP}/{TARGET_VERSION}", "kind": TARGET_KIND,
        "metadata": {
            "name": f"{name[:20]}-{commit[:8]}-test{index:04d}-{digest}",
            "labels": {"testlooper.dev/repo": name, "testlooper.dev/commit": commit,
                       "testlooper.dev/short-commit": commit[:12], "testlooper.dev/kind": "test",
                       "app.kubernetes.io/managed-by": "testlooper"},
            "annotations": {"testlooper.dev/task": task, "testlooper.dev/branch": "main"},
            "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                 "name": name, "uid": owner["metadata"]["uid"],
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "repo": name, "commit": commit, "branch": "main", "task": task,
            "kind": "test", "runs": 1, "hash": digest * 4, "priority": 0,
            "definition": {
                "name": task, "kind": "test", "environment": "linux",
                "command": f"pytest -q tests/suite{index % 20}/test_{index:04d}.py",
                "image": "registry.example.com/team/build-env:2026.11",
                "timeout": 600, "runs": 1, "retries": 0, "cores": 1, "ramGb": 2,
                "variables": {"PYTHONHASHSEED": "0", "SUITE": f"suite{index % 20}"},
                "dependencies": ["build/linux"], "artifacts": ["junit.xml"],
                "triggers": {"branches": ["main", "release/*"], "paths": ["src/**"]},
            },
        },
    }


def pod_body(owner: dict) -> dict:
    """One pod with the size and shape of a run pod (kube/pods.py), for `owner`."""
    metadata = owner["metadata"]
    name = metadata["name"]
    env = [{"name": "TESTLOOPER_API", "value": "http://testlooper.testlooper.svc:8080"},
           {"name": "TESTLOOPER_RUN_ID", "value": f"{metadata['namespace']}.{name}.1.1"}]
    mounts = [{"name": "work", "mountPath": "/testlooper"}]
    worker = {"image": "ghcr.io/testlooper/worker:latest", "env": env, "volumeMounts": mounts,
              "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                  "allowPrivilegeEscalation": False,
                                  "capabilities": {"drop": ["ALL"]}}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": f"{name[:50]}-r1-a1",
            "labels": {"app.kubernetes.io/managed-by": "bare-operator", "testlooper.dev/testrun": name[:63],
                       "testlooper.dev/run": "1", "testlooper.dev/attempt": "1"},
            "annotations": {"testlooper.dev/run-id": f"{metadata['namespace']}.{name}.1.1",
                            "testlooper.dev/token-secret": f"{name[:50]}-r1-a1-token"},
            "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": name,
                                 "uid": metadata["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False, "activeDeadlineSeconds": 4200,
            "volumes": [{"name": "work", "emptyDir": {}},
                        {"name": "token", "secret": {"secretName": f"{name[:50]}-r1-a1-token"}}],
            "initContainers": [{**worker, "name": "prepare", "command": ["python3", "-S", "/agent.py", "prepare"]}],
            "containers": [
                {"name": "test", "image": "busybox:1.36", "command": ["/bin/sh", "/testlooper/stages.sh"],
                 "workingDir": "/testlooper/inputs", "volumeMounts": mounts,
                 "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}},
                {**worker, "name": "report", "command": ["python3", "-S", "/agent.py", "report"]},
            ],
        },
    }


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.watching.server_timeout = 300
    settings.persistence.finalizer = "bench.testlooper.dev/bare-operator"


@kopf.on.create(TRIGGER_GROUP, TRIGGER_VERSION, TRIGGER_PLURAL)
def fan_out(body, namespace, annotations, patch, **_):
    api = custom_objects()
    created = 0
    for index in range(int(annotations.get(PARTS_ANNOTATION, "0"))):
        try:
            api.create_namespaced_custom_object(TARGET_GROUP, TARGET_VERSION, namespace,
                                                TARGET_PLURAL, part_body(dict(body), index))
            created += 1
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
    patch.status["created"] = created


if os.environ.get("BARE_MODE") == "pods":
    _core: kubernetes.client.CoreV1Api | None = None

    @kopf.on.create(TARGET_GROUP, TARGET_VERSION, TARGET_PLURAL)
    def make_pod(body, namespace, **_):
        global _core
        if _core is None:
            _core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config())
        try:
            _core.create_namespaced_pod(namespace, pod_body(dict(body)))
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise


def _fan_out_once(kube, count: int, namespace: str, idle_seconds: float) -> dict:
    import time
    from kube_bench_support import OperatorProcess

    kube.reset()
    arguments = ["-m", "kopf", "run", "--standalone", "--namespace", namespace,
                 os.path.abspath(__file__)]
    with OperatorProcess(kube, arguments, client="bare-operator") as operator:
        operator.wait_until_watching(TRIGGER_GROUP, TRIGGER_PLURAL)
        time.sleep(0.5)  # let kopf finish starting, so only the fan-out is measured
        cpu_before, emulator_before = operator.cpu_seconds(), kube.cpu_seconds()
        started = time.perf_counter()
        kube.api("POST", f"/apis/{TRIGGER_GROUP}/{TRIGGER_VERSION}/namespaces/{namespace}/"
                         f"{TRIGGER_PLURAL}", {
                     "apiVersion": f"{TRIGGER_GROUP}/{TRIGGER_VERSION}", "kind": TRIGGER_KIND,
                     "metadata": {"name": "trigger", "annotations": {PARTS_ANNOTATION: str(count)}},
                     # What a Repo requires; a schema without it prunes it.
                     "spec": {"url": "https://git.example.com/bench.git"}})
        kube.wait_for_count(TARGET_GROUP, TARGET_VERSION, TARGET_PLURAL, count, namespace)
        wall = time.perf_counter() - started
        cpu = operator.cpu_seconds() - cpu_before
        emulator_cpu = kube.cpu_seconds() - emulator_before
        result = {"wall_seconds": wall, "operator_cpu_seconds": cpu,
                  "emulator_cpu_seconds": emulator_cpu,
                  "operator_rss_mb": operator.resident_bytes() / 2**20}
        if idle_seconds:
            time.sleep(1)  # the handler's last status patch
            idle_before = operator.cpu_seconds()
            time.sleep(idle_seconds)
            result["idle_cpu_percent"] = (operator.cpu_seconds() - idle_before) / idle_seconds * 100
        return result


def measure(counts: list[int], repeat: int, idle_seconds: float) -> dict:
    """Median over `repeat` runs per count, each with a fresh operator on one emulator."""
    import statistics
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kube_bench_support import Emulator

    namespace = "bench"
    results = []
    with Emulator(namespaces=[namespace]) as kube:
        for count in counts:
            runs = [_fan_out_once(kube, count, namespace, idle_seconds) for _ in range(repeat)]

            def median(key: str) -> float:
                return statistics.median(run[key] for run in runs)

            result = {
                "objects": count, "repeats": repeat,
                "wall_seconds": round(median("wall_seconds"), 3),
                "wall_ms_per_object": round(median("wall_seconds") / count * 1000, 2),
                "operator_cpu_seconds": round(median("operator_cpu_seconds"), 3),
                "operator_cpu_ms_per_object": round(
                    median("operator_cpu_seconds") / count * 1000, 2),
                "emulator_cpu_seconds": round(median("emulator_cpu_seconds"), 3),
                "operator_rss_mb": round(median("operator_rss_mb"), 1)}
            if idle_seconds:
                result["idle_cpu_percent"] = round(median("idle_cpu_percent"), 2)
            results.append(result)
    return {"bench": "bare_operator", "trigger": TRIGGER, "target": TARGET,
            "client": "kubernetes (official, sync) in a kopf sync handler",
            "cpu_clock_ticks_per_second": os.sysconf("SC_CLK_TCK"), "cpus": os.cpu_count(),
            "results": results}


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="Measure the bare kopf operator.")
    parser.add_argument("--count", type=int, action="append",
                        help="objects to create from one trigger (repeatable; default 100, 500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per count (the median)")
    parser.add_argument("--idle", type=float, default=0, metavar="SECONDS",
                        help="also measure the operator's CPU while idle for SECONDS")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.count or [100, 500], arguments.repeat, arguments.idle),
                     indent=2))
