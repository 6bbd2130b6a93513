"""The samples in examples/cluster/ are admitted by the CRDs, and bad variants are refused as the
API server would refuse them."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from crd_validation import admit
from testlooper.kube import models
from testlooper.kube.objects import build_testrun

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "cluster"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def crd(names: models.ResourceNames) -> dict:
    return yaml.safe_load((ROOT / "crds" / f"{names.crd_name}.yaml").read_text(encoding="utf-8"))


def samples() -> list[dict]:
    documents = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        documents += [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                      if document]
    return documents


def sample(kind: str) -> dict:
    (found,) = [document for document in samples() if document["kind"] == kind]
    return copy.deepcopy(found)


CUSTOM = {"Repo": models.REPO, "WorkerPool": models.WORKERPOOL}
PARSERS = {"Repo": models.parse_repo_spec, "WorkerPool": models.parse_workerpool_spec}


def test_the_samples_are_a_workerpool_a_repo_and_two_secrets():
    kinds = sorted(document["kind"] for document in samples())
    assert kinds == ["Repo", "Secret", "Secret", "WorkerPool"]


@pytest.mark.parametrize("kind", ["Repo", "WorkerPool"])
def test_each_custom_sample_is_admitted_as_written(kind):
    document = sample(kind)
    assert document["apiVersion"] == models.API_VERSION
    stored, problems = admit(crd(CUSTOM[kind]), document)
    assert problems == []
    # Nothing in the sample was pruned: every field it shows means something.
    assert all(stored["spec"][key] == value for key, value in document["spec"].items())
    PARSERS[kind](stored["spec"])


def test_the_repo_refers_to_the_sample_secrets_and_pool():
    secrets = {document["metadata"]["name"]: document for document in samples()
               if document["kind"] == "Secret"}
    repo = sample("Repo")["spec"]
    assert "token" in secrets[repo["credentialsSecret"]]["stringData"]
    assert "secret" in secrets[repo["webhookSecret"]]["stringData"]
    assert repo["workerPool"] == sample("WorkerPool")["metadata"]["name"]
    assert sample("WorkerPool")["spec"]["provider"] == "kubernetes"


def test_the_sample_secrets_are_clearly_fake():
    for document in samples():
        if document["kind"] == "Secret":
            assert document["apiVersion"] == "v1" and document["type"] == "Opaque"
            for value in document["stringData"].values():
                assert value.startswith("FAKE-PLACEHOLDER-")


def refused(kind: str, change) -> list[str]:
    document = sample(kind)
    change(document)
    _stored, problems = admit(crd(CUSTOM[kind]), document)
    return problems


def test_a_wrong_enum_is_refused():
    problems = refused("WorkerPool", lambda pool: pool["spec"].update(provider="gce"))
    assert problems == ["spec.provider: 'gce' is not one of ['kubernetes', 'ec2']"]


def test_a_poll_interval_below_10_is_refused():
    problems = refused("Repo", lambda repo: repo["spec"].update(pollIntervalSeconds=5))
    assert problems == ["spec.pollIntervalSeconds: 5 is less than the minimum of 10"]


def test_a_missing_required_field_is_refused():
    problems = refused("Repo", lambda repo: repo["spec"].pop("url"))
    assert problems == ["spec: 'url' is a required property"]
    problems = refused("Repo", lambda repo: repo.pop("spec"))
    assert problems == ["<root>: 'spec' is a required property"]


def test_a_string_for_a_number_is_refused():
    problems = refused("WorkerPool", lambda pool: pool["spec"].update(maxWorkers="20"))
    assert problems == ["spec.maxWorkers: '20' is not of type 'integer'"]


def test_a_testrun_whose_commit_is_not_40_hex_is_refused():
    repo = {**sample("Repo"), "metadata": {"name": "demo", "namespace": "ci", "uid": "u-1"}}
    testrun = build_testrun(repo, commit=COMMIT, branch="main", task={"name": "unit", "kind": "test"},
                            kind="test", runs=1, depends_on=[], worker_pool=None, priority=0)
    for bad in (COMMIT[:12], COMMIT.upper(), "main"):
        testrun["spec"]["commit"] = bad
        _stored, problems = admit(crd(models.TESTRUN), testrun)
        assert problems == [f"spec.commit: '{bad}' does not match '^[0-9a-f]{{40}}$'"]


def test_an_unknown_field_is_refused_by_strict_validation_and_pruned_otherwise():
    # kubectl apply asks for strict field validation by default: the typo is refused.
    def misspell(repo):
        repo["spec"]["pollInterval"] = 30
        repo["spec"]["retention"]["keep"] = 3

    problems = refused("Repo", misspell)
    assert sorted(problems) == ["unknown field spec.pollInterval", "unknown field spec.retention.keep"]
    # A client that does not ask (an operator's patch) gets the fields silently pruned, and the
    # defaults apply to what remains.
    document = sample("Repo")
    misspell(document)
    del document["spec"]["pollIntervalSeconds"]
    stored, problems = admit(crd(models.REPO), document, strict=False)
    assert problems == []
    assert "pollInterval" not in stored["spec"] and stored["spec"]["pollIntervalSeconds"] == 60
    assert stored["spec"]["retention"] == {"keepCommits": 50}


def test_the_definition_of_a_testrun_keeps_every_field():
    repo = {**sample("Repo"), "metadata": {"name": "demo", "namespace": "ci", "uid": "u-1"}}
    task = {"name": "unit", "kind": "test", "anything": {"nested": [{"deep": True}]}}
    testrun = build_testrun(repo, commit=COMMIT, branch="main", task=task, kind="test", runs=1,
                            depends_on=[], worker_pool=None, priority=0)
    testrun["spec"]["somethingUnknown"] = 1
    stored, problems = admit(crd(models.TESTRUN), testrun, strict=False)
    assert problems == []
    assert stored["spec"]["definition"] == task and "somethingUnknown" not in stored["spec"]


# ------------------------------------------------------------------------------- the EC2 pool

EC2_SAMPLE = EXAMPLES / "ec2" / "ec2-pool.yaml"


def ec2_pool() -> dict:
    return yaml.safe_load(EC2_SAMPLE.read_text(encoding="utf-8"))


def test_the_ec2_pool_sample_is_admitted_and_parsed_as_written():
    document = ec2_pool()
    stored, problems = admit(crd(models.WORKERPOOL), document)
    assert problems == []
    # Nothing pruned; only the defaults of what it leaves out are added.
    assert stored["spec"]["ec2"] == {**document["spec"]["ec2"], "minLifetimeSeconds": 0, "reuse": False}
    spec = models.parse_workerpool_spec(stored["spec"])
    assert spec.provider == "ec2" and spec.platform == "windows" and not spec.ec2.reuse
    assert [entry.type for entry in spec.ec2.instanceTypes] == ["t3.medium", "m5.xlarge", "r5.8xlarge"]


def test_the_ec2_pool_sample_is_not_applied_with_the_quick_start():
    # kubectl apply -f examples/cluster/ does not recurse: the made-up ids stay out of a cluster.
    assert EC2_SAMPLE.parent != EXAMPLES and not list(EXAMPLES.glob("*ec2*.yaml"))


def test_a_bad_ec2_pool_is_refused_by_the_crd():
    document = ec2_pool()
    document["spec"]["ec2"]["vpcId"] = "vcp-XXXX"
    document["spec"]["ec2"]["instanceTypes"] = []
    document["spec"]["ec2"]["instanceTypes_"] = 1
    _stored, problems = admit(crd(models.WORKERPOOL), document)
    assert sorted(problems) == [
        "spec.ec2.instanceTypes: [] should be non-empty",
        "spec.ec2.vpcId: 'vcp-XXXX' does not match '^vpc-[0-9a-f]{8}([0-9a-f]{9})?$'",
        "unknown field spec.ec2.instanceTypes_",
    ]


def test_what_the_crd_cannot_say_the_operator_refuses_in_one_line():
    # "ec2 is required with provider ec2" needs CEL, which these CRDs do not use: the API
    # server admits the pool and the operator's model refuses it.
    document = ec2_pool()
    del document["spec"]["ec2"]
    _stored, problems = admit(crd(models.WORKERPOOL), document)
    assert problems == []
    with pytest.raises(models.SpecError) as refused_pool:
        models.parse_workerpool_spec(document["spec"])
    assert str(refused_pool.value) == "spec.ec2: is required when provider is ec2"


def test_kubectl_applies_the_ec2_pool_sample_and_the_api_refuses_a_bad_id(kube, tmp_path):
    kube.kubectl("apply", "--validate=false", "-f", str(EC2_SAMPLE))
    stored = json.loads(kube.kubectl("get", "workerpool", "windows-ec2", "-o", "json").stdout)
    written = ec2_pool()["spec"]
    assert stored["spec"] == {**written, "ec2": {**written["ec2"], "minLifetimeSeconds": 0, "reuse": False}}
    row = kube.kubectl("get", "tlpool", "windows-ec2").stdout.splitlines()[1].split()
    assert row[:2] == ["windows-ec2", "ec2"]
    bad = ec2_pool()
    bad["metadata"]["name"] = "bad-ec2"
    bad["spec"]["ec2"]["securityGroupIds"] = ["default"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    refused_apply = kube.kubectl("apply", "--validate=false", "-f", str(path), check=False)
    assert refused_apply.returncode != 0
    assert "spec.ec2.securityGroupIds[0]" in refused_apply.stderr, refused_apply.stderr
