"""Pure builders of the objects the operator writes: TestRun bodies, their names, conditions.

No I/O here: each function takes plain data and returns plain data (dicts as the Kubernetes API
reads and writes them), so the reconcile code can be tested by comparing dicts.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import re

from testlooper.kube.models import API_VERSION, REPO, TESTRUN, parse_testrun_spec

LABEL_PREFIX = "testlooper.dev/"
REPO_LABEL = LABEL_PREFIX + "repo"
COMMIT_LABEL = LABEL_PREFIX + "commit"
SHORT_COMMIT_LABEL = LABEL_PREFIX + "short-commit"
KIND_LABEL = LABEL_PREFIX + "kind"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "testlooper"
TASK_ANNOTATION = LABEL_PREFIX + "task"
BRANCH_ANNOTATION = LABEL_PREFIX + "branch"

NAME_LIMIT = 63  # a DNS-1123 label, as a TestRun's name must be to serve as a pod name prefix
DIGEST_LENGTH = 10
REPO_PART_LIMIT = 20  # leave the task room to be read even when the repo's name is long
SHORT_COMMIT_LENGTH = 12

_COMMIT = re.compile(r"[0-9a-f]{40}")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_NOT_DNS = re.compile(r"[^a-z0-9]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


def _digest(*parts: str) -> str:
    # JSON keeps the parts apart: ("a-b", "c") and ("a", "b-c") hash differently.
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


def _dns_words(text: str) -> str:
    """`text` lowercased, with each run of characters a DNS label cannot hold turned into `-`."""
    return _NOT_DNS.sub("-", text.lower()).strip("-")


def _check_commit(commit: str) -> None:
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise ValueError(f"a commit must be 40 lowercase hex characters, not {commit!r}")


def testrun_name(repo_name: str, commit: str, task: str) -> str:
    """The TestRun name of (repo, commit, task): the same every time, so a retried or restarted
    reconcile finds the TestRun it already made instead of making a second.

    A DNS-1123 label of at most 63 characters: a readable prefix (the repo name, 8 characters of
    the commit, the task name, sanitised and cut to fit) and a digest of the three, so that
    tasks whose names sanitise alike (`net/linux`, `net-linux`, `Net.Linux`) never collide.
    """
    _check_commit(commit)
    digest = _digest(repo_name, commit, task)
    readable = "-".join(part for part in (_dns_words(repo_name)[:REPO_PART_LIMIT].strip("-"),
                                           commit[:8]) if part)
    room = NAME_LIMIT - len(digest) - 1 - len(readable) - 1
    task_words = _dns_words(task)[:room].rstrip("-") if room > 0 else ""
    if task_words:
        readable += "-" + task_words
    return f"{readable}-{digest}"


testrun_name.__test__ = False  # its name starts with "test": tests importing it must not collect it


def label_value(text: str) -> str:
    """`text` as a valid label value: itself when it already is one, else a sanitised, cut
    form followed by a digest of the original (so distinct texts stay distinct)."""
    if len(text) <= NAME_LIMIT and _LABEL_VALUE.fullmatch(text):
        return text
    cleaned = _NOT_LABEL.sub("-", text).strip("-_.")
    cleaned = cleaned[:NAME_LIMIT - DIGEST_LENGTH - 1].rstrip("-_.")
    digest = _digest(text)
    return f"{cleaned}-{digest}" if cleaned else digest


def build_testrun(repo: dict, *, commit: str, branch: str | None, task: dict, kind: str, runs: int,
                  depends_on: list[str], worker_pool: str | None, priority: int,
                  task_name: str | None = None) -> dict:
    """The full body of the TestRun of `task` (resolved, as `testlooper definitions --json`
    gives it under builds/tests) at `commit` of `repo` (the Repo object as the API returns it).

    Raises ValueError (a SpecError for spec fields) when the inputs cannot make a valid TestRun.
    """
    metadata = repo["metadata"]
    repo_name, uid = metadata["name"], metadata.get("uid")
    if not uid:
        raise ValueError(f"Repo {repo_name} has no metadata.uid: it must be the object as stored")
    # Another repository's build keeps its own name in its definition; in this commit's plan it
    # is `PIN/BUILD`, which is what names its TestRun.
    task_name = task_name or task.get("name")
    if not isinstance(task_name, str) or not task_name:
        raise ValueError("the task has no name")
    if task.get("kind", kind) != kind:
        raise ValueError(f"task {task_name} is a {task['kind']}, not a {kind}")
    _check_commit(commit)
    spec = {
        "repo": repo_name,
        "commit": commit,
        **({"branch": branch} if branch else {}),
        "task": task_name,
        "kind": kind,
        "runs": runs,
        **({"hash": task["hash"]} if task.get("hash") else {}),
        "definition": copy.deepcopy(task),
        "dependsOn": list(depends_on),
        **({"workerPool": worker_pool} if worker_pool else {}),
        "priority": priority,
        "cancel": False,
    }
    parse_testrun_spec(spec)  # refuse here what the API server would refuse later
    annotations = {TASK_ANNOTATION: task_name}
    if branch:
        annotations[BRANCH_ANNOTATION] = branch
    body_metadata = {
        "name": testrun_name(repo_name, commit, task_name),
        "labels": {
            REPO_LABEL: label_value(repo_name),
            COMMIT_LABEL: commit,
            SHORT_COMMIT_LABEL: commit[:SHORT_COMMIT_LENGTH],
            KIND_LABEL: kind,
            MANAGED_BY_LABEL: MANAGED_BY,
        },
        "annotations": annotations,
        "ownerReferences": [{
            "apiVersion": repo.get("apiVersion", API_VERSION),
            "kind": REPO.kind,
            "name": repo_name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }],
    }
    if metadata.get("namespace"):
        body_metadata["namespace"] = metadata["namespace"]
    return {"apiVersion": API_VERSION, "kind": TESTRUN.kind, "metadata": body_metadata, "spec": spec}


# ----------------------------------------------------------------------------------- Conditions

def timestamp(now: datetime.datetime) -> str:
    """An aware datetime as Kubernetes writes times: RFC 3339, UTC, whole seconds."""
    if now.tzinfo is None:
        raise ValueError("a timestamp needs a timezone-aware datetime")
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type: str, status: bool | str | None, reason: str, message: str,
              now: datetime.datetime | str, generation: int | None) -> dict:
    """A condition as it goes into a status: status is True/False (or "Unknown" / None)."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    elif status is None:
        status = "Unknown"
    elif status not in ("True", "False", "Unknown"):
        raise ValueError(f"a condition's status is True, False or Unknown, not {status!r}")
    built = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if isinstance(now, str) else timestamp(now),
    }
    if generation is not None:
        built["observedGeneration"] = generation
    return built


def set_condition(conditions: list[dict] | None, new: dict) -> list[dict]:
    """`conditions` with `new` in place of the one of its type (or added at the end).

    When the status did not change, the old lastTransitionTime stays: it says since when the
    condition holds, not when it was last written. The input list is left as it was.
    """
    result, placed = [], False
    for old in conditions or []:
        if old.get("type") != new["type"]:
            result.append(dict(old))
        elif not placed:  # a hand-edited duplicate of the same type is dropped
            merged = dict(new)
            if old.get("status") == new["status"] and old.get("lastTransitionTime"):
                merged["lastTransitionTime"] = old["lastTransitionTime"]
            result.append(merged)
            placed = True
    if not placed:
        result.append(dict(new))
    return result
