"""The CRDs in crds/ are generated from the models, structural, and say what the contract says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crd_validation import admit, structural_problems, version_schema
from testlooper.kube import crds, models

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"


def on_disk(name: str) -> dict:
    return yaml.safe_load((CRD_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def run_generator(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run([sys.executable, "-m", "testlooper.kube.crds", *args], env=environment,
                          capture_output=True, text=True, timeout=60)


def test_crds_on_disk_are_what_the_models_generate():
    stale = crds.stale_files(CRD_DIR)
    assert not stale, (
        "crds/ is out of date with testlooper/kube/models.py; run "
        "`python -m testlooper.kube.crds --write crds/`\n" + "\n".join(stale.values()))


def test_check_fails_with_a_diff_when_a_crd_file_is_stale(tmp_path):
    assert run_generator("--write", str(tmp_path)).returncode == 0
    assert run_generator("--check", str(tmp_path)).returncode == 0
    stale = tmp_path / "repos.testlooper.dev.yaml"
    stale.write_text(stale.read_text().replace("minimum: 10", "minimum: 5"))
    (tmp_path / "workerpools.testlooper.dev.yaml").unlink()
    checked = run_generator("--check", str(tmp_path))
    assert checked.returncode == 1
    assert "-                minimum: 5\n+                minimum: 10" in checked.stdout
    assert "2 CRD file(s)" in checked.stderr and "--write" in checked.stderr
    rewritten = run_generator("--write", str(tmp_path))
    assert rewritten.returncode == 0 and "workerpools.testlooper.dev.yaml" in rewritten.stdout
    assert run_generator("--check", str(tmp_path)).returncode == 0


def test_write_leaves_other_files_in_the_directory_alone(tmp_path):
    (tmp_path / "clusterrole.yaml").write_text("kind: ClusterRole\n")
    assert run_generator("--write", str(tmp_path)).returncode == 0
    assert (tmp_path / "clusterrole.yaml").read_text() == "kind: ClusterRole\n"
    assert run_generator("--check", str(tmp_path)).returncode == 0


@pytest.mark.parametrize("name", ["repos.testlooper.dev", "testruns.testlooper.dev",
                                  "workerpools.testlooper.dev"])
def test_every_crd_is_structural(name):
    crd = on_disk(name)
    assert structural_problems(version_schema(crd)) == []
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"


def test_the_walk_catches_what_is_not_structural():
    bad = {"type": "object", "properties": {
        "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "b": {"type": "object", "additionalProperties": False, "properties": {}},
        "c": {"$ref": "#/$defs/C"},
        "d": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    }}
    problems = structural_problems(bad)
    assert "/a: no type" in problems and "/a: forbidden keyword anyOf" in problems
    assert "/b: additionalProperties must be a schema, not False" in problems
    assert "/c: forbidden keyword $ref" in problems
    assert not [problem for problem in problems if problem.startswith("/d")]


def test_generator_refuses_what_it_cannot_translate():
    from typing import Union

    from pydantic import BaseModel

    class TwoTypes(BaseModel):
        either: Union[int, str]

    class FreeForm(BaseModel):
        anything: dict

    with pytest.raises(ValueError, match="union of 2 types"):
        crds.model_schema(TwoTypes)
    with pytest.raises(ValueError, match="preserve-unknown-fields"):
        crds.model_schema(FreeForm)


@pytest.mark.parametrize("names", [models.REPO, models.TESTRUN, models.WORKERPOOL])
def test_names_scope_and_subresources(names):
    crd = on_disk(names.crd_name)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == names.crd_name
    assert spec["group"] == "testlooper.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": names.kind, "listKind": f"{names.kind}List",
                             "plural": names.plural, "singular": names.singular,
                             "shortNames": [names.short_name], "categories": ["testlooper"]}
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def columns(name: str) -> list[tuple[str, str, str]]:
    (version,) = on_disk(name)["spec"]["versions"]
    return [(column["name"], column["jsonPath"], column["type"])
            for column in version["additionalPrinterColumns"]]


def test_printer_columns_are_the_contracts():
    age = ("AGE", ".metadata.creationTimestamp", "date")
    assert columns("repos.testlooper.dev") == [
        ("URL", ".spec.url", "string"),
        ("BRANCHES", ".status.branchesSummary", "string"),
        ("READY", '.status.conditions[?(@.type=="Ready")].status', "string"),
        ("LAST POLL", ".status.lastPollTime", "date"),
        age,
    ]
    assert columns("testruns.testlooper.dev") == [
        ("REPO", ".spec.repo", "string"),
        ("COMMIT", r".metadata.labels.testlooper\.dev/short-commit", "string"),
        ("TASK", ".spec.task", "string"),
        ("PHASE", ".status.phase", "string"),
        ("RESULT", ".status.result", "string"),
        ("RUNS", ".status.runsSummary", "string"),
        ("CASES", ".status.casesSummary", "string"),
        age,
    ]
    assert columns("workerpools.testlooper.dev") == [
        ("PROVIDER", ".spec.provider", "string"),
        ("WORKERS", ".status.workersSummary", "string"),
        ("CORES", ".status.cores", "integer"),
        ("QUEUED", ".status.queued", "integer"),
        age,
    ]


def test_printer_columns_point_at_fields_the_schema_has():
    for names in (models.REPO, models.TESTRUN, models.WORKERPOOL):
        schema = version_schema(on_disk(names.crd_name))
        for name, path, _type in columns(names.crd_name):
            if path.startswith(".metadata"):
                continue
            node = schema
            for part in path.lstrip(".").split("[")[0].split("."):
                assert part in node["properties"], f"{names.kind} column {name}: {path}"
                node = node["properties"][part]


def test_every_field_is_described_for_kubectl_explain():
    undescribed = []

    def walk(node, path):
        # A list of plain strings is described by its field; a list of objects by their model.
        scalar_item = path.endswith("[]") and node.get("type") != "object"
        if path.count(".") > 1 and "description" not in node and not scalar_item:
            undescribed.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    for names in (models.REPO, models.TESTRUN, models.WORKERPOOL):
        schema = version_schema(on_disk(names.crd_name))
        assert schema["description"]
        for part in ("spec", "status"):
            assert schema["properties"][part]["description"]
            walk(schema["properties"][part], f"{names.kind}.{part}")
    assert undescribed == []


def test_contract_constraints_are_in_the_schemas():
    repo = version_schema(on_disk("repos.testlooper.dev"))["properties"]["spec"]
    assert repo["required"] == ["url"]
    fields = repo["properties"]
    assert fields["url"]["minLength"] == 1
    assert fields["branches"]["default"] == ["main"] and fields["branches"]["minItems"] == 1
    assert fields["pollIntervalSeconds"] == {**fields["pollIntervalSeconds"], "type": "integer",
                                             "default": 60, "minimum": 10}
    assert (fields["runs"]["minimum"], fields["runs"]["maximum"]) == (1, 1000)
    assert fields["suspend"]["default"] is False
    assert fields["retention"]["properties"]["keepCommits"]["default"] == 50

    testrun = version_schema(on_disk("testruns.testlooper.dev"))["properties"]["spec"]
    assert testrun["required"] == ["repo", "commit", "task", "kind"]
    fields = testrun["properties"]
    assert fields["commit"]["pattern"] == "^[0-9a-f]{40}$"
    assert fields["kind"]["enum"] == ["build", "test"]
    assert (fields["runs"]["minimum"], fields["runs"]["maximum"], fields["runs"]["default"]) == (1, 100000, 1)
    assert fields["definition"]["x-kubernetes-preserve-unknown-fields"] is True

    pool = version_schema(on_disk("workerpools.testlooper.dev"))["properties"]["spec"]
    assert pool["required"] == ["provider"]
    assert pool["properties"]["provider"]["enum"] == ["kubernetes", "ec2"]
    assert pool["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}
    toleration = pool["properties"]["tolerations"]["items"]["properties"]
    assert toleration["operator"]["enum"] == ["Exists", "Equal"]
    assert toleration["effect"]["enum"] == ["NoSchedule", "PreferNoSchedule", "NoExecute"]


def test_retention_defaults_even_when_left_out():
    # retention defaults to {}, and the API server then defaults keepCommits inside it.
    stored, problems = admit(on_disk("repos.testlooper.dev"), {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": "r"},
        "spec": {"url": "file:///srv/git/r"}})
    assert problems == []
    assert stored["spec"] == {"url": "file:///srv/git/r", "branches": ["main"],
                              "pollIntervalSeconds": 60, "suspend": False,
                              "retention": {"keepCommits": 50}}


ROUND_TRIP = """
import json, sys
from kubernetes import client
api = client.ApiClient()
for line in sys.stdin:
    typed = api.deserialize(line, "V1CustomResourceDefinition", "application/json")
    print(json.dumps(api.sanitize_for_serialization(typed)))
"""


def round_trip_through_the_kubernetes_client(*documents: dict) -> list[dict]:
    # In a child process: the client's models take some 35 MB, and the suite's memory tests
    # measure this process's peak.
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP], input="".join(
        json.dumps(document) + "\n" for document in documents), capture_output=True, text=True,
        timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_crd_field_is_one_the_kubernetes_api_defines():
    # The official client's typed CustomResourceDefinition drops what it does not know, so a
    # misspelt key (printerColumns, openAPIv3Schema, x-kubernetes-preserve-unknownfields) shows.
    written = [on_disk(names.crd_name) for names in (models.REPO, models.TESTRUN, models.WORKERPOOL)]
    misspelt = on_disk("repos.testlooper.dev")
    (version,) = misspelt["spec"]["versions"]
    version["printerColumns"] = version.pop("additionalPrinterColumns")
    *round_tripped, misspelt_round_tripped = round_trip_through_the_kubernetes_client(*written, misspelt)
    assert round_tripped == written
    assert misspelt_round_tripped != misspelt  # the round trip does catch a misspelt key
