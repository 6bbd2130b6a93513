"""The pure object builders: TestRun names and bodies, label values, conditions."""

import datetime
import hashlib
import random
import re
import string
from pathlib import Path

import pytest
import yaml

from crd_validation import admit
from testlooper.kube import objects
from testlooper.kube.models import SpecError
from testlooper.kube.objects import (
    build_testrun, condition, label_value, set_condition, testrun_name, timestamp,
)

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

HOSTILE_TASKS = [
    "unit/linux", "unit-linux", "Unit.Linux", "unit_linux", "UNIT/LINUX", "unit//linux",
    "/", "-", "---", "...", "a", "测试/linux", "тест", "ünïcödé/ẞ", "İstanbul", "emoji/🚀",
    "tab\there", "new\nline", "nul\0byte", " spaces around ", "x" * 300, "a/" * 100,
    "-leading-and-trailing-", "9starts-with-digit", "build/" + "deep/" * 40 + "end",
]
HOSTILE_REPOS = ["app", "a", "a" * 253, "my.dotted.repo", "team-app-with-a-rather-long-name-indeed"]


def random_text(generator: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "/-_. " + "éßт测🚀\t"
    return "".join(generator.choice(alphabet) for _ in range(generator.choice([1, 3, 10, 40, 90])))


def random_commit(generator: random.Random) -> str:
    return "".join(generator.choice("0123456789abcdef") for _ in range(40))


@pytest.mark.parametrize("repo", HOSTILE_REPOS)
@pytest.mark.parametrize("task", HOSTILE_TASKS)
def test_names_are_dns_labels_of_at_most_63(repo, task):
    name = testrun_name(repo, COMMIT, task)
    assert len(name) <= 63
    assert DNS_LABEL.fullmatch(name), name
    assert testrun_name(repo, COMMIT, task) == name


def test_names_read_as_repo_commit_task_digest():
    name = testrun_name("app", COMMIT, "unit/linux")
    assert re.fullmatch(r"app-01234567-unit-linux-[0-9a-f]{10}", name), name
    # A long repo name is cut so that the task still shows.
    assert "-01234567-unit-linux-" in testrun_name("a" * 253, COMMIT, "unit/linux")
    # A task of nothing but unsanitisable characters still gives a valid, distinct name.
    assert re.fullmatch(r"app-01234567-[0-9a-f]{10}", testrun_name("app", COMMIT, "测试"))


def test_names_that_sanitise_alike_stay_distinct():
    names = {testrun_name(repo, COMMIT, task) for repo in HOSTILE_REPOS for task in HOSTILE_TASKS}
    assert len(names) == len(HOSTILE_REPOS) * len(HOSTILE_TASKS)


def fingerprint(*parts: str) -> int:
    """A 64-bit fingerprint: the sample below keeps 100,000 of them, not the strings, because
    the suite's other tests measure resident memory. A clash of fingerprints could only make
    the test fail, never pass wrongly."""
    data = "\0".join(parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def test_no_collisions_in_a_large_random_sample():
    generator = random.Random(8)
    commits = [random_commit(generator) for _ in range(20)]
    repos = [random_text(generator) or "r" for _ in range(20)]
    pairs = []  # (name fingerprint, input fingerprint), packed in one int
    for _ in range(100_000):
        repo, commit, task = generator.choice(repos), generator.choice(commits), random_text(generator)
        name = testrun_name(repo, commit, task)
        assert len(name) <= 63 and DNS_LABEL.fullmatch(name), (repo, task, name)
        pairs.append(fingerprint(name) << 64 | fingerprint(repo, commit, task))
    pairs.sort()
    # Equal neighbours are one input drawn twice; a shared name between different ones is a clash.
    clashes = [(a, b) for a, b in zip(pairs, pairs[1:]) if a != b and a >> 64 == b >> 64]
    assert clashes == []
    assert sum(1 for a, b in zip(pairs, pairs[1:]) if a != b) + 1 > 90_000


def test_the_commit_must_be_a_full_sha():
    for bad in ("0123abcd", COMMIT.upper(), COMMIT + "0", "g" * 40):
        with pytest.raises(ValueError, match="40 lowercase hex"):
            testrun_name("app", bad, "unit")


@pytest.mark.parametrize("text", ["main", "release-1.2", "a" * 63, "A_b.C-d", ""])
def test_valid_label_values_are_kept(text):
    assert label_value(text) == text


@pytest.mark.parametrize("text", ["feature/x", "a" * 64, "-dash", "dash-", "测试", "a b", ".x.",
                                  "release/" + "v" * 100, "x\n"])
def test_other_texts_become_valid_label_values(text):
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    assert value == label_value(text)


def test_label_values_of_distinct_texts_are_distinct():
    generator = random.Random(9)
    texts = {random_text(generator) for _ in range(20_000)} | {"feature/x", "feature-x", "feature_x"}
    values = {label_value(text) for text in texts}
    assert len(values) == len(texts)
    assert label_value("feature/x").startswith("feature-x-")


REPO_OBJECT = {
    "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo",
    "metadata": {"name": "app", "namespace": "ci", "uid": "5b0b3e4e-0000-4000-8000-000000000001",
                 "generation": 3, "resourceVersion": "77"},
    "spec": {"url": "file:///srv/git/app"},
}
TASK = {
    "name": "network/linux", "kind": "test", "hash": "ab" * 32, "runs": 6,
    "environment": "linux", "stages": [{"command": "pytest", "order": 0}], "timeout_seconds": 120,
}


def build(**changes):
    arguments = dict(commit=COMMIT, branch="feature/net", task=TASK, kind="test", runs=6,
                     depends_on=["app-01234567-calc-linux-1234567890"], worker_pool="linux",
                     priority=5)
    arguments.update(changes)
    return build_testrun(REPO_OBJECT, **arguments)


def test_build_testrun_gives_the_whole_body():
    body = build()
    name = testrun_name("app", COMMIT, "network/linux")
    assert body == {
        "apiVersion": "testlooper.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": {
            "name": name,
            "namespace": "ci",
            "labels": {
                "testlooper.dev/repo": "app",
                "testlooper.dev/commit": COMMIT,
                "testlooper.dev/short-commit": COMMIT[:12],
                "testlooper.dev/kind": "test",
                "app.kubernetes.io/managed-by": "testlooper",
            },
            "annotations": {"testlooper.dev/task": "network/linux",
                            "testlooper.dev/branch": "feature/net"},
            "ownerReferences": [{
                "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "name": "app",
                "uid": "5b0b3e4e-0000-4000-8000-000000000001",
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "repo": "app", "commit": COMMIT, "branch": "feature/net", "task": "network/linux",
            "kind": "test", "runs": 6, "hash": "ab" * 32, "definition": TASK,
            "dependsOn": ["app-01234567-calc-linux-1234567890"], "workerPool": "linux",
            "priority": 5, "cancel": False,
        },
    }


def test_the_body_is_admitted_by_the_crd_unchanged():
    crd = yaml.safe_load((ROOT / "crds" / "testruns.testlooper.dev.yaml").read_text())
    body = build()
    stored, problems = admit(crd, body)
    assert problems == [] and stored == body


def test_optional_parts_are_left_out_when_absent():
    body = build(branch=None, worker_pool=None, depends_on=[], task={**TASK, "hash": ""})
    assert "branch" not in body["spec"] and "workerPool" not in body["spec"]
    assert "hash" not in body["spec"] and body["spec"]["dependsOn"] == []
    assert body["metadata"]["annotations"] == {"testlooper.dev/task": "network/linux"}


def test_the_definition_is_a_copy():
    task = {**TASK, "stages": [{"command": "pytest"}]}
    body = build(task=task)
    task["stages"][0]["command"] = "changed"
    assert body["spec"]["definition"]["stages"][0]["command"] == "pytest"


def test_a_long_repo_name_gets_a_valid_label():
    repo = {**REPO_OBJECT, "metadata": {**REPO_OBJECT["metadata"], "name": "r" * 100}}
    body = build_testrun(repo, commit=COMMIT, branch="main", task=TASK, kind="test", runs=1,
                         depends_on=[], worker_pool=None, priority=0)
    assert body["metadata"]["labels"]["testlooper.dev/repo"] == label_value("r" * 100)
    assert body["spec"]["repo"] == "r" * 100


def test_build_refuses_what_cannot_be_a_testrun():
    with pytest.raises(ValueError, match="40 lowercase hex"):
        build(commit="abc")
    with pytest.raises(ValueError, match="is a test, not a build"):
        build(kind="build")
    with pytest.raises(SpecError, match=r"spec.runs: must be at least 1 \(got 0\)"):
        build(runs=0)
    with pytest.raises(SpecError, match="spec.kind: must be one of"):
        build(kind="deploy", task={**TASK, "kind": "deploy"})
    with pytest.raises(ValueError, match="no name"):
        build(task={"kind": "test"})
    unstored = {**REPO_OBJECT, "metadata": {"name": "app", "namespace": "ci"}}
    with pytest.raises(ValueError, match="no metadata.uid"):
        build_testrun(unstored, commit=COMMIT, branch=None, task=TASK, kind="test", runs=1,
                      depends_on=[], worker_pool=None, priority=0)


NOW = datetime.datetime(2026, 12, 1, 8, 30, 15, 123456, tzinfo=datetime.timezone.utc)
LATER = NOW + datetime.timedelta(minutes=5)


def test_condition():
    assert condition("Ready", True, "Polled", "fetched main", NOW, 4) == {
        "type": "Ready", "status": "True", "reason": "Polled", "message": "fetched main",
        "lastTransitionTime": "2026-12-01T08:30:15Z", "observedGeneration": 4}
    assert condition("GitReachable", False, "FetchFailed", "no route", NOW, None)["status"] == "False"
    assert "observedGeneration" not in condition("Ready", "Unknown", "Starting", "", NOW, None)
    assert condition("Ready", None, "Starting", "", NOW, 1)["status"] == "Unknown"
    with pytest.raises(ValueError, match="True, False or Unknown"):
        condition("Ready", "yes", "r", "m", NOW, 1)
    with pytest.raises(ValueError, match="True, False or Unknown"):
        condition("Ready", 1, "r", "m", NOW, 1)


def test_timestamps_are_utc_seconds():
    other_zone = datetime.timezone(datetime.timedelta(hours=2))
    assert timestamp(NOW.astimezone(other_zone)) == "2026-12-01T08:30:15Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        timestamp(datetime.datetime(2026, 12, 1))


def test_set_condition_keeps_the_transition_time_while_the_status_holds():
    first = [condition("Ready", True, "Polled", "ok", NOW, 1),
             condition("GitReachable", True, "Fetched", "ok", NOW, 1)]
    again = set_condition(first, condition("Ready", True, "Polled", "still ok", LATER, 2))
    assert again[0] == {**condition("Ready", True, "Polled", "still ok", LATER, 2),
                        "lastTransitionTime": "2026-12-01T08:30:15Z"}
    assert again[1] == first[1]
    assert first[0]["message"] == "ok"  # the input is left alone

    flipped = set_condition(again, condition("Ready", False, "FetchFailed", "no route", LATER, 2))
    assert flipped[0]["lastTransitionTime"] == "2026-12-01T08:35:15Z"
    assert [entry["type"] for entry in flipped] == ["Ready", "GitReachable"]


def test_set_condition_adds_new_types_and_drops_duplicates():
    assert set_condition(None, condition("Ready", True, "r", "m", NOW, 1)) == [
        condition("Ready", True, "r", "m", NOW, 1)]
    duplicated = [condition("Ready", False, "a", "", NOW, 1), condition("Ready", True, "b", "", NOW, 1)]
    result = set_condition(duplicated, condition("DefinitionsValid", True, "Resolved", "", LATER, 1))
    assert [entry["type"] for entry in result] == ["Ready", "Ready", "DefinitionsValid"]
    result = set_condition(duplicated, condition("Ready", False, "a", "again", LATER, 1))
    assert result == [{**condition("Ready", False, "a", "again", LATER, 1),
                       "lastTransitionTime": "2026-12-01T08:30:15Z"}]


def test_label_constants_match_the_contract():
    assert (objects.REPO_LABEL, objects.COMMIT_LABEL, objects.SHORT_COMMIT_LABEL, objects.KIND_LABEL) == (
        "testlooper.dev/repo", "testlooper.dev/commit", "testlooper.dev/short-commit",
        "testlooper.dev/kind")
