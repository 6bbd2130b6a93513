"""How the cluster commands (`rerun`, `logs`) reach the cluster and read a TestRun: like
kubectl (KUBECONFIG, its current context's namespace), else the in-cluster service account."""

from __future__ import annotations

import os

from testlooper.errors import UserError

GROUP, VERSION = "testlooper.dev", "v1alpha1"


def connect(namespace: str | None):
    """(the CustomObjectsApi, the namespace to use): ``namespace`` if given, else the
    kubeconfig context's, else the service account's."""
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        namespace = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace") or "default"
    except config.ConfigException:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise UserError("no cluster to talk to: set KUBECONFIG, or run this inside the cluster") from None
        namespace = namespace or _incluster_namespace()
    return client.CustomObjectsApi(), namespace


def read_testrun(api, namespace: str, name: str) -> dict:
    import urllib3
    from kubernetes import client

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, "testruns", name)
    except client.ApiException as exc:
        if exc.status == 404:
            raise UserError(f"no TestRun {name} in namespace {namespace} (kubectl get testruns -n {namespace})") from None
        raise UserError(f"cannot read TestRun {name}: {exc.status} {exc.reason}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise UserError(f"cannot reach the cluster: {reason(exc)}") from None


def reason(exc: BaseException) -> str:
    """The innermost cause, in one line: "Connection refused", not urllib3's retry wrapping."""
    while getattr(exc, "reason", None) is not None and isinstance(exc.reason, BaseException):
        exc = exc.reason
    return " ".join(str(exc).split(": ")[-1:]) or type(exc).__name__


def _incluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"
