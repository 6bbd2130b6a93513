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


def grants(documents: list[dict], service_account: str, namespace: str) -> list[tuple[str | None, set]]:
    """(namespace the rules hold in, None: everywhere; their triples) for each binding of the
    ServiceAccount, as the API server's RBAC authorizer reads a ClusterRoleBinding or RoleBinding."""
    roles = {(document["kind"], document["metadata"].get("namespace"), document["metadata"]["name"]): document
             for document in documents if document["kind"] in ("ClusterRole", "Role")}
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    found = []
    for binding in documents:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding") or subject not in binding["subjects"]:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        reference = binding["roleRef"]
        role = roles[(reference["kind"], scope if reference["kind"] == "Role" else None, reference["name"])]
        found.append((scope, rule_triples(role["rules"])))
    return found


def unauthorized(requests: list[dict], documents: list[dict], service_account: str, namespace: str) -> list[str]:
    """The recorded API requests (tests/kube_emulator.py) no binding of the chart allows."""
    bound = grants(documents, service_account, namespace)
    refused = []
    for request in requests:
        triple = (request["group"], request["resource"], request["verb"])
        if not any(triple in triples and scope in (None, request["namespace"]) for scope, triples in bound):
            refused.append(f"{request['verb']} {request['resource']} in {request['namespace'] or 'all namespaces'}")
    return sorted(set(refused))
