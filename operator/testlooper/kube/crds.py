"""Generate the CustomResourceDefinitions of Repo, TestRun and WorkerPool from their models.

    python -m testlooper.kube.crds --write crds/    # regenerate the files
    python -m testlooper.kube.crds --check crds/    # exit 1, with a diff, when they are stale

The API server wants a *structural* schema: every node typed, no $ref, no anyOf for an
optional field, no `additionalProperties: false` (unknown fields are pruned instead). Pydantic
writes JSON Schema, so `structural()` translates it, and refuses any keyword it does not know
how to translate rather than let the API server refuse the CRD later.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from testlooper.kube import models
from testlooper.kube.models import API_VERSION, GROUP, VERSION, ResourceNames

CATEGORIES = ["testlooper"]

# JSON Schema keywords that mean the same in a CRD's OpenAPI v3 schema and pass through as they are.
PASSED_THROUGH = {
    "type", "description", "required", "default", "enum", "format", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties",
}
# Pydantic's annotations for documentation tools, with no meaning for validation.
DROPPED = {"title"}


def _column(name: str, json_path: str, description: str, type_: str = "string") -> dict:
    return {"name": name, "type": type_, "jsonPath": json_path, "description": description}


AGE = _column("AGE", ".metadata.creationTimestamp", "When the resource was created.", "date")

RESOURCES: list[tuple[ResourceNames, str, type[BaseModel], type[BaseModel], list[dict]]] = [
    (
        models.REPO,
        "A git repository whose branches TestLooper watches. Every new commit on them gets one "
        "TestRun per build and test that its definitions and triggers plan.",
        models.RepoSpec,
        models.RepoStatus,
        [
            _column("URL", ".spec.url", "Where the repository is fetched from."),
            _column("BRANCHES", ".status.branchesSummary", "Each branch's head and tally."),
            _column("READY", '.status.conditions[?(@.type=="Ready")].status',
                    "Whether the repository is polled and its definitions resolve."),
            _column("LAST POLL", ".status.lastPollTime", "When it was last fetched.", "date"),
            AGE,
        ],
    ),
    (
        models.TESTRUN,
        "One build or test of one commit of a Repo. Its runs are counted in status; its result "
        "is passed, failed or flaky once they end.",
        models.TestRunSpec,
        models.TestRunStatus,
        [
            _column("REPO", ".spec.repo", "The Repo."),
            # kubectl cannot cut a string, so the 12-character commit is a label set at creation.
            _column("COMMIT", r".metadata.labels.testlooper\.dev/short-commit",
                    "The commit (first 12 characters)."),
            _column("TASK", ".spec.task", "The build or test name."),
            _column("PHASE", ".status.phase", "Where the TestRun stands."),
            _column("RESULT", ".status.result", "The result, once it ends."),
            _column("RUNS", ".status.runsSummary", "Runs passed/total."),
            _column("CASES", ".status.casesSummary", "Test cases passed/total."),
            AGE,
        ],
    ),
    (
        models.WORKERPOOL,
        "Where runs execute (pods in this cluster, or later EC2 machines) and how much of it "
        "they may take at once.",
        models.WorkerPoolSpec,
        models.WorkerPoolStatus,
        [
            _column("PROVIDER", ".spec.provider", "kubernetes or ec2."),
            _column("WORKERS", ".status.workersSummary", "Workers in use/max."),
            _column("CORES", ".status.cores", "Cores in use.", "integer"),
            _column("QUEUED", ".status.queued", "Runs waiting for room.", "integer"),
            AGE,
        ],
    ),
]


def structural(node: dict, definitions: dict) -> dict:
    """Translate one pydantic JSON Schema node (and its children) into a structural schema node."""
    node = dict(node)
    if "$ref" in node:
        target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description and default win over the model's
    if "anyOf" in node:
        choices = [choice for choice in node.pop("anyOf") if choice != {"type": "null"}]
        if len(choices) != 1:
            raise ValueError(f"cannot express a union of {len(choices)} types structurally: {choices}")
        # An optional field: the schema of its one real type, plus the field's own keywords.
        return structural({**choices[0], **node}, definitions)
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED or (key == "default" and value is None):
            continue
        if key == "properties":
            result[key] = {name: structural(child, definitions) for name, child in value.items()}
        elif key == "items":
            result[key] = structural(value, definitions)
        elif key == "additionalProperties":
            if value is False:
                continue  # unknown fields are pruned by the API server; it may not be said
            if value is True:
                if not preserve:
                    raise ValueError("a free-form object needs x-kubernetes-preserve-unknown-fields")
                continue
            result[key] = structural(value, definitions)
        elif key in PASSED_THROUGH or key.startswith("x-kubernetes-"):
            result[key] = copy.deepcopy(value)
        else:
            raise ValueError(f"no structural equivalent for the JSON Schema keyword {key!r}")
    if "type" not in result and not preserve:
        raise ValueError(f"a schema node without a type: {node}")
    return _ordered(result)


# Keys in the order a reader of the YAML wants them: what it is, then what it holds.
_KEY_ORDER = ["description", "type", "format", "enum", "default", "minimum", "maximum",
              "minLength", "maxLength", "pattern", "minItems", "maxItems",
              "maxProperties", "properties", "additionalProperties", "items", "required"]


def _ordered(node: dict) -> dict:
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda item: rank.get(item[0], len(rank))))


def model_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return structural(schema, definitions)


def build_crd(names: ResourceNames, description: str, spec_model: type[BaseModel],
              status_model: type[BaseModel], columns: list[dict]) -> dict:
    spec_schema = model_schema(spec_model)
    status_schema = model_schema(status_model)
    root = {
        "description": description,
        "type": "object",
        "properties": {
            "apiVersion": {"description": f"The API version: {API_VERSION}.", "type": "string"},
            "kind": {"description": f"The kind: {names.kind}.", "type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.crd_name,
            "labels": {"app.kubernetes.io/name": "testlooper", "app.kubernetes.io/part-of": "testlooper"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": names.kind,
                "listKind": f"{names.kind}List",
                "plural": names.plural,
                "singular": names.singular,
                "shortNames": [names.short_name],
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(columns),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict]:
    """Each CRD by its file name, e.g. repos.testlooper.dev.yaml."""
    return {f"{resource[0].crd_name}.yaml": build_crd(*resource) for resource in RESOURCES}


HEADER = (
    "# Generated from operator/testlooper/kube/models.py. Do not edit: change the models, then run\n"
    "#   python -m testlooper.kube.crds --write crds/\n"
)


def render(crd: dict) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, default_flow_style=False, width=100)


def rendered_files() -> dict[str, str]:
    return {name: render(crd) for name, crd in all_crds().items()}


def stale_files(directory: Path) -> dict[str, str]:
    """The generated files that differ from what `directory` holds, each with a unified diff."""
    stale = {}
    for name, text in rendered_files().items():
        path = directory / name
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            stale[name] = "".join(difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"{path} (on disk)", tofile=f"{path} (from the models)"))
    return stale


def write_files(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered_files().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testlooper.kube.crds",
        description="Generate the TestLooper CRDs from the models in testlooper/kube/models.py.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help="write the CRD files into DIR")
    action.add_argument("--check", metavar="DIR", type=Path,
                        help="exit 1, showing the difference, if DIR's CRD files are out of date")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_files(args.write):
            print(f"wrote {path}")
        return 0
    stale = stale_files(args.check)
    for name, diff in stale.items():
        sys.stdout.write(diff)
    if stale:
        print(f"{len(stale)} CRD file(s) in {args.check} are out of date with the models: "
              f"run python -m testlooper.kube.crds --write {args.check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
