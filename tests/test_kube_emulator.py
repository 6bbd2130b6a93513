"""The Kubernetes emulator (tests/kube_emulator.py) behaves as the API server where kubectl, the
official client and kopf can tell: each test drives it with one of those real clients."""

from __future__ import annotations

import datetime
import json
import pathlib
import time
import urllib.request

import kubernetes
import pytest
import yaml

from kube_fixtures import rbac_permissions, rbac_rules, wait_until
from kube_jsonpath import JsonPathError, compile_path

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GROUP, VERSION = "example.testlooper.dev", "v1alpha1"
WIDGETS = f"/apis/{GROUP}/{VERSION}/namespaces/default/widgets"


def widget(name: str, color: str = "blue", size: int = 3, labels: dict | None = None) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"color": color, "size": size}}


def write_yaml(path: pathlib.Path, *documents: dict) -> str:
    path.write_text(yaml.safe_dump_all(documents))
    return str(path)


def table(output: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of {HEADER: cell}, cut at the header's column starts."""
    lines = [line for line in output.splitlines() if line.strip()]
    header = lines[0]
    # Columns start at a non-space after at least two spaces (a header may be "LAST SEEN").
    starts = [0] + [i for i in range(1, len(header))
                    if header[i] != " " and header[i - 1] == " " and header[i - 2] == " "]
    names = [header[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
    return [{name: line[s:e].strip() for name, s, e in zip(names, starts, starts[1:] + [None])}
            for line in lines[1:]]


@pytest.fixture
def api(kube):
    """The official client, talking to the emulator as client "python"."""
    client = kubernetes.config.new_client_from_config(config_file=kube.kubeconfig("python"))
    yield kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
    client.close()


# ---------- kubectl ----------

def test_kubectl_apply_creates_then_reports_unchanged(kube, tmp_path):
    path = write_yaml(tmp_path / "w.yaml", widget("w1"))
    assert kube.kubectl("apply", "--validate=false", "-f", path).stdout.strip() == \
        "widget.example.testlooper.dev/w1 created"
    assert kube.kubectl("apply", "--validate=false", "-f", path).stdout.strip() == \
        "widget.example.testlooper.dev/w1 unchanged"
    stored = kube.api("GET", f"{WIDGETS}/w1")
    metadata = stored["metadata"]
    assert metadata["generation"] == 1 and metadata["uid"] and metadata["namespace"] == "default"
    assert int(metadata["resourceVersion"]) > 0
    assert datetime.datetime.fromisoformat(metadata["creationTimestamp"].replace("Z", "+00:00"))
    # A changed file is a merge patch: spec changes bump the generation.
    write_yaml(tmp_path / "w.yaml", widget("w1", color="red"))
    assert "configured" in kube.kubectl("apply", "--validate=false", "-f", path).stdout
    assert kube.api("GET", f"{WIDGETS}/w1")["metadata"]["generation"] == 2


def test_kubectl_get_prints_the_crd_printer_columns(kube, tmp_path):
    write_yaml(tmp_path / "w.yaml",
               widget("w1", labels={"testlooper.dev/short-commit": "0123456789ab"}),
               widget("w2", color="green", size=5))
    kube.kubectl("apply", "--validate=false", "-f", str(tmp_path / "w.yaml"))
    two_days_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=50)
                    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.kubectl("patch", "widget", "w1", "--subresource", "status", "--type", "merge", "-p",
                 json.dumps({"status": {"lastSeen": two_days_ago, "conditions": [
                     {"type": "Synced", "status": "False"},
                     {"type": "Ready", "status": "True"}]}}))
    output = kube.kubectl("get", "widgets").stdout
    assert output.splitlines()[0].split() == ["NAME", "COLOR", "READY", "COMMIT", "SIZE", "LAST",
                                              "SEEN", "AGE"]
    rows = {row["NAME"]: row for row in table(output)}
    assert rows["w1"]["COLOR"] == "blue"
    assert rows["w1"]["READY"] == "True"  # the filter picked the Ready condition, not Synced
    assert rows["w1"]["COMMIT"] == "0123456789ab"  # the label key with an escaped dot
    assert rows["w1"]["SIZE"] == "3"
    assert rows["w1"]["LAST SEEN"] == "2d2h"  # a date column is shown as an age
    assert rows["w1"]["AGE"].endswith("s")
    assert rows["w2"]["READY"] == "" and rows["w2"]["COMMIT"] == "" and rows["w2"]["SIZE"] == "5"
    # One object by name, by short name, and a resource without columns (NAME, AGE).
    assert table(kube.kubectl("get", "wdg", "w2").stdout)[0]["COLOR"] == "green"
    kube.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gadget", "metadata": {"name": "g1"}}))
    assert kube.kubectl("get", "gadgets").stdout.split()[:3] == ["NAME", "AGE", "g1"]


def test_kubectl_get_jsonpath_and_label_selector(kube, tmp_path):
    write_yaml(tmp_path / "w.yaml", widget("w1", labels={"tier": "a"}),
               widget("w2", labels={"tier": "b"}), widget("w3"))
    kube.kubectl("apply", "--validate=false", "-f", str(tmp_path / "w.yaml"))
    names = kube.kubectl("get", "widgets", "-o", "jsonpath={.items[*].metadata.name}").stdout
    assert names.split() == ["w1", "w2", "w3"]
    assert kube.kubectl("get", "widget", "w2", "-o", "jsonpath={.spec.color}").stdout == "blue"
    selected = kube.kubectl("get", "widgets", "-l", "tier in (a,b),tier!=b", "-o", "name").stdout
    assert selected.split() == ["widget.example.testlooper.dev/w1"]
    assert kube.kubectl("get", "widgets", "-l", "!tier", "-o", "name").stdout.split() == [
        "widget.example.testlooper.dev/w3"]


def test_kubectl_patch_keeps_spec_and_status_apart(kube, tmp_path):
    kube.kubectl("apply", "--validate=false", "-f", write_yaml(tmp_path / "w.yaml", widget("w1")))
    kube.kubectl("patch", "widget", "w1", "--type", "merge", "-p", '{"spec": {"size": 4}}')
    after_spec = kube.api("GET", f"{WIDGETS}/w1")
    assert after_spec["spec"]["size"] == 4 and after_spec["metadata"]["generation"] == 2

    kube.kubectl("patch", "widget", "w1", "--subresource", "status", "--type", "merge",
                 "-p", '{"status": {"phase": "Ready"}, "spec": {"size": 99}}')
    after_status = kube.api("GET", f"{WIDGETS}/w1")
    assert after_status["status"] == {"phase": "Ready"}
    assert after_status["spec"]["size"] == 4  # /status changes only the status
    assert after_status["metadata"]["generation"] == 2  # and does not bump the generation
    assert int(after_status["metadata"]["resourceVersion"]) > int(
        after_spec["metadata"]["resourceVersion"])

    # Through the main endpoint the status does not change.
    kube.kubectl("patch", "widget", "w1", "--type", "merge", "-p", '{"status": {"phase": "X"}}')
    assert kube.api("GET", f"{WIDGETS}/w1")["status"] == {"phase": "Ready"}


def test_kubectl_delete_waits_for_finalizers(kube, tmp_path):
    held = widget("held")
    held["metadata"]["finalizers"] = ["example.testlooper.dev/hold"]
    kube.kubectl("apply", "--validate=false", "-f",
                 write_yaml(tmp_path / "w.yaml", widget("free"), held))
    assert kube.kubectl("delete", "widget", "free").stdout.strip() == \
        'widget.example.testlooper.dev "free" deleted'
    assert "NotFound" in kube.kubectl("get", "widget", "free", check=False).stderr

    kube.kubectl("delete", "widget", "held", "--wait=false")
    marked = kube.api("GET", f"{WIDGETS}/held")
    assert marked["metadata"]["deletionTimestamp"]
    kube.kubectl("patch", "widget", "held", "--type", "json",
                 "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')
    assert kube.kubectl("get", "widgets", "-o", "name").stdout == ""


def test_kubectl_applies_core_objects_and_namespaces(kube, tmp_path):
    path = write_yaml(
        tmp_path / "core.yaml",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "git", "namespace": "team"},
         "stringData": {"token": "s3cret"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team"},
         "data": {"k": "v"}})
    output = kube.kubectl("apply", "--validate=false", "-f", path).stdout
    assert output.split("\n")[:3] == ["namespace/team created", "secret/git created",
                                      "configmap/c created"]
    assert kube.kubectl("get", "configmap", "c", "-n", "team", "-o",
                        "jsonpath={.data.k}").stdout == "v"
    assert "team" in kube.kubectl("get", "namespaces", "-o", "name").stdout
    dry = kube.kubectl("apply", "--validate=false", "--dry-run=server", "-f", "-", input=yaml.
                       safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "dry", "namespace": "team"}}))
    assert dry.stdout.strip() == "configmap/dry created (server dry run)"
    assert "NotFound" in kube.kubectl("get", "configmap", "dry", "-n", "team",
                                      check=False).stderr

    # Deleting a namespace deletes what it holds; it stays Terminating while a finalizer holds
    # one of its objects, and refuses new objects meanwhile.
    held = widget("held")
    held["metadata"].update(namespace="team", finalizers=["example.testlooper.dev/hold"])
    kube.api("POST", f"/apis/{GROUP}/{VERSION}/namespaces/team/widgets", held)
    kube.kubectl("delete", "namespace", "team", "--wait=false")
    assert kube.kubectl("get", "configmaps", "-n", "team", "-o", "name").stdout == ""
    assert kube.api("GET", "/api/v1/namespaces/team")["status"]["phase"] == "Terminating"
    late = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "late", "namespace": "team"}}
    refused = kube.kubectl("create", "--validate=false", "-f", "-", check=False,
                           input=yaml.safe_dump(late))
    assert "because it is being terminated" in refused.stderr
    kube.kubectl("patch", "widget", "held", "-n", "team", "--type", "merge",
                 "-p", '{"metadata": {"finalizers": null}}')
    assert "team" not in kube.kubectl("get", "namespaces", "-o", "name").stdout
    # kubectl's typed commands send protobuf, which the emulator says it cannot read.
    typed = kube.kubectl("create", "configmap", "typed", check=False)
    assert "reads JSON and YAML bodies only" in typed.stderr


