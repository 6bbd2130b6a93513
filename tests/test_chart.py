"""charts/testlooper: lints, renders valid Kubernetes objects with the default values and each
values file in charts/testlooper/ci/, grants exactly the RBAC the operator was seen to use, runs
the operator with flags its argparse accepts, and refuses bad values with a clear message.
The install rehearsal (the render applied, the operator started from it) is
tests/test_chart_install.py.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chart_helpers import (CHART, RELEASE_NAMESPACE, ROOT, VALUES_FILES, load_values, of_kind,
                           operator_container, rbac_triples, render_chart, render_notes, rule_triples)
from crd_validation import admit

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extras (pyproject.toml)")

CASES = {"defaults": {}, **{path.name.removesuffix("-values.yaml"): load_values(path) for path in VALUES_FILES}}
OUR_CRDS = {(crd["spec"]["group"], crd["spec"]["names"]["kind"]): crd
            for path in sorted((ROOT / "crds").glob("*.yaml")) for crd in yaml.safe_load_all(path.read_text())}
# Kinds whose schema is neither Kubernetes' own nor ours: kubernetes-validate does not know them.
FOREIGN_KINDS = {("monitoring.coreos.com", "ServiceMonitor"): "the Prometheus Operator's CRD is not in this repository"}
KUBERNETES_VERSION = "1.30.0"


def test_the_values_files_of_the_issue_are_kept():
    assert {"namespaced", "cluster-wide", "s3", "ec2-s3"} <= set(CASES), sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_strict(case):
    report = helm_python.lint(str(CHART), CASES[case], strict=True, namespace=RELEASE_NAMESPACE)
    # As `helm lint --strict`: warnings fail as errors do; INFO ("icon is recommended": there is
    # no project icon to point at) does not.
    assert report["errors"] == [], report
    assert [message for message in report["messages"] if message["severity"] >= 2] == [], report


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_object_is_valid(case, tmp_path):
    documents = render_chart(CASES[case])
    builtin, skipped = [], []
    for document in documents:
        group = document["apiVersion"].rpartition("/")[0]
        if (group, document["kind"]) in OUR_CRDS:
            _, problems = admit(OUR_CRDS[group, document["kind"]], document)
            assert problems == [], f"{document['kind']} {document['metadata']['name']}: {problems}"
        elif (group, document["kind"]) in FOREIGN_KINDS:
            skipped.append(document["kind"])
        else:
            builtin.append(document)
    assert "Deployment" in {document["kind"] for document in builtin}
    assert set(skipped) <= {kind for _, kind in FOREIGN_KINDS}
    checked = kubernetes_validate(builtin, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def kubernetes_validate(documents: list[dict], directory: Path) -> subprocess.CompletedProcess:
    path = directory / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
                           "-k", KUBERNETES_VERSION, str(path)], check=False, capture_output=True, text=True, timeout=120)


def test_kubernetes_validate_refuses_a_misspelt_field(tmp_path):
    deployment = of_kind(render_chart(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    checked = kubernetes_validate([deployment], tmp_path)
    assert checked.returncode != 0 and "livenesProbe" in checked.stdout + checked.stderr


def test_chart_crds_are_the_top_level_crds():
    chart_crds = sorted(path.name for path in (CHART / "crds").glob("*.yaml"))
    top_level = sorted(path.name for path in (ROOT / "crds").glob("*.yaml"))
    assert chart_crds == top_level
    _, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", top_level, shallow=False)
    assert mismatch == errors == [], (
        f"charts/testlooper/crds/ differs from crds/ in {mismatch + errors}: refresh it with "
        "`cp crds/*.yaml charts/testlooper/crds/`")


def test_the_default_render_has_each_part():
    kinds = sorted({document["kind"] for document in render_chart()})
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy", "PersistentVolumeClaim",
                     "Service", "ServiceAccount", "StatefulSet", "WorkerPool"] + (
                        ["ConfigMap"] if (CHART / "dashboards" / "testlooper.json").exists() else []))


def test_the_operator_pod_is_locked_down():
    documents = render_chart()
    pod = of_kind(documents, "Deployment")[0]["spec"]["template"]["spec"]
    container = operator_container(documents)
    assert pod["automountServiceAccountToken"] is True  # the operator needs its token
    assert pod["enableServiceLinks"] is False  # its environment is the rendered env alone
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    writable = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert writable == {"/var/cache/testlooper", "/tmp"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "tl-testlooper-cache"
    redis = of_kind(documents, "StatefulSet")[0]["spec"]["template"]["spec"]
    assert redis["automountServiceAccountToken"] is False
    assert redis["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_cluster_wide_rbac_is_the_namespaced_set_with_cluster_peering():
    """The coverage set itself is checked against the operator's recorded calls in
    tests/test_operator_e2e.py, which renders this chart for its rules; here the two modes must
    grant the same, but for the peering resource."""
    namespaced = render_chart({"watchNamespaces": ["team-a", "team-b"]})
    cluster_wide = render_chart({"watchNamespaces": []})
    assert of_kind(cluster_wide, "Role") == []
    peering = lambda triples: {(g, "clusterkopfpeerings" if r == "kopfpeerings" else r, v) for g, r, v in triples}
    assert rbac_triples(cluster_wide) == peering(rbac_triples(namespaced))
    assert ("kopf.dev", "clusterkopfpeerings", "create") in rbac_triples(cluster_wide)
    # Watching namespaces: the ClusterRole holds only what is cluster-scoped; a Role in each.
    cluster_role, = of_kind(namespaced, "ClusterRole")
    assert {resource for _, resource, _ in rule_triples(cluster_role["rules"])} == {"customresourcedefinitions",
                                                                                    "namespaces"}
    roles = {role["metadata"]["namespace"]: role for role in of_kind(namespaced, "Role")}
    assert set(roles) == {"team-a", "team-b", RELEASE_NAMESPACE}
    assert rule_triples(roles["team-a"]["rules"]) == rule_triples(roles["team-b"]["rules"])
    assert rule_triples(roles[RELEASE_NAMESPACE]["rules"]) == {("", "secrets", "get"), ("", "secrets", "create")}
    watching_its_own = render_chart({"watchNamespaces": [RELEASE_NAMESPACE]})
    assert [role["metadata"]["name"] for role in of_kind(watching_its_own, "Role")] == ["tl-testlooper"]
    bindings = of_kind(namespaced, "RoleBinding") + of_kind(namespaced, "ClusterRoleBinding")
    assert len(bindings) == 4
    assert all(binding["subjects"] == [{"kind": "ServiceAccount", "name": "tl-testlooper",
                                        "namespace": RELEASE_NAMESPACE}] for binding in bindings)


def operator_env_names() -> set[str]:
    """The environment variables the operator reads: its flags' defaults, and boto3's."""
    source = (ROOT / "operator" / "testlooper" / "cli" / "operator_cmd.py").read_text()
    return set(re.findall(r'os\.environ\.get\("([A-Z0-9_]+)"', source)) | {
        "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def parse_operator_command(container: dict):
    """The container's command and args through the real `testlooper` argparse."""
    from testlooper.cli.main import build_parser

    assert container["command"][0] == "testlooper"
    try:
        return build_parser().parse_args(container["command"][1:] + container["args"])
    except SystemExit as exit:  # argparse reports an unknown or malformed flag this way
        pytest.fail(f"`testlooper operator` refuses the chart's args {container['args']}: exit {exit.code}")


