"""Artifacts in S3 with the real operator: `testlooper operator --s3-bucket --s3-prefix`, a real
`moto_server` (test_workerapi_s3's fixture, which points boto3's environment at it), the
emulator, redis-server, and the kubelet of test_operator_runs_e2e running the pods. The build's
artifact goes to the bucket (not the operator's volume) and its consumer's pod gets it from
there; a bucket that cannot be used is said at startup in one line."""

from __future__ import annotations

import subprocess
import sys

from operator_process import OPERATOR_DIR
from run_helpers import wait_for
from run_cluster import Kubelet, apply_repo, ended_testruns, push_project, redis_url, start_operator  # noqa: F401
from test_operator_runs_e2e import BUILD, CHECK, DEFINITIONS, POOL
from test_workerapi_s3 import s3  # noqa: F401 - a fixture
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name

BUCKET = "artifacts"  # the fixture's


def test_a_build_artifact_goes_to_s3_and_its_consumers_pods_get_it_from_there(kube, tmp_path, redis_url, s3):  # noqa: F811
    store, _, port = s3
    url, commit = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "build.sh": BUILD, "check.sh": CHECK})
    operator = start_operator(kube, tmp_path, redis_url, POOL, args=["--s3-bucket", BUCKET, "--s3-prefix", "ci"])
    with operator, Kubelet(kube, tmp_path / "node") as kubelet:
        apply_repo(kube, url)
        try:
            by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=90, interval=0.3, what="both TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        check = by_task["check/linux"]["status"]
        # The test's runs read the answer the build left in its artifact: 42, or their case fails.
        assert (check["phase"], check["result"], check["cases"]) == (
            "Succeeded", "passed", {"total": 4, "passed": 4, "failed": 0}), check
    build_run = pod_builder.run_id("team-a", testrun_name("demo", commit, "app/linux"), 1, 1)
    keys = [item["Key"] for item in store._s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert f"ci/{build_run}/_.tar.gz" in keys and all(key.startswith("ci/team-a.") for key in keys), keys
    # Nothing on the operator's volume, and an S3 store never streams an input through the
    # operator: the consumers fetched the build's artifact by its presigned URL.
    assert not (operator.cache_dir / "artifacts").exists()
    assert list((operator.cache_dir / "s3-spool").iterdir()) == []  # the spooled uploads are gone
    assert f"artifacts go to s3://{BUCKET}/ci/ (endpoint http://127.0.0.1:{port})" in operator.log()
    assert "Traceback" not in operator.log()


def test_a_bucket_that_cannot_be_used_is_said_at_startup_and_the_operator_stays_up(kube, tmp_path, redis_url, s3):  # noqa: F811
    _, _, port = s3
    operator = start_operator(kube, tmp_path, redis_url, POOL, args=["--s3-bucket", "no-such-bucket"])
    with operator:
        assert operator.get("/healthz")[0] == 200
        assert (f"artifact bucket s3://no-such-bucket/ cannot be used: there is no bucket no-such-bucket at "
                f"http://127.0.0.1:{port}; build artifacts cannot be stored until it can") in operator.log()
    assert "Traceback" not in operator.log()


def test_s3_flags_are_checked_before_anything_starts(tmp_path):
    for args, message in (
            (["--s3-prefix", "ci/"], "testlooper: error: --s3-prefix needs --s3-bucket\n"),
            (["--s3-bucket", "Not_A_Bucket"], "testlooper: error: --s3-bucket 'Not_A_Bucket' is not an S3 bucket "
                                              "name (3 to 63 lowercase letters, digits, dots and hyphens)\n")):
        done = subprocess.run([sys.executable, "-m", "testlooper", "operator", "-n", "team-a", "--cache-dir",
                               str(tmp_path / "cache"), *args], env={"PYTHONPATH": str(OPERATOR_DIR), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (2, message)


def test_the_bucket_check_says_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    from redis_server import free_port
    from testlooper.workerapi.cluster import S3ArtifactStore

    port = free_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    unreachable = S3ArtifactStore(BUCKET, spool_dir=str(tmp_path / "spool")).check()
    assert unreachable.startswith(f"http://127.0.0.1:{port} does not answer: Could not connect") and "\n" not in unreachable
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert S3ArtifactStore(BUCKET, spool_dir=str(tmp_path / "spool")).check() == (
        "no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or an instance role)")
