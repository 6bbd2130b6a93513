"""Helpers shared by the operator's tests: resources read through the emulator, signed pushes."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

NAMESPACE = "team-a"
WEBHOOK_SECRET = "FAKE-PLACEHOLDER-WEBHOOK-SECRET-replace-me"  # examples/cluster/01-secrets.yaml
GITHUB_PUSH = json.loads((Path(__file__).parent / "fixtures" / "webhooks" / "github-push.json").read_text())


def list_testruns(kube, namespace: str = NAMESPACE, **labels) -> list[dict]:
    selector = ",".join(f"{key}={value}" for key, value in labels.items())
    path = f"/apis/testlooper.dev/v1alpha1/namespaces/{namespace}/testruns"
    if selector:
        path += f"?labelSelector={selector}"
    return kube.api("GET", path)["items"]


def repo_object(kube, name: str = "demo", namespace: str = NAMESPACE) -> dict:
    return kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/{namespace}/repos/{name}")


def signed_push(url: str, after: str, secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict]:
    """GitHub's own push example with our repository's URLs in it, signed as GitHub signs."""
    payload = json.loads(json.dumps(GITHUB_PUSH))
    payload["ref"], payload["after"] = "refs/heads/main", after
    for key in ("clone_url", "git_url", "ssh_url", "html_url", "url", "svn_url"):
        payload["repository"][key] = url
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature,
                  "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def writes(kube, client: str) -> list[dict]:
    """The client's writes to TestLooper's own resources (peering and events aside)."""
    return [r for r in kube.requests(client=client)
            if r["verb"] in ("create", "update", "patch", "delete") and r["group"] == "testlooper.dev"]


def condition(obj: dict, condition_type: str) -> dict:
    for entry in (obj.get("status") or {}).get("conditions") or []:
        if entry["type"] == condition_type:
            return entry
    return {}


def events(kube, namespace: str = NAMESPACE) -> list[dict]:
    return kube.api("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