def test_a_flag_the_operator_does_not_know_is_caught():
    container = operator_container(render_chart({"operator": {"extraArgs": ["--pending-timout", "9"]}}))
    with pytest.raises(pytest.fail.Exception, match="refuses the chart's args"):
        parse_operator_command(container)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_deployment_runs_flags_the_operator_accepts(case):
    from testlooper.cli.operator_cmd import phase_settings, s3_options

    container = operator_container(render_chart(CASES[case]))
    args = parse_operator_command(container)
    assert args.run.__module__ == "testlooper.cli.operator_cmd"
    phase_settings(args)
    s3_options(args.s3_bucket, args.s3_prefix)
    assert args.namespaces or args.all_namespaces
    env = {item["name"]: item for item in container["env"]}
    assert set(env) <= operator_env_names(), set(env) - operator_env_names()
    assert env["TESTLOOPER_STORE"].get("value", "redis://").startswith("redis://")
    values = CASES[case]
    assert args.namespaces == values.get("watchNamespaces", [])
    if values.get("s3"):
        assert (args.s3_bucket, args.s3_prefix) == (values["s3"]["bucket"], values["s3"]["prefix"])
    aws = values.get("aws", {})
    if aws.get("credentialsSecret"):
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": aws["credentialsSecret"], "key": key}
    else:  # IRSA or the node's role: no key in the environment
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env.get("AWS_DEFAULT_REGION", {}).get("value") == (aws.get("region") or None)
    assert env.get("AWS_ENDPOINT_URL_S3", {}).get("value") == (values.get("s3", {}).get("endpointUrl") or None)
    # The operator's own checks of the EC2 flags (cli/operator_cmd.py run()), on what it parsed.
    assert args.ec2_sweep_interval >= 1 and args.ec2_boot_timeout >= 0
    operator = values.get("operator", {})
    assert (args.ec2_sweep_interval, args.ec2_boot_timeout) == (operator.get("ec2SweepInterval", 60),
                                                                operator.get("ec2BootTimeout", 0))
    if values.get("ingress", {}).get("enabled"):
        scheme = "https" if values["ingress"].get("tls", {}).get("secretName") else "http"
        assert args.ec2_api_url == (operator.get("ec2ApiUrl") or f"{scheme}://{values['ingress']['host']}")
    else:
        assert args.ec2_api_url == operator.get("ec2ApiUrl", "")
    if not values.get("redis", {}).get("bundled", True):
        assert env["TESTLOOPER_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "testlooper-store", "key": "url"}
        assert of_kind(render_chart(values), "StatefulSet") == []


def test_cluster_wide_values_render_a_service_monitor_and_no_redis():
    documents = render_chart(CASES["cluster-wide"])
    monitor, = of_kind(documents, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert operator_container(documents)["args"][0] == "--all-namespaces"
    assert of_kind(documents, "WorkerPool") == []


def test_namespaced_values_expose_only_webhooks_and_the_worker_api():
    documents = render_chart(CASES["namespaced"])
    ingress, = of_kind(documents, "Ingress")
    paths = [(path["path"], path["pathType"]) for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    # /agent.py: what an EC2 worker's boot script downloads (docs/ec2.md), the open agent's source.
    assert paths == [("/webhooks/", "Prefix"), ("/githubReceivedAPush", "Prefix"), ("/runs/", "Prefix"),
                     ("/agent.py", "Exact")]
    assert {pool["metadata"]["namespace"] for pool in of_kind(documents, "WorkerPool")} == {"team-a", "team-b"}


EC2_SPEC = {"provider": "ec2", "platform": "windows", "maxWorkers": 2, "ec2": {
    "region": "eu-west-1", "vpcId": "vpc-0a1b2c3d", "subnetId": "subnet-0a1b2c3d", "securityGroupIds": ["sg-0a1b2c3d"],
    "instanceTypes": [{"type": "m5.xlarge", "cores": 4, "ramGb": 16}], "windowsAmi": "ami-0a1b2c3d"}}
EC2_URL = {"operator": {"ec2ApiUrl": "https://ci.example.com"}}


def ec2_pool_values(**ec2) -> dict:
    """Values with one extra EC2 WorkerPool, its spec.ec2 fields changed by `ec2`."""
    spec = {**EC2_SPEC, "ec2": {**EC2_SPEC["ec2"], **ec2}}
    return {**EC2_URL, "extraWorkerPools": [{"name": "windows-ec2", "spec": spec}]}


@pytest.mark.parametrize("values, message", [
    ({"watchNamespace": ["team-a"]}, "additional properties 'watchNamespace' not allowed"),
    ({"replicaCount": "2"}, "at '/replicaCount': got string, want integer"),
    ({"operator": {"logLevel": "LOUD"}}, "at '/operator/logLevel': value must be one of"),
    ({"image": {"repository": "x", "tga": "1"}}, "at '/image': additional properties 'tga' not allowed"),
    ({"s3": {"bucket": "Not_A_Bucket"}}, "at '/s3/bucket'"),
    ({"workerPool": {"spec": {"provider": "docker"}}}, "at '/workerPool/spec/provider': value must be one of"),
    ({"aws": {"accessKeyId": "AKIA..."}}, "at '/aws': additional properties 'accessKeyId' not allowed"),
    ({"s3": {"credentialsSecret": "x"}}, "at '/s3': additional properties 'credentialsSecret' not allowed"),
    ({"operator": {"ec2ApiUrl": "testlooper.example.com"}}, "at '/operator/ec2ApiUrl'"),
    ({"operator": {"ec2SweepInterval": 0}}, "at '/operator/ec2SweepInterval'"),
    (ec2_pool_values(subnetID="subnet-0a1b2c3d"), "at '/extraWorkerPools/0/spec/ec2': additional properties 'subnetID'"),
    (ec2_pool_values(region="US East"), "at '/extraWorkerPools/0/spec/ec2/region'"),
    (ec2_pool_values(instanceTypes=[{"type": "m5.xlarge", "cores": 4, "ram": 16}]),
     "at '/extraWorkerPools/0/spec/ec2/instanceTypes/0'"),
    ({"extraWorkerPools": [{"spec": {"provider": "kubernetes"}}]}, "at '/extraWorkerPools/0': missing property 'name'"),
])
def test_bad_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm_python.HelmValuesError) as failure:
        render_chart(values)
    assert message in str(failure.value)


@pytest.mark.parametrize("values, message", [
    ({"redis": {"bundled": False}}, "redis.external.existingSecret is required when redis.bundled is false"),
    ({"s3": {"prefix": "x/"}}, "s3.prefix needs s3.bucket"),
    ({"replicaCount": 2}, "replicaCount above 1 needs persistence.accessMode ReadWriteMany"),
    ({"extraWorkerPools": [{"name": "windows-ec2", "spec": EC2_SPEC}]},
     "a WorkerPool with provider ec2 needs operator.ec2ApiUrl or ingress.enabled: EC2 instances run outside the cluster"),
    ({"workerPool": {"spec": EC2_SPEC}}, "a WorkerPool with provider ec2 needs operator.ec2ApiUrl or ingress.enabled"),
    ({**ec2_pool_values(), "operator": {"ec2ApiUrl": "http://tl-testlooper.testlooper.svc:8080"}},
     "operator.ec2ApiUrl http://tl-testlooper.testlooper.svc:8080 is an address inside the cluster or the pod"),
    ({**ec2_pool_values(), "operator": {"ec2ApiUrl": "http://localhost:8080/"}}, "is an address inside the cluster"),
    ({**EC2_URL, "workerPool": {"spec": {"provider": "ec2", "platform": "linux"}}},
     "workerPool.spec.ec2 is required with provider ec2"),
    ({"extraWorkerPools": [{"name": "big", "spec": {"provider": "kubernetes", "ec2": EC2_SPEC["ec2"]}}]},
     "extraWorkerPools[0].spec.ec2 is only for provider ec2 (this pool's is kubernetes)"),
    ({"extraWorkerPools": [{"name": "linux", "spec": {"provider": "kubernetes"}}]},
     "extraWorkerPools[0].name linux: the chart already makes a WorkerPool of that name"),
    (ec2_pool_values(reuse=True, minLifetimeSeconds=3000), "extraWorkerPools[0].spec.ec2.reuse is not supported"),
    ({"operator": {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}]}},
     "operator.extraEnv AWS_SECRET_ACCESS_KEY: a secret written in values is readable by anyone who can read the Deployment"),
])
def test_inconsistent_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm_python.HelmError) as failure:
        render_chart(values)
    assert message in str(failure.value)


