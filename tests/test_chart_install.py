"""The install rehearsal: charts/testlooper rendered, applied to the Kubernetes emulator with the
real `kubectl apply -f`, then the operator started as a local process with the rendered
Deployment's own command, args and env (what a pod's kubelet would give it mapped to this
machine: the cache volume to a temp dir, the bundled Redis's address to a real redis-server, S3
to a real moto_server (and, for an IAM role on the ServiceAccount, what EKS injects, with
moto_server as AWS), the ServiceAccount to a kubeconfig for the emulator). It reconciles a
Repo applied after it, calling nothing the chart's RBAC does not allow.

What it cannot show: that the images start, that probes pass on a kubelet, that the NetworkPolicy
lets the operator reach Redis (tests/e2e/ does that on kind, in users' CI).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import urllib.request

import boto3
import pytest
import yaml

from chart_helpers import CHART, RELEASE_NAMESPACE, load_values, operator_container, render_chart, unauthorized
from cluster_helpers import NAMESPACE, list_testruns
from gitrepo import GitRepo
from operator_process import OPERATOR_DIR
from redis_server import RedisServer, free_port
from run_helpers import wait_for
from test_workerapi_s3 import s3  # noqa: F401 - a fixture, asked for by the s3 case

pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extras (pyproject.toml)")

DEMO = CHART.parent.parent / "examples" / "demo"
CACHE_DIR = "/var/cache/testlooper"  # the Deployment's volume mount
KUBELET_MAPPED = ("--api-host", "--api-port", "--api-url", "--cache-dir")


@pytest.fixture
def kubectl_present():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on the PATH (these machines have v1.32 in /usr/bin)")


def apply_render(kube, documents: list[dict], path) -> str:
    path.write_text(yaml.safe_dump_all(documents))
    return kube.kubectl("apply", "--validate=false", "-f", str(path)).stdout


def test_every_values_file_applies_to_the_emulator(kube, kubectl_present, tmp_path):
    """Every kind each render uses is served (the ServiceMonitor's CRD is a test fixture)."""
    kube.create_namespace(RELEASE_NAMESPACE)
    for name in ("team-a", "team-b", "ci"):
        kube.create_namespace(name)
    for values_file in sorted((CHART / "ci").glob("*-values.yaml")):
        documents = render_chart(load_values(values_file))
        output = apply_render(kube, documents, tmp_path / f"{values_file.stem}.yaml")
        assert output.count("\n") == len(documents), output


def local_command(container: dict, port: int, cache_dir) -> list[str]:
    """The container's command and args as this machine runs them: `testlooper` is this
    worktree's `python -m testlooper`; the server's address and the cache volume are local."""
    assert container["command"][0] == "testlooper"
    command = [sys.executable, "-m", "testlooper", *container["command"][1:]]
    for argument in container["args"]:
        flag, _, value = argument.partition("=")
        if flag in KUBELET_MAPPED:
            assert value, f"the chart passes {flag} without =: {container['args']}"
            value = {"--api-host": "127.0.0.1", "--api-port": str(port), "--api-url": f"http://127.0.0.1:{port}",
                     "--cache-dir": str(cache_dir)}[flag]
            if flag == "--cache-dir":
                assert argument == f"--cache-dir={CACHE_DIR}"
            argument = f"{flag}={value}"
        command.append(argument)
    return command


def local_env(kube, container: dict, local: dict[str, str]) -> dict[str, str]:
    """The container's env resolved as the kubelet would: fields of the pod, keys of Secrets
    read from the emulator; then the in-cluster addresses in `local` (name -> value) replaced
    by this machine's (the bundled Redis's Service by a redis-server, S3 by moto_server)."""
    # No AWS setting of this test process leaks in: the pod has the rendered ones, no ~/.aws.
    env = {name: value for name, value in kube.client_env("operator").items() if not name.startswith("AWS_")}
    env.update(PYTHONPATH=str(OPERATOR_DIR), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    for item in container["env"]:
        source = item.get("valueFrom")
        if source is None:
            value = item["value"]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            value = RELEASE_NAMESPACE
        else:
            reference = source["secretKeyRef"]
            secret = kube.api("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{reference['name']}")
            value = base64.b64decode(secret["data"][reference["key"]]).decode()
        if item["name"] == "TESTLOOPER_STORE" and "TESTLOOPER_STORE" in local:
            assert value == f"redis://tl-testlooper-redis.{RELEASE_NAMESPACE}.svc:6379/0"
        env[item["name"]] = local.get(item["name"], value)
    assert set(local) <= {item["name"] for item in container["env"]}, "a local address for nothing rendered"
    return env


def push_demo_commit(tmp_path):
    """The demo project pushed to a bare repository served over file://; returns its path."""
    work = GitRepo(tmp_path / "work")
    shutil.copytree(DEMO, work.path, dirs_exist_ok=True)
    bare = tmp_path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("remote", "add", "origin", str(bare))
    work.git("add", "--all")
    work.git("commit", "--quiet", "-m", "first")
    work.git("push", "--quiet", "origin", "main")
    return bare


def user_secret(kube, tmp_path, name: str, data: dict[str, str]) -> None:
    """A Secret the user creates before `helm install`, as the values file expects."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": RELEASE_NAMESPACE},
              "stringData": data}
    apply_render(kube, [secret], tmp_path / f"secret-{name}.yaml")


def irsa_env(documents: list[dict], tmp_path, aws_url: str) -> dict[str, str]:
    """What EKS's pod identity webhook adds to a pod whose ServiceAccount names an IAM role, and
    AWS itself (STS, S3, EC2) replaced by moto_server, which hands out keys for the role."""
    account, = [document for document in documents if document["kind"] == "ServiceAccount"]
    token = tmp_path / "eks-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dGVzdGxvb3BlciJ9.c2ln\n")
    return {"AWS_ROLE_ARN": account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ENDPOINT_URL": aws_url}


def dashboard_ec2_gauges_are_sampled(port: int) -> None:
    """The dashboard's EC2 gauges, which tests/test_dashboard.py (pod runs only) finds exposed but
    without a sample, have samples after this sweep, with every label their panels use."""
    from prometheus_client.parser import text_string_to_metric_families
    from test_dashboard import dashboard, expressions, metrics_and_labels

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    sampled: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sampled.setdefault(sample.name, set()).update(sample.labels)
    gauges = {"testlooper_ec2_instances", "testlooper_ec2_cost_per_hour"}
    checked = set()
    for expression in expressions(dashboard()):
        names, labels = metrics_and_labels(expression)
        for name in names & gauges:
            assert name in sampled, f"{name} has no sample after the sweep"
            assert labels <= sampled[name], f"{expression}: labels {sorted(labels - sampled[name])} on no series"
            checked.add(name)
    assert checked == gauges


@pytest.mark.parametrize("case", ["namespaced", "cluster-wide", "s3", "ec2-s3"])
def test_install_rehearsal(kube, kubectl_present, tmp_path, case, request):
    """namespaced: a Role in the watched namespace, the bundled Redis (its address mapped to a
    local redis-server); cluster-wide: --all-namespaces with a ClusterRole, the store's URL read
    from the Secret the user created before installing; s3: artifacts in a bucket of a real
    moto_server (its S3 endpoint mapped), with the keys from the user's Secret; ec2-s3: the EC2
    pools and flags taken, and S3 reached with no key at all, by the ServiceAccount's IAM role
    (IRSA's web identity, exchanged at moto_server's STS)."""
    kube.create_namespace(RELEASE_NAMESPACE)
    kube.create_namespace(NAMESPACE)
    values = load_values(CHART / "ci" / f"{case}-values.yaml")
    if values.get("watchNamespaces"):
        values["watchNamespaces"] = [NAMESPACE]
    pool = values.get("workerPool", {}).get("name", "linux")
    bare = push_demo_commit(tmp_path)

    with RedisServer() as redis:
        local = {}
        if case == "cluster-wide":
            user_secret(kube, tmp_path, "testlooper-store", {"url": redis.url})
        else:
            local["TESTLOOPER_STORE"] = redis.url
        aws_url = None
        if case in ("s3", "ec2-s3"):
            _, _, s3_port = request.getfixturevalue("s3")
            aws_url = f"http://127.0.0.1:{s3_port}"
            region = values["aws"]["region"]
            where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            boto3.client("s3", region_name=region, endpoint_url=aws_url).create_bucket(Bucket=values["s3"]["bucket"],
                                                                                   **where)
        if case == "ec2-s3":
            # An instance of the Windows pool already running (a previous operator's run, within
            # its launch grace): the sweep, with the role's keys, must list it in the pool's status.
            planted = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws_url).run_instances(
                ImageId="ami-12c6146b", InstanceType="t3.medium", MinCount=1, MaxCount=1,
                TagSpecifications=[{"ResourceType": "instance", "Tags": [
                    {"Key": "testlooper-worker", "Value": f"{NAMESPACE}/windows-ec2"},
                    {"Key": "testlooper:run", "Value": f"{NAMESPACE}.gone.1.1"}]}])["Instances"][0]["InstanceId"]
        if case == "s3":
            local["AWS_ENDPOINT_URL_S3"] = aws_url
            keys = {"AWS_ACCESS_KEY_ID": "chart-key-id", "AWS_SECRET_ACCESS_KEY": "chart-secret-key"}
            user_secret(kube, tmp_path, values["aws"]["credentialsSecret"], keys)
        # What `helm install` sends: the chart's crds/ first, then the templates.
        crds = kube.kubectl("apply", "--validate=false", "-f", str(CHART / "crds")).stdout
        assert crds.count("customresourcedefinition.apiextensions.k8s.io/") == 5, crds
        documents = render_chart(values)
        output = apply_render(kube, documents, tmp_path / "chart.yaml")
        assert "deployment.apps/tl-testlooper created" in output
        container = operator_container(documents)

        port = free_port()
        command = local_command(container, port, tmp_path / "cache")
        env = local_env(kube, container, local)
        if case == "ec2-s3":
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
            env.update(irsa_env(documents, tmp_path, aws_url))
        assert env["TESTLOOPER_STORE"] == redis.url
        if case == "s3":
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_DEFAULT_REGION"]) == ("chart-key-id", "eu-west-1")
        log_path = tmp_path / "operator.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                assert process.poll() is None, f"the operator exited:\n{log_path.read_text()}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                        return answer.status == 200
                except OSError:
                    return False
            wait_for(ready, timeout=30, what="the operator's /readyz")

            # A Repo applied after the operator started, naming the chart's WorkerPool.
            repo = {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo",
                    "metadata": {"name": "demo", "namespace": NAMESPACE},
                    "spec": {"url": f"file://{bare}", "branches": ["main"], "pollIntervalSeconds": 10,
                             "workerPool": pool}}
            apply_render(kube, [repo], tmp_path / "repo.yaml")
            created = wait_for(lambda: len(list_testruns(kube)) == 3 and list_testruns(kube), timeout=30,
                               what="the first commit's TestRuns")
            assert {item["spec"]["task"] for item in created} == {"calc/linux", "network/linux", "unit/linux"}
            assert all(item["spec"]["workerPool"] == pool for item in created)
            assert (tmp_path / "cache" / "mirrors").is_dir()
            # Peering where the chart's RBAC put it: a KopfPeering in the watched namespace, or a
            # ClusterKopfPeering with --all-namespaces.
            peerings = (f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings" if values.get("watchNamespaces")
                        else "/apis/kopf.dev/v1/clusterkopfpeerings")
            wait_for(lambda: kube.api("GET", peerings).get("items"), what="the peering object")
            if case == "namespaced":
                assert " DEBUG " in log_path.read_text()  # operator.logLevel of the values file
            if aws_url:
                assert (f"artifacts go to s3://ci-artifacts/testlooper/ (endpoint {aws_url})"
                        in log_path.read_text())
            if case == "ec2-s3":
                def swept(name):
                    status = kube.api("GET", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools/{name}"
                                      ).get("status") or {}
                    return status if "instances" in status else None
                windows = wait_for(lambda: swept("windows-ec2"), timeout=30, what="the Windows EC2 pool swept")
                assert [entry["instanceId"] for entry in windows["instances"]] == [planted]
                assert windows["costPerHour"] == 0.0416  # t3.medium's hourlyPrice in the values file
                assert wait_for(lambda: swept("bigmem-ec2"), timeout=30, what="the big-memory pool swept")[
                    "instances"] == []
                assert "not swept" not in log_path.read_text()
                dashboard_ec2_gauges_are_sampled(port)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
    # Every call it made, in the namespace it made it, is one the chart's bindings allow.
    assert unauthorized(kube.requests(client="operator"), documents, "tl-testlooper", RELEASE_NAMESPACE) == []