def test_the_crd_schema_prunes_defaults_and_refuses(kube, tmp_path):
    unknown_field = widget("w1")
    del unknown_field["spec"]["size"]
    unknown_field["spec"]["colour"] = "typo"
    kube.kubectl("apply", "--validate=false", "-f", write_yaml(tmp_path / "w.yaml", unknown_field))
    stored = kube.api("GET", f"{WIDGETS}/w1")
    assert stored["spec"] == {"color": "blue", "size": 1}  # pruned, then defaulted

    negative = kube.kubectl("apply", "--validate=false", "-f", "-", check=False,
                            input=yaml.safe_dump(widget("w2", size=-1)))
    assert negative.returncode == 1
    assert negative.stderr.strip() == ('The Widget "w2" is invalid: spec.size: Invalid value: '
                                       '-1: -1 is less than the minimum of 0')
    bad_status = kube.kubectl("patch", "widget", "w1", "--subresource", "status", "--type",
                              "merge", "-p", '{"status": {"conditions": [{"type": "Ready", '
                                             '"status": "Yes"}, {"status": "True"}]}}',
                              check=False)
    assert "status.conditions[0].status: Invalid value: \"Yes\": 'Yes' is not one of" in \
        bad_status.stderr
    assert "status.conditions[1].type: Required value" in bad_status.stderr
    status, answer = kube._call("POST", f"{WIDGETS}?fieldValidation=Strict", unknown_field)
    assert (status, answer["message"]) == (400, 'strict decoding error: unknown field '
                                                 '"spec.colour"')