def test_the_dashboard_configmap_renders_with_and_without_the_dashboard(tmp_path):
    chart = tmp_path / "testlooper"
    shutil.copytree(CHART, chart)
    dashboard = chart / "dashboards" / "testlooper.json"
    dashboard.unlink(missing_ok=True)
    dashboard.parent.mkdir(exist_ok=True)  # absent from a checkout without the dashboard
    assert of_kind(render_chart(chart=chart), "ConfigMap") == []
    dashboard.write_text(json.dumps({"title": "TestLooper", "panels": [{"expr": "sum(x)"}]}))
    configmap, = of_kind(render_chart(chart=chart), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["testlooper.json"]) == json.loads(dashboard.read_text())
    assert of_kind(render_chart({"dashboard": {"enabled": False}}, chart=chart), "ConfigMap") == []


def test_notes_tell_how_to_apply_a_first_repo():
    notes = render_notes({"watchNamespaces": ["team-a"]})
    assert "kubectl -n team-a apply -f -" in notes and "kind: Repo" in notes and "workerPool: linux" in notes
    assert "get testruns" in notes


def test_the_rbac_reading_of_the_rehearsal_refuses_what_bindings_do_not_allow():
    """tests/test_chart_install.py checks each recorded call against the chart's bindings, in
    the namespace it was made in; this shows that check refusing what RBAC would refuse."""
    from chart_helpers import unauthorized

    documents = render_chart({"watchNamespaces": ["team-a"]})
    call = lambda verb, resource, namespace, group="": {"group": group, "resource": resource, "verb": verb,  # noqa: E731
                                                         "namespace": namespace}
    allowed = [call("list", "namespaces", None), call("create", "pods", "team-a"),
               call("patch", "repos/status", "team-a", "testlooper.dev"), call("get", "secrets", RELEASE_NAMESPACE),
               call("create", "kopfpeerings", "team-a", "kopf.dev")]
    assert unauthorized(allowed, documents, "tl-testlooper", RELEASE_NAMESPACE) == []
    refused = [call("create", "pods", "team-b"), call("list", "pods", None), call("delete", "secrets", RELEASE_NAMESPACE),
               call("create", "clusterkopfpeerings", None, "kopf.dev")]
    assert unauthorized(refused, documents, "tl-testlooper", RELEASE_NAMESPACE) == sorted([
        "create pods in team-b", "list pods in all namespaces", f"delete secrets in {RELEASE_NAMESPACE}",
        "create clusterkopfpeerings in all namespaces"])
    assert unauthorized(allowed[:1], documents, "someone-else", RELEASE_NAMESPACE) == ["list namespaces in all namespaces"]


