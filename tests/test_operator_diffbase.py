"""kopf's diff-base is skipped for the kinds we only watch (cluster/app.py EVENT_ONLY_KINDS):
right only while no change handler, daemon or timer of ours is registered for them."""

from __future__ import annotations

import kopf

from testlooper.cluster.app import EVENT_ONLY_KINDS, build_registry, kopf_settings
from testlooper.cluster.context import OperatorOptions

RUNS_OPTIONS = OperatorOptions(namespaces=("team-a",), standalone=True, store_url="redis://127.0.0.1:1/0",
                               api_url="http://127.0.0.1:1")
RESOURCES = {"TestRun": kopf.Resource("testlooper.dev", "v1alpha1", "testruns"),
             "Pod": kopf.Resource("", "v1", "pods"),
             "Repo": kopf.Resource("testlooper.dev", "v1alpha1", "repos"),
             "WorkerPool": kopf.Resource("testlooper.dev", "v1alpha1", "workerpools")}


def test_the_event_only_kinds_have_only_event_handlers_with_runs_and_without():
    for options in (RUNS_OPTIONS, OperatorOptions(namespaces=("team-a",), standalone=True)):
        registry = build_registry(options)
        for kind in EVENT_ONLY_KINDS:
            resource = RESOURCES[kind]
            assert not registry._changing.has_handlers(resource=resource), kind
            assert not registry._spawning.has_handlers(resource=resource), kind
    # The kinds with a daemon, a timer or a deletion handler keep kopf's diff-base.
    registry = build_registry(RUNS_OPTIONS)
    assert registry._spawning.has_handlers(resource=RESOURCES["Repo"])
    assert registry._spawning.has_handlers(resource=RESOURCES["WorkerPool"])
    assert not {"Repo", "WorkerPool"} & EVENT_ONLY_KINDS


def test_the_diff_base_is_built_for_repos_and_not_for_testruns_or_pods():
    storage = kopf_settings(RUNS_OPTIONS).persistence.diffbase_storage
    spec = {"url": "https://git.example.com/a.git", "branches": ["main"]}
    metadata = {"name": "x", "namespace": "team-a", "labels": {"a": "b"}, "annotations": {
        "testlooper.dev/last-handled-configuration": '{"spec": {"url": "old"}}'}}
    repo = kopf.Body({"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": metadata, "spec": spec,
                      "status": {"phase": "Ready"}})
    essence = storage.build(body=repo)
    assert essence["spec"] == spec and "status" not in essence
    assert storage.fetch(body=repo) == {"spec": {"url": "old"}}
    for kind in ("TestRun", "Pod"):
        body = kopf.Body({"apiVersion": "v1", "kind": kind, "metadata": metadata, "spec": spec, "status": {}})
        assert storage.build(body=body) is None and storage.fetch(body=body) is None
    # Without a kind, kopf's own way.
    assert storage.build(body=kopf.Body({"metadata": metadata, "spec": spec}))["spec"] == spec