def test_garbage_collection_follows_owner_references(kube):
    parts = f"/apis/{GROUP}/{VERSION}/namespaces/default/parts"

    def part(name: str, *owners: dict) -> dict:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Part", "metadata": {
            "name": name, "ownerReferences": [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": owner["kind"],
                 "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                 "controller": index == 0, "blockOwnerDeletion": True}
                for index, owner in enumerate(owners)]}}

    def names() -> list[str]:
        return [item["metadata"]["name"] for item in kube.api("GET", parts)["items"]]

    first = kube.api("POST", WIDGETS, widget("first"))
    second = kube.api("POST", WIDGETS, widget("second"))
    kube.api("POST", parts, part("only-first", first))
    kube.api("POST", parts, part("both", first, second))
    kube.kubectl("delete", "widget", "first")
    assert names() == ["both"]  # one owner is left
    kube.kubectl("delete", "widget", "second")
    assert names() == []

    # An owner that does not exist (a wrong uid, or another namespace) owns nothing: the
    # collector deletes the dependent right after its creation.
    third = kube.api("POST", WIDGETS, widget("third"))
    wrong_uid = dict(third, metadata=dict(third["metadata"], uid="0000"))
    kube.api("POST", parts, part("wrong-uid", wrong_uid))
    kube.create_namespace("elsewhere")
    kube.api("POST", f"/apis/{GROUP}/{VERSION}/namespaces/elsewhere/parts",
             dict(part("across", third), metadata=dict(part("across", third)["metadata"],
                                                       namespace="elsewhere")))
    kube.api("POST", parts, part("right", third))
    assert names() == ["right"]
    assert kube.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/elsewhere/parts")["items"] == []

    # --cascade=orphan keeps the dependents and drops their reference to the owner.
    kube.kubectl("delete", "widget", "third", "--cascade=orphan")
    assert names() == ["right"]
    assert "ownerReferences" not in kube.api("GET", f"{parts}/right")["metadata"]