# -- EC2 worker pools ----------------------------------------------------------------------------


def without_closed_objects(schema):
    """The schema with the `additionalProperties: false` the chart adds (the CRD prunes instead)."""
    if isinstance(schema, dict):
        return {key: without_closed_objects(value) for key, value in schema.items()
                if not (key == "additionalProperties" and value is False)}
    if isinstance(schema, list):
        return [without_closed_objects(item) for item in schema]
    return schema


def test_the_values_schema_mirrors_the_crds_ec2_schema():
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    pool_spec = values_schema["definitions"]["workerPoolSpec"]
    crd_spec = OUR_CRDS["testlooper.dev", "WorkerPool"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    assert without_closed_objects(pool_spec["properties"]["ec2"]) == crd_spec["properties"]["ec2"], (
        "values.schema.json's definitions.workerPoolSpec.properties.ec2 differs from the WorkerPool CRD's spec.ec2: "
        "copy it over, keeping additionalProperties false on ec2 and on instanceTypes' items")
    assert pool_spec["properties"]["ec2"]["additionalProperties"] is False
    assert pool_spec["properties"]["provider"]["enum"] == crd_spec["properties"]["provider"]["enum"]
    assert values_schema["properties"]["workerPool"]["properties"]["spec"] == {"$ref": "#/definitions/workerPoolSpec"}


@pytest.mark.parametrize("case", sorted(CASES) + ["ec2-default-pool"])
def test_every_rendered_workerpool_is_one_the_operator_accepts(case):
    from testlooper.kube.models import parse_workerpool_spec

    values = CASES.get(case) or {**EC2_URL, "workerPool": {"name": "windows", "spec": EC2_SPEC}}
    for pool in of_kind(render_chart(values), "WorkerPool"):
        _, problems = admit(OUR_CRDS["testlooper.dev", "WorkerPool"], pool)
        assert problems == [], f"{pool['metadata']['name']}: {problems}"
        parse_workerpool_spec(pool["spec"])


def test_the_ec2_values_file_renders_ec2_pools_beside_the_pod_pool_with_irsa():
    documents = render_chart(CASES["ec2-s3"])
    pools = {pool["metadata"]["name"]: pool for pool in of_kind(documents, "WorkerPool")}
    assert {name: pool["spec"]["provider"] for name, pool in pools.items()} == {
        "linux": "kubernetes", "windows-ec2": "ec2", "bigmem-ec2": "ec2"}
    assert {pool["metadata"]["namespace"] for pool in pools.values()} == {"ci"}
    assert pools["windows-ec2"]["spec"]["platform"] == "windows" and pools["windows-ec2"]["spec"]["ec2"]["windowsAmi"]
    container = operator_container(documents)
    assert "--ec2-api-url=https://testlooper.example.com" in container["args"]
    # IRSA: the role on the ServiceAccount, no key anywhere in the pod.
    account, = of_kind(documents, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert {item["name"] for item in container["env"]} == {"POD_NAMESPACE", "TESTLOOPER_STORE", "AWS_DEFAULT_REGION"}
    ingress, = of_kind(documents, "Ingress")
    assert {"/runs/", "/agent.py"} <= {path["path"] for path in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert ingress["spec"]["tls"][0]["hosts"] == ["testlooper.example.com"]
    notes = render_notes(CASES["ec2-s3"])
    assert "EC2 workers download the agent from https://testlooper.example.com/agent.py" in notes
    assert "plain HTTP" not in notes


def test_an_ec2_pool_behind_a_plain_http_ingress_is_warned_of():
    values = {"ingress": {"enabled": True, "host": "ci.internal"}, "workerPool": {"spec": EC2_SPEC}}
    assert "--ec2-api-url=http://ci.internal" in operator_container(render_chart(values))["args"]
    assert "That URL is plain HTTP: each run's token crosses the network unencrypted" in render_notes(values)
    assert "EC2 workers" not in render_notes({"ingress": {"enabled": True}})


def test_the_ec2_api_url_value_wins_over_the_ingress_and_goes_without_a_trailing_slash():
    values = {"ingress": {"enabled": True}, "operator": {"ec2ApiUrl": "https://lb.example.com:8443/"}}
    args = operator_container(render_chart(values))["args"]
    assert [arg for arg in args if arg.startswith("--ec2-api-url")] == ["--ec2-api-url=https://lb.example.com:8443"]
    # Neither set: no flag, the operator falls back on --api-url (right with no EC2 pool).
    assert not any(arg.startswith("--ec2-api-url") for arg in operator_container(render_chart())["args"])


def test_aws_keys_may_come_into_extra_env_from_a_secret_only():
    reference = {"secretKeyRef": {"name": "mine", "key": "secret"}}
    container = operator_container(render_chart({"operator": {"extraEnv": [
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": reference}, {"name": "AWS_MAX_ATTEMPTS", "value": "3"}]}}))
    assert {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": reference} in container["env"]


def test_the_chart_refuses_reuse_exactly_while_the_operator_does():
    """The chart's refusal of ec2.reuse copies models.parse_workerpool_spec's; when the operator
    learns reuse, this fails, saying to lift the chart's check (templates/workerpool.yaml) too."""
    from testlooper.kube.models import SpecError, parse_workerpool_spec

    spec = {**EC2_SPEC, "ec2": {**EC2_SPEC["ec2"], "reuse": True}}
    with pytest.raises(SpecError, match="reuse: is not supported"):
        parse_workerpool_spec(spec)
    with pytest.raises(helm_python.HelmError, match="reuse is not supported"):
        render_chart({**EC2_URL, "workerPool": {"spec": spec}})
