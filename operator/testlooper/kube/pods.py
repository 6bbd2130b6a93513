"""Pure builders of one run's Pod and its token Secret (docs/pods.md describes the layout).

A run is (TestRun, run index 1..N, attempt 1..). Its pod has three containers, after Prow's pod
utilities:

- ``prepare`` (init, worker image): copies the agent into the ``agent`` volume, fetches the
  assignment, the source and the inputs into the ``workspace`` volume, and writes the task's
  stages as one /bin/sh script there;
- ``test`` (the task's image, which needs only /bin/sh): runs that script;
- ``report`` (worker image): ships the log, heartbeats, stops the script at the timeout or on
  cancellation, packs and uploads artifacts, parses the results and posts the RESULT.

The run's token is in a per-run Secret mounted only into ``prepare`` and ``report``: the test
container neither mounts it nor shares a process namespace with the containers that read it.

No I/O here: plain dicts in, plain dicts out, as the Kubernetes API reads them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re

from testlooper.kube.models import API_VERSION, TESTRUN, WorkerPoolSpec, parse_testrun_spec, parse_workerpool_spec
from testlooper.kube.objects import LABEL_PREFIX, MANAGED_BY, MANAGED_BY_LABEL, NAME_LIMIT, label_value

TESTRUN_LABEL = LABEL_PREFIX + "testrun"
RUN_INDEX_LABEL = LABEL_PREFIX + "run-index"
ATTEMPT_LABEL = LABEL_PREFIX + "attempt"
RUN_ID_ANNOTATION = LABEL_PREFIX + "run-id"
TOKEN_SECRET_ANNOTATION = LABEL_PREFIX + "token-secret"
TOKEN_KEY = "token"
API_URL_ENV = "TESTLOOPER_API_URL"

# Where things are inside the containers. The test kubelet (tests/kubelet.py) maps these.
AGENT_IN_IMAGE = "/opt/testlooper/agent.py"  # where the worker image keeps the agent
AGENT_MOUNT = "/testlooper/agent"  # the agent copy and the reporter's own files; never in the test container
AGENT_COPY = AGENT_MOUNT + "/agent.py"
RESULT_FILE = AGENT_MOUNT + "/result.json"  # the RESULT, kept there when it cannot be posted
WORKSPACE_MOUNT = "/testlooper/workspace"  # shared by all three containers
SECRET_MOUNT = "/testlooper/secret"  # the run's token; prepare and report only
STAGE_SCRIPT = WORKSPACE_MOUNT + "/agent/pod/stages.sh"  # written by prepare (agent.POD_SCRIPT_NAME)
PYTHON = "python3"

PREPARE_CONTAINER = "prepare"
TEST_CONTAINER = "test"
REPORT_CONTAINER = "report"

# The worker containers run as this user when the pool does not name one (distroless' nonroot).
DEFAULT_WORKER_USER = 65532
# activeDeadlineSeconds is the task's timeout plus this: image pulls, fetching the inputs and
# reporting are not part of the task's time (the report container stops the script on time).
DEFAULT_DEADLINE_GRACE_SECONDS = 600
# Time the kubelet gives the containers after SIGTERM: the report container ships the log and
# posts the RESULT in it.
TERMINATION_GRACE_SECONDS = 60
WORKER_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}

DIGEST_LENGTH = 10
_NOT_DNS = re.compile(r"[^a-z0-9]+")


def run_id(namespace: str, testrun: str, index: int, attempt: int) -> str:
    """The worker API's id of a run: ``{namespace}.{testrun}.{index}.{attempt}`` (URL-safe:
    namespaces and TestRun names are DNS names)."""
    _check_run(index, attempt)
    return f"{namespace}.{testrun}.{index}.{attempt}"


def run_pod_name(testrun: str, index: int, attempt: int) -> str:
    """The pod of (TestRun, run index, attempt): ``{testrun}-r{index}-a{attempt}``, the same on
    every reconcile, so a retried create finds the pod it made. A DNS label (at most 63
    characters): a longer or unusual TestRun name is cut, and a digest of the three keeps the
    cut names apart."""
    _check_run(index, attempt)
    suffix = f"-r{index}-a{attempt}"
    plain = testrun + suffix
    if len(plain) <= NAME_LIMIT and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", plain):
        return plain
    digest = hashlib.sha256(json.dumps([testrun, index, attempt]).encode()).hexdigest()[:DIGEST_LENGTH]
    room = NAME_LIMIT - len(suffix) - len(digest) - 1
    readable = _NOT_DNS.sub("-", testrun.lower()).strip("-")[:room].strip("-")
    return f"{readable}-{digest}{suffix}" if readable else f"{digest}{suffix}"


def run_secret_name(testrun: str, index: int, attempt: int) -> str:
    """The Secret holding the run's token (key ``token``): the pod's name plus ``-token``."""
    return run_pod_name(testrun, index, attempt) + "-token"


def run_namespace(testrun_obj: dict, pool: dict | None) -> str:
    """Where the run's pod and Secret live: the pool's ``namespace``, else the pool's own
    namespace, else the TestRun's."""
    spec = parse_workerpool_spec(pool.get("spec", {})) if pool else None
    if spec is not None and spec.namespace:
        return spec.namespace
    return (pool or {}).get("metadata", {}).get("namespace") or testrun_obj["metadata"].get("namespace", "default")