# ---------- the official client ----------

def test_client_create_list_replace_and_conflicts(api):
    custom, _ = api
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", "widgets", widget("w1", labels={"tier": "a"}))
    assert created["metadata"]["name"] == "w1" and created["metadata"]["resourceVersion"]
    for name, tier in (("w2", "b"), ("w3", None)):
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", "widgets",
            widget(name, labels={"tier": tier} if tier else {}))

    def names(**kwargs) -> list[str]:
        listing = custom.list_namespaced_custom_object(GROUP, VERSION, "default", "widgets",
                                                       **kwargs)
        assert listing["kind"] == "WidgetList" and listing["apiVersion"] == f"{GROUP}/{VERSION}"
        return [item["metadata"]["name"] for item in listing["items"]]

    assert names(label_selector="tier=a") == ["w1"]
    assert names(label_selector="tier!=a") == ["w2", "w3"]
    assert names(label_selector="tier in (a, b)") == ["w1", "w2"]
    assert names(label_selector="tier") == ["w1", "w2"]
    first = custom.list_namespaced_custom_object(GROUP, VERSION, "default", "widgets", limit=2)
    assert [i["metadata"]["name"] for i in first["items"]] == ["w1", "w2"]
    rest = names(limit=2, _continue=first["metadata"]["continue"])
    assert rest == ["w3"]

    with pytest.raises(kubernetes.client.ApiException) as exists:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", "widgets", widget("w1"))
    assert exists.value.status == 409
    assert json.loads(exists.value.body)["reason"] == "AlreadyExists"

    replacement = dict(created, spec={"color": "red", "size": 1})
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "widgets", "w1",
                                                       replacement)
    assert replaced["spec"] == {"color": "red", "size": 1}
    assert replaced["metadata"]["generation"] == 2
    with pytest.raises(kubernetes.client.ApiException) as stale:  # created's version is old now
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "widgets", "w1",
                                                replacement)
    assert stale.value.status == 409 and json.loads(stale.value.body)["reason"] == "Conflict"
    with pytest.raises(kubernetes.client.ApiException) as stale_patch:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", "widgets", "w1",
            {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
             "spec": {"size": 7}})
    assert stale_patch.value.status == 409


