"""The resource models: what the operator accepts from a spec, and how it says what is wrong."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from crd_validation import admit
from testlooper.errors import UserError
from testlooper.kube import crds, models
from testlooper.kube.models import (
    SpecError, parse_repo_spec, parse_testrun_spec, parse_workerpool_spec,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def refusal(parse, spec) -> str:
    with pytest.raises(SpecError) as raised:
        parse(spec)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_minimal_repo_gets_the_contract_defaults():
    spec = parse_repo_spec({"url": "https://example.com/team/app.git"})
    assert spec.branches == ["main"]
    assert spec.pollIntervalSeconds == 60
    assert spec.suspend is False
    assert spec.retention.keepCommits == 50
    assert spec.credentialsSecret is None and spec.runs is None and spec.testSets is None


def test_defaults_are_not_shared_between_specs():
    first = parse_repo_spec({"url": "file:///a"})
    first.branches.append("release/*")
    assert parse_repo_spec({"url": "file:///b"}).branches == ["main"]


def test_a_full_repo_spec():
    spec = parse_repo_spec({
        "url": "git@github.com:team/app.git", "branches": ["main", "release/*"],
        "pollIntervalSeconds": 10, "credentialsSecret": "app-git", "webhookSecret": "app-hook",
        "definitionsPath": "ci/testlooper.yml", "testSets": ["quick"], "runs": 1000,
        "workerPool": "linux", "suspend": True, "retention": {"keepCommits": 1},
    })
    assert spec.runs == 1000 and spec.retention.keepCommits == 1 and spec.branches[1] == "release/*"


@pytest.mark.parametrize("spec, expected", [
    ({}, "spec.url: is required"),
    ({"url": ""}, "spec.url: must not be empty (got '')"),
    ({"url": "file:///a", "pollIntervalSeconds": 5}, "spec.pollIntervalSeconds: must be at least 10 (got 5)"),
    ({"url": "file:///a", "pollIntervalSeconds": "60"}, "spec.pollIntervalSeconds: must be an integer (got '60')"),
    ({"url": "file:///a", "runs": 1001}, "spec.runs: must be at most 1000 (got 1001)"),
    ({"url": "file:///a", "branches": []}, "spec.branches: must have at least 1 item(s) (got a list)"),
    ({"url": "file:///a", "branches": ["main", 7]}, "spec.branches[1]: must be a string (got 7)"),
    ({"url": "file:///a", "suspend": "yes"}, "spec.suspend: must be true or false (got 'yes')"),
    ({"url": "file:///a", "retention": {"keepCommits": 0}}, "spec.retention.keepCommits: must be at least 1 (got 0)"),
    ({"url": "file:///a", "retention": 3}, "spec.retention: must be an object (got 3)"),
    ({"url": "file:///a", "pollInterval": 30}, "spec.pollInterval: is not a known field"),
])
def test_bad_repo_specs_name_the_field(spec, expected):
    assert refusal(parse_repo_spec, spec) == expected


def test_every_problem_is_named_on_one_line():
    message = refusal(parse_repo_spec, {"pollIntervalSeconds": 1, "runs": 0})
    assert message == ("spec.url: is required; spec.pollIntervalSeconds: must be at least 10 (got 1); "
                       "spec.runs: must be at least 1 (got 0)")


def test_a_spec_that_is_not_an_object():
    assert refusal(parse_repo_spec, ["url"]) == "spec: must be an object, not a list"
    assert refusal(parse_repo_spec, None) == "spec: must be an object, not null"


def test_spec_errors_are_user_errors():
    assert issubclass(SpecError, UserError) and issubclass(SpecError, ValueError)


def test_long_or_structured_inputs_are_described_not_echoed():
    message = refusal(parse_testrun_spec, {"repo": "r", "task": "t", "kind": "test",
                                            "commit": "x" * 500, "definition": "not an object"})
    assert "x" * 61 not in message
    assert "spec.commit: must match ^[0-9a-f]{40}$ (got a string of 500 characters)" in message
    assert "spec.definition: must be an object" in message


def test_testrun_spec():
    spec = parse_testrun_spec({"repo": "app", "commit": COMMIT, "task": "unit/linux", "kind": "test",
                               "definition": {"name": "unit/linux", "anything": {"goes": [1]}}})
    assert (spec.runs, spec.priority, spec.cancel) == (1, 0, False)
    assert spec.definition["anything"] == {"goes": [1]}


@pytest.mark.parametrize("change, expected", [
    ({"kind": "deploy"}, "spec.kind: must be one of 'build' or 'test' (got 'deploy')"),
    ({"commit": COMMIT.upper()}, "spec.commit: must match ^[0-9a-f]{40}$"),
    ({"commit": COMMIT[:12]}, "spec.commit: must match ^[0-9a-f]{40}$"),
    ({"runs": 0}, "spec.runs: must be at least 1 (got 0)"),
    ({"runs": 100001}, "spec.runs: must be at most 100000 (got 100001)"),
    ({"cancel": 1}, "spec.cancel: must be true or false (got 1)"),
    ({"task": ""}, "spec.task: must not be empty"),
])
def test_bad_testrun_specs(change, expected):
    spec = {"repo": "app", "commit": COMMIT, "task": "unit/linux", "kind": "test", **change}
    assert refusal(parse_testrun_spec, spec).startswith(expected)


def test_workerpool_spec():
    spec = parse_workerpool_spec({
        "provider": "kubernetes", "nodeSelector": {"pool": "ci"}, "maxPodRamGb": 7.5,
        "maxRamGb": 64, "tolerations": [{"key": "ci", "operator": "Equal", "value": "yes",
                                         "effect": "NoSchedule"}]})
    assert spec.platform == "linux" and spec.priority == 0
    assert spec.maxRamGb == 64 and spec.tolerations[0].effect == "NoSchedule"


@pytest.mark.parametrize("spec, expected", [
    ({}, "spec.provider: is required"),
    ({"provider": "gce"}, "spec.provider: must be one of 'kubernetes' or 'ec2' (got 'gce')"),
    ({"provider": "kubernetes", "platform": "mac"}, "spec.platform: must be one of 'linux' or 'windows'"),
    ({"provider": "kubernetes", "maxPodCores": 0}, "spec.maxPodCores: must be at least 1 (got 0)"),
    ({"provider": "kubernetes", "maxRamGb": -1}, "spec.maxRamGb: must be at least 0"),
    ({"provider": "kubernetes", "nodeSelector": {"zone": 3}}, "spec.nodeSelector.zone: must be a string (got 3)"),
    ({"provider": "kubernetes", "tolerations": [{"effect": "Never"}]},
     "spec.tolerations[0].effect: must be one of 'NoSchedule', 'PreferNoSchedule' or 'NoExecute'"),
])
def test_bad_workerpool_specs(spec, expected):
    assert refusal(parse_workerpool_spec, spec).startswith(expected)


def test_statuses_read_back_what_the_operator_writes():
    status = models.TestRunStatus.model_validate({
        "phase": "Running", "runCounts": {"total": 6, "passed": 2, "failed": 1, "running": 3,
                                          "queued": 0, "errored": 0},
        "runsSummary": "2/6", "failingCases": ["a::b"], "written_by_a_newer_operator": 1,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T08:00:00Z"}],
    })
    assert status.runCounts.running == 3 and status.conditions[0].status == "True"
    with pytest.raises(ValidationError, match="at most 20"):
        models.TestRunStatus.model_validate({"failingCases": ["x"] * 21})


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("names, model, minimal", [
    (models.REPO, models.RepoSpec, {"url": "file:///a"}),
    (models.TESTRUN, models.TestRunSpec, {"repo": "a", "commit": COMMIT, "task": "t", "kind": "build"}),
    (models.WORKERPOOL, models.WorkerPoolSpec, {"provider": "kubernetes"}),
])
def test_the_api_servers_defaults_are_the_models(names, model, minimal):
    crd = yaml.safe_load((ROOT / "crds" / f"{names.crd_name}.yaml").read_text())
    stored, problems = admit(crd, {"apiVersion": models.API_VERSION, "kind": names.kind,
                                   "metadata": {"name": "x"}, "spec": minimal})
    assert problems == []
    assert stored["spec"] == model.model_validate(minimal).model_dump(exclude_none=True)
    assert crds.all_crds()[f"{names.crd_name}.yaml"] == crd


def test_docs_describe_every_field():
    text = (ROOT / "docs" / "resources.md").read_text(encoding="utf-8")
    missing = []
    for model in (models.RepoSpec, models.RepoStatus, models.BranchStatus, models.Retention,
                  models.TestRunSpec, models.TestRunStatus, models.RunCounts, models.CaseCounts,
                  models.ResultFrom, models.WorkerPoolSpec, models.WorkerPoolStatus,
                  models.Toleration, models.Condition):
        missing += [f"{model.__name__}.{field}" for field in model.model_fields
                    if not re.search(rf"\b{field}\b", text)]
    assert missing == []