def build_run_secret(testrun_obj: dict, run_id: str, token: str, *, namespace: str | None = None) -> dict:
    """The per-run Secret: the token under key ``token``, immutable, owned by the TestRun when
    both are in one namespace (an owner in another namespace counts as absent, and the garbage
    collector would delete the Secret)."""
    index, attempt = _index_and_attempt(run_id)
    metadata = testrun_obj["metadata"]
    namespace = namespace or metadata.get("namespace", "default")
    body_metadata = {
        "name": run_secret_name(metadata["name"], index, attempt),
        "namespace": namespace,
        "labels": _run_labels(metadata["name"], index, attempt),
        "annotations": {RUN_ID_ANNOTATION: run_id},
    }
    owner = _owner_reference(testrun_obj, namespace)
    if owner:
        body_metadata["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": body_metadata, "type": "Opaque", "immutable": True,
            "data": {TOKEN_KEY: base64.b64encode(token.encode("ascii")).decode("ascii")}}


def build_run_pod(testrun_obj: dict, *, run_index: int, attempt: int, pool: dict, api_url: str,
                  worker_image: str, token_secret_name: str, heartbeat_seconds: float = 5.0,
                  kill_grace_seconds: float = 10.0,
                  deadline_grace_seconds: int = DEFAULT_DEADLINE_GRACE_SECONDS) -> dict:
    """The Pod of one run of ``testrun_obj`` (the TestRun as stored: it needs its uid and its
    ``spec.definition``) on ``pool`` (the WorkerPool object). Raises ValueError when no valid
    pod can be made (no image, an unparsable spec)."""
    metadata = testrun_obj["metadata"]
    name = metadata["name"]
    if not metadata.get("uid"):
        raise ValueError(f"TestRun {name} has no metadata.uid: it must be the object as stored")
    spec = parse_testrun_spec(testrun_obj.get("spec"))
    pool_spec = parse_workerpool_spec(pool.get("spec", {}))
    task = spec.definition or {}
    if "windows" in (pool_spec.platform, task.get("platform")):
        raise ValueError(f"TestRun {name}: a pod runs its steps with /bin/sh, so Windows tasks and pools "
                         "cannot run as pods yet")
    namespace = run_namespace(testrun_obj, pool)
    the_run_id = run_id(metadata.get("namespace", "default"), name, run_index, attempt)
    image = _test_image(task, pool_spec, name)
    worker_user = pool_spec.testRunAsUser or DEFAULT_WORKER_USER
    agent_arguments = ["--run-id", the_run_id, "--workspace", WORKSPACE_MOUNT,
                       "--token-file", f"{SECRET_MOUNT}/{TOKEN_KEY}",
                       "--heartbeat-seconds", _number(heartbeat_seconds),
                       "--kill-grace-seconds", _number(kill_grace_seconds)]
    agent_environment = [{"name": API_URL_ENV, "value": api_url}]  # where the agent reaches the worker API
    workspace_mount = {"name": "workspace", "mountPath": WORKSPACE_MOUNT}
    secret_mount = {"name": "token", "mountPath": SECRET_MOUNT, "readOnly": True}
    prepare = {
        "name": PREPARE_CONTAINER,
        "image": worker_image,
        "command": [PYTHON, "-S", "-E", AGENT_IN_IMAGE, "prepare"],
        "args": ["--install-agent", AGENT_COPY, *agent_arguments],
        "env": agent_environment,
        "resources": WORKER_RESOURCES,
        "securityContext": _worker_security(worker_user),
        "volumeMounts": [{"name": "agent", "mountPath": AGENT_MOUNT}, workspace_mount, secret_mount],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    test = {
        "name": TEST_CONTAINER,
        "image": image,
        "command": ["/bin/sh", STAGE_SCRIPT],
        "workingDir": WORKSPACE_MOUNT,
        "resources": _task_resources(task),
        "securityContext": _test_security(pool_spec.testRunAsUser),
        "volumeMounts": [workspace_mount],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    report = {
        "name": REPORT_CONTAINER,
        "image": worker_image,
        "command": [PYTHON, "-S", "-E", AGENT_COPY, "report"],
        "args": [*agent_arguments, "--result-file", RESULT_FILE],
        "env": agent_environment,
        "resources": WORKER_RESOURCES,
        "securityContext": _worker_security(worker_user),
        "volumeMounts": [{"name": "agent", "mountPath": AGENT_MOUNT}, workspace_mount, secret_mount],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    timeout = int(task.get("timeout_seconds") or 3600)
    pod_spec = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "shareProcessNamespace": False,  # the test must not see the processes that hold the token
        "activeDeadlineSeconds": timeout + int(deadline_grace_seconds),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {"fsGroup": worker_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [prepare],
        "containers": [test, report],
        "volumes": [
            {"name": "workspace", "emptyDir": {}},
            {"name": "agent", "emptyDir": {}},
            {"name": "token", "secret": {"secretName": token_secret_name, "defaultMode": 0o440,
                                         "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]}},
        ],
    }
    if pool_spec.nodeSelector:
        pod_spec["nodeSelector"] = dict(pool_spec.nodeSelector)
    if pool_spec.tolerations:
        pod_spec["tolerations"] = [toleration.model_dump(exclude_none=True) for toleration in pool_spec.tolerations]
    pod_spec.setdefault("nodeSelector", {}).setdefault("kubernetes.io/os", "linux")
    body_metadata = {
        "name": run_pod_name(name, run_index, attempt),
        "namespace": namespace,
        "labels": _run_labels(name, run_index, attempt),
        "annotations": {RUN_ID_ANNOTATION: the_run_id, TOKEN_SECRET_ANNOTATION: token_secret_name},
    }
    owner = _owner_reference(testrun_obj, namespace)
    if owner:
        body_metadata["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": body_metadata, "spec": pod_spec}


def _check_run(index: int, attempt: int) -> None:
    for label, value in (("run index", index), ("attempt", attempt)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"a run's {label} is a whole number from 1, not {value!r}")


def _index_and_attempt(the_run_id: str) -> tuple[int, int]:
    parts = the_run_id.split(".")
    try:
        index, attempt = int(parts[-2]), int(parts[-1])
    except (IndexError, ValueError):
        raise ValueError(f"{the_run_id!r} is not a run id (namespace.testrun.index.attempt)") from None
    _check_run(index, attempt)
    return index, attempt


def _run_labels(testrun: str, index: int, attempt: int) -> dict:
    return {TESTRUN_LABEL: label_value(testrun), RUN_INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt),
            MANAGED_BY_LABEL: MANAGED_BY}


def _owner_reference(testrun_obj: dict, namespace: str) -> dict | None:
    metadata = testrun_obj["metadata"]
    if metadata.get("namespace", "default") != namespace or not metadata.get("uid"):
        return None
    return {"apiVersion": testrun_obj.get("apiVersion", API_VERSION), "kind": TESTRUN.kind,
            "name": metadata["name"], "uid": metadata["uid"], "controller": True, "blockOwnerDeletion": True}


def _test_image(task: dict, pool_spec: WorkerPoolSpec, testrun: str) -> str:
    image = task.get("image") or {}
    name = image.get("name") if isinstance(image, dict) else None
    if isinstance(name, str) and name.strip():
        return name.strip()
    if pool_spec.defaultImage:
        return pool_spec.defaultImage
    raise ValueError(f"TestRun {testrun}: its task names no image (image.name) and the pool has no defaultImage")


def _task_resources(task: dict) -> dict:
    requests, limits = {}, {}
    cores, max_cores, ram_gb = task.get("min_cores") or 0, task.get("max_cores") or 0, task.get("min_ram_gb") or 0
    if cores > 0:
        requests["cpu"] = _number(cores)
    if ram_gb > 0:
        requests["memory"] = f"{math.ceil(ram_gb * 1024)}Mi"
    if max_cores > 0:
        limits["cpu"] = _number(max(max_cores, cores))
    resources = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _worker_security(user: int) -> dict:
    return {"runAsUser": user, "runAsGroup": user, "runAsNonRoot": True, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _test_security(user: int | None) -> dict:
    """Non-root when the pool says which user the image allows; else as the image says (many
    test images need root), but never gaining privileges beyond it."""
    security = {"allowPrivilegeEscalation": False}
    if user:
        security.update({"runAsUser": user, "runAsGroup": user, "runAsNonRoot": True})
    return security


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