def test_client_errors_the_api_server_would_give(api, kube):
    custom, core = api
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", "widgets", widget("w1"))
    with pytest.raises(kubernetes.client.ApiException) as failed_test:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", "widgets", "w1",
            [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "replace", "path": "/spec/size", "value": 9}],
            _content_type="application/json-patch+json")
    assert failed_test.value.status == 422, failed_test.value.body
    with pytest.raises(kubernetes.client.ApiException) as no_namespace:
        custom.create_namespaced_custom_object(GROUP, VERSION, "nowhere", "widgets", widget("w"))
    assert no_namespace.value.status == 404
    assert json.loads(no_namespace.value.body)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(kubernetes.client.ApiException) as bad_label:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", "widgets",
            widget("w2", labels={"testlooper.dev/task": "network/linux"}))
    assert bad_label.value.status == 422 and "network/linux" in bad_label.value.body
    with pytest.raises(kubernetes.client.ApiException) as bad_name:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", "widgets",
                                               widget("Not_A_Name"))
    assert bad_name.value.status == 422
    with pytest.raises(kubernetes.client.ApiException) as bad_selector:
        custom.list_namespaced_custom_object(GROUP, VERSION, "default", "widgets",
                                             field_selector="spec.color=blue")
    assert bad_selector.value.status == 400
    status, answer = kube._call("POST", WIDGETS, {"metadata": {"name": "kindless"}})
    assert (status, answer["message"]) == (400, "Object 'Kind' is missing in the body")
    # Secrets, events and generated names, as kopf and the operator use them.
    core.create_namespaced_secret("default", {"metadata": {"name": "s"},
                                              "stringData": {"token": "t"}})
    assert core.read_namespaced_secret("s", "default").metadata.name == "s"
    event = core.create_namespaced_event("default", {
        "metadata": {"generateName": "w1-"}, "reason": "Seen", "message": "hello",
        "involvedObject": {"kind": "Widget", "name": "w1", "namespace": "default"}})
    assert event.metadata.name.startswith("w1-") and len(event.metadata.name) == 8
    listed = core.list_namespaced_event("default", field_selector="involvedObject.name=w1")
    assert [e.message for e in listed.items] == ["hello"]
    # An injected delay slows the next matching request only, and a fault fails it.
    kube.inject_fault("get", 0, delay=0.3, resource="secrets", client="python")
    started = time.monotonic()
    core.read_namespaced_secret("s", "default")
    assert time.monotonic() - started >= 0.3
    # An injected fault fails the next matching request only.
    kube.inject_fault("create", 500, group=GROUP, resource="widgets", client="python")
    with pytest.raises(kubernetes.client.ApiException) as injected:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", "widgets", widget("w3"))
    assert injected.value.status == 500
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", "widgets", widget("w3"))


def test_client_pods_leases_and_new_style_events(kube):
    client = kubernetes.config.new_client_from_config(config_file=kube.kubeconfig("python"))
    try:
        core = kubernetes.client.CoreV1Api(client)
        pod = core.create_namespaced_pod("default", {
            "metadata": {"name": "p1", "labels": {"testlooper.dev/kind": "test"}},
            "spec": {"containers": [{"name": "run", "image": "debian:12"}]},
            "status": {"phase": "Succeeded"}})
        assert pod.metadata.uid and pod.spec.containers[0].image == "debian:12"
        assert pod.status.phase == "Pending"  # the status sent on create is dropped
        # A test plays the kubelet through /status; the main endpoint leaves status alone.
        core.patch_namespaced_pod_status("p1", "default", {"status": {"phase": "Running"}})
        core.patch_namespaced_pod("p1", "default", {"status": {"phase": "Failed"}})
        assert core.read_namespaced_pod("p1", "default").status.phase == "Running"
        assert [p.metadata.name for p in core.list_namespaced_pod(
            "default", label_selector="testlooper.dev/kind=test").items] == ["p1"]

        leases = kubernetes.client.CoordinationV1Api(client)
        leases.create_namespaced_lease("default", {"metadata": {"name": "leader"},
                                                   "spec": {"holderIdentity": "a"}})
        assert leases.read_namespaced_lease("leader", "default").spec.holder_identity == "a"

        events = kubernetes.client.EventsV1Api(client)
        events.create_namespaced_event("default", {
            "metadata": {"name": "e1"}, "reason": "Seen", "note": "hello", "type": "Normal",
            "eventTime": "2026-01-01T00:00:00.000000Z", "action": "Seen",
            "reportingController": "tests", "reportingInstance": "tests-1",
            "regarding": {"kind": "Pod", "name": "p1", "namespace": "default"}})
        assert [e.note for e in events.list_namespaced_event(
            "default", field_selector="regarding.name=p1").items] == ["hello"]
    finally:
        client.close()
    assert {("", "pods/status", "patch"), ("coordination.k8s.io", "leases", "create"),
            ("events.k8s.io", "events", "list")} <= kube.permissions("python")


