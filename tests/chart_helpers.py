"""charts/testlooper rendered offline through helm-python-sdk (Helm 4's own template engine).

    documents = render_chart({"watchNamespaces": ["team-a"]})
    rbac_triples(documents)       # {(group, resource, verb), ...} of every ClusterRole and Role
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "testlooper"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, RELEASE_NAMESPACE = "tl", "testlooper"


def render_chart(values: dict | None = None, chart: Path = CHART, namespace: str = RELEASE_NAMESPACE) -> list[dict]:
    """Every object the chart renders with `values` (the manifests only: NOTES.txt left out)."""
    import helm_python

    rendered = helm_python.Chart.load(str(chart)).render(values or {}, name=RELEASE, namespace=namespace)
    documents = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [document for document in yaml.safe_load_all(text) if document]
    return documents


def render_notes(values: dict | None = None) -> str:
    import helm_python

    rendered = helm_python.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def of_kind(documents: list[dict], kind: str) -> list[dict]:
    return [document for document in documents if document["kind"] == kind]


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def rbac_triples(documents: list[dict]) -> set[tuple[str, str, str]]:
    """What the chart grants, each rule of each ClusterRole and Role expanded to triples."""
    granted = set()
    for document in documents:
        if document["kind"] in ("ClusterRole", "Role"):
            granted |= rule_triples(document["rules"])
    return granted


def operator_container(documents: list[dict]) -> dict:
    deployment, = of_kind(documents, "Deployment")
    container, = deployment["spec"]["template"]["spec"]["containers"]
    return container