def test_watch_replays_from_a_resource_version(kube):
    first = kube.api("POST", WIDGETS, widget("w1"))
    since = first["metadata"]["resourceVersion"]
    kube.api("PATCH", f"{WIDGETS}/w1", {"spec": {"size": 8}},
             content_type="application/merge-patch+json")
    kube.api("DELETE", f"{WIDGETS}/w1")
    request = urllib.request.Request(f"{kube.url}{WIDGETS}?watch=true&resourceVersion={since}")
    with urllib.request.urlopen(request, timeout=10) as response:
        events = [json.loads(response.readline()) for _ in range(2)]
    assert [(e["type"], e["object"]["spec"]["size"]) for e in events] == [
        ("MODIFIED", 8), ("DELETED", 8)]


def test_reset_and_the_request_record(kube):
    kube.api("POST", WIDGETS, widget("w1"))
    kube.kubectl("get", "widgets")
    assert ("example.testlooper.dev", "widgets", "list") in kube.permissions("kubectl")
    assert kube.permissions("tests") == {("example.testlooper.dev", "widgets", "create")}
    assert [o["metadata"]["name"] for o in kube.all_objects() if o["kind"] == "Widget"] == ["w1"]
    kube.reset()
    assert kube.requests() == []
    assert kube.api("GET", WIDGETS)["items"] == []
    assert kube.api("GET", "/version")["gitVersion"].startswith("v1.32")


# ---------- kopf, as a real process ----------

@pytest.mark.parametrize("scope", [["--namespace", "team"], ["--all-namespaces"]],
                         ids=["namespaced", "cluster"])
def test_a_kopf_operator_runs_its_whole_lifecycle(kube, kube_process, tmp_path, scope):
    kube.create_namespace("team")
    operator = kube_process(["-m", "kopf", "run", "--standalone", *scope,
                             str(FIXTURES / "kopf_widget_operator.py")], "operator")
    operator.wait_until_watching(GROUP, "widgets")
    path = f"/apis/{GROUP}/{VERSION}/namespaces/team/widgets"
    kube.kubectl("apply", "--validate=false", "-n", "team", "-f",
                 write_yaml(tmp_path / "w.yaml", widget("w1", color="teal")))

    def status():
        return kube.api("GET", f"{path}/w1").get("status") or {}

    wait_until(lambda: status().get("phase") == "Seen", "the create handler", process=operator)
    wait_until(lambda: (status().get("ticks") or 0) >= 2, "two timer ticks", process=operator)
    assert table(kube.kubectl("get", "widgets", "-n", "team").stdout)[0]["READY"] == "True"
    stored = kube.api("GET", f"{path}/w1")
    assert "example.testlooper.dev/widget-operator" in stored["metadata"]["finalizers"]
    seen = kube.api("GET", "/api/v1/namespaces/team/configmaps/w1-seen")
    assert seen["data"] == {"color": "teal"}
    events = wait_until(lambda: kube.api("GET", "/api/v1/namespaces/team/events")["items"],
                        "the Event", process=operator)
    assert events[0]["message"] == "widget w1 is teal"

    # After every watch ends (as in an API server restart), kopf resumes and keeps handling.
    assert kube.close_watches() >= 1
    kube.api("POST", path, widget("w2"))
    wait_until(lambda: (kube.api("GET", f"{path}/w2").get("status") or {}).get("phase"),
               "handling after the watches were closed", process=operator)

    kube.kubectl("delete", "widget", "w1", "-n", "team", "--timeout=20s")
    assert kube.api("GET", "/api/v1/namespaces/team/configmaps/w1-gone")
    assert [item["metadata"]["name"] for item in kube.api("GET", path)["items"]] == ["w2"]
    operator.stop()

    used = kube.permissions("operator")
    widgets = {(GROUP, "widgets", verb) for verb in ("list", "watch", "patch")}
    assert widgets | {(GROUP, "widgets/status", "patch"), ("", "configmaps", "create"),
                      ("", "events", "create")} <= used
    assert not any(verb in ("create", "delete") and resource == "widgets"
                   for _, resource, verb in used)  # kubectl created and deleted, not kopf
    assert ("", "configmaps", "create") not in kube.permissions("kubectl")


# ---------- pure parts ----------

def test_rbac_helpers_compare_what_was_used_with_a_role():
    used = {("testlooper.dev", "repos", "watch"), ("testlooper.dev", "repos", "list"),
            ("", "events", "create")}
    rules = rbac_rules(used)
    assert rules == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
                     {"apiGroups": ["testlooper.dev"], "resources": ["repos"],
                      "verbs": ["list", "watch"]}]
    role = {"kind": "ClusterRole", "rules": [
        *rules, {"apiGroups": ["testlooper.dev"], "resources": ["repos/status"],
                 "verbs": ["patch"]}, {"nonResourceURLs": ["/healthz"], "verbs": ["get"]}]}
    assert rbac_permissions(role) - used == {("testlooper.dev", "repos/status", "patch")}
    with pytest.raises(ValueError):
        rbac_permissions({"rules": [{"apiGroups": ["*"], "resources": ["x"], "verbs": ["get"]}]})


def test_jsonpath_evaluator():
    obj = {"metadata": {"labels": {"testlooper.dev/short-commit": "abc"}},
           "status": {"conditions": [{"type": "A", "status": "False"},
                                     {"type": "Ready", "status": "True"}]},
           "spec": {"items": [1, 2, 3]}}
    assert compile_path('.status.conditions[?(@.type=="Ready")].status')(obj) == ["True"]
    assert compile_path(r".metadata.labels.testlooper\.dev/short-commit")(obj) == ["abc"]
    assert compile_path(".spec.items[-1]")(obj) == [3]
    assert compile_path(".spec.items[*]")(obj) == [1, 2, 3]
    assert compile_path("{.metadata.labels['testlooper.dev/short-commit']}")(obj) == ["abc"]
    assert compile_path(".status.missing.deeper")(obj) == []
    with pytest.raises(JsonPathError):
        compile_path("status.phase")
    with pytest.raises(JsonPathError):
        compile_path(".status.conditions[?(@.type=~/x/)]")


def test_kopf_priority_peering_leaves_the_lower_replica_standing_by(kube, kube_process):
    kube.create_namespace("team")
    kube.api("POST", "/apis/kopf.dev/v1/namespaces/team/kopfpeerings",
             {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "peers"}})
    replicas = {priority: kube_process(
        ["-m", "kopf", "run", "--peering", "peers", "--priority", str(priority), "--namespace",
         "team", str(FIXTURES / "kopf_widget_operator.py")], f"replica-{priority}")
        for priority in (10, 20)}

    def both_peers() -> dict | None:
        peers = kube.api("GET", "/apis/kopf.dev/v1/namespaces/team/kopfpeerings/peers").get(
            "status") or {}
        return peers if len(peers) == 2 else None

    peers = wait_until(both_peers, "both peers' records", process=replicas[20])
    assert sorted(peer["priority"] for peer in peers.values()) == [10, 20]
    time.sleep(0.5)  # for replica-10 to read replica-20's record from its watch and pause
    kube.api("POST", f"/apis/{GROUP}/{VERSION}/namespaces/team/widgets", widget("w1"))
    wait_until(lambda: (kube.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/team/widgets/w1")
                        .get("status") or {}).get("phase") == "Seen", "the create handler",
               process=replicas[20])
    for replica in replicas.values():
        replica.process.terminate()
    for replica in replicas.values():
        replica.stop()
    assert (GROUP, "widgets/status", "patch") in kube.permissions("replica-20")
    # The replica standing by may list and watch, but it never writes to a widget.
    assert not {(resource, verb) for _, resource, verb in kube.permissions("replica-10")} & {
        ("widgets", "patch"), ("widgets/status", "patch")}


def test_the_emulator_refuses_bad_crds_with_a_clear_message(tmp_path):
    from kube_fixtures import KubeEmulatorProcess
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "things", "kind": "Thing"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "additionalPrinterColumns": [
                                   {"name": "X", "type": "string", "jsonPath": "spec.x"}]}]}}))
    with pytest.raises(RuntimeError) as refused:
        KubeEmulatorProcess(crds=[str(bad)]).start()
    assert "CRD things.example.com: printer column: a jsonPath must start with '.'" in str(
        refused.value)
    with pytest.raises(RuntimeError) as empty:
        KubeEmulatorProcess(crds=[str(tmp_path / "nothing")]).start()
    assert "nothing" in str(empty.value)


def test_the_bare_bench_operator_creates_its_objects(kube, kube_process):
    """bench/bare_operator.py, the yardstick of the operator's benches, does its work."""
    kube.create_namespace("bench")
    operator = kube_process(["-m", "kopf", "run", "--standalone", "--namespace", "bench",
                             str(pathlib.Path(__file__).parent.parent / "bench" /
                                 "bare_operator.py")], "bare")
    operator.wait_until_watching(GROUP, "widgets")
    trigger = widget("trigger")
    trigger["metadata"]["annotations"] = {"bench.testlooper.dev/parts": "20"}
    trigger = kube.api("POST", f"/apis/{GROUP}/{VERSION}/namespaces/bench/widgets", trigger)
    reached = kube.api("GET", f"/_testing/wait?group={GROUP}&version={VERSION}"
                              f"&resource=parts&namespace=bench&count=20&timeout=15")
    assert reached == {"count": 20, "reached": True}, operator.log()
    parts = kube.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/bench/parts")["items"]
    assert len({part["spec"]["task"] for part in parts}) == 20
    owner = parts[0]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("Widget", trigger["metadata"]["uid"])
    assert parts[0]["metadata"]["labels"]["testlooper.dev/kind"] == "test"


def test_the_project_crds_print_their_columns(kube):
    """The real crds/ and examples/cluster/, through kubectl, as a user sees them."""
    root = pathlib.Path(__file__).parent.parent
    if not (root / "crds").is_dir():
        pytest.skip("crds/ is not generated yet")
    kube.kubectl("apply", "--validate=false", "-f", str(root / "examples" / "cluster"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    kube.api("POST", "/apis/testlooper.dev/v1alpha1/namespaces/default/testruns", {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "TestRun",
        "metadata": {"name": "demo-01234567-network-linux",
                     "labels": {"testlooper.dev/short-commit": commit[:12]}},
        "spec": {"repo": "demo", "commit": commit, "task": "network/linux", "kind": "test"}})
    kube.kubectl("patch", "testrun", "demo-01234567-network-linux", "--subresource", "status",
                 "--type", "merge", "-p", json.dumps({"status": {
                     "phase": "Succeeded", "result": "flaky", "runsSummary": "3/6",
                     "casesSummary": "118/120"}}))
    row = table(kube.kubectl("get", "testruns").stdout)[0]
    assert {key: row[key] for key in ("REPO", "COMMIT", "TASK", "PHASE", "RESULT", "RUNS",
                                      "CASES")} == {
        "REPO": "demo", "COMMIT": commit[:12], "TASK": "network/linux", "PHASE": "Succeeded",
        "RESULT": "flaky", "RUNS": "3/6", "CASES": "118/120"}
    repo_header = kube.kubectl("get", "tlrepo").stdout.splitlines()[0]
    assert repo_header.split() == ["NAME", "URL", "BRANCHES", "READY", "LAST", "POLL", "AGE"]
    pool_header = kube.kubectl("get", "tlpool").stdout.splitlines()[0]
    assert pool_header.split() == ["NAME", "PROVIDER", "WORKERS", "CORES", "QUEUED", "AGE"]
    # The schema's defaults are applied, as the API server would apply them.
    repo = kube.kubectl("get", "repos", "-o", "json").stdout
    assert json.loads(repo)["items"][0]["spec"]["retention"] == {"keepCommits": 50}
