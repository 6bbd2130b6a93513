"""Artifacts in S3: a real `moto_server` process, real boto3, and the real agent uploading a
build's artifact through the operator and downloading it, as a consumer, by a presigned URL."""

from __future__ import annotations

import json
import os

import pytest

from test_workerapi_cluster import Api, redis_url, mirror, run_agent, log_text  # noqa: F401 - fixtures
from testlooper.workerapi.cluster import InputSource, S3ArtifactStore
from moto_server import start_moto_server
from worker_helpers import artifact, call_api, make_task, stage

@pytest.fixture
def s3(tmp_path, monkeypatch):
    process, port = start_moto_server()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    store = S3ArtifactStore("artifacts", prefix="tl/", spool_dir=str(tmp_path / "spool"))
    store._s3.create_bucket(Bucket="artifacts")
    yield store, process, port
    process.kill()
    process.wait()


@pytest.fixture
def api(tmp_path, redis_url, mirror, s3):  # noqa: F811
    served = Api(tmp_path, redis_url, mirror)
    served.artifacts = served.backend.artifacts = s3[0]
    yield served
    served.close()


def test_a_build_artifact_goes_to_s3_and_its_consumer_fetches_it_by_a_presigned_url(api, s3, tmp_path):
    store, _, port = s3
    build = make_task(kind="build", stages=[stage('mkdir -p "$TEST_BUILD_OUTPUT_DIR/out"; '
                                                  'echo from-s3 > "$TEST_BUILD_OUTPUT_DIR/out/x.txt"',
                                                  artifacts=[artifact("out", "out"),
                                                             artifact("files", "out", format="Files")])])
    build_run, build_token = api.add(1, task=build, testrun="build")
    run_agent(api, build_run, build_token, tmp_path / "w1")
    keys = sorted(item["Key"] for item in store._s3.list_objects_v2(Bucket="artifacts")["Contents"])
    assert keys == sorted([store.key(build_run, "files", "Files"), store.key(build_run, "out", "Tar")])
    assert keys[0].startswith("tl/") and keys[0].endswith("/files.tar")
    assert os.listdir(tmp_path / "spool") == []  # the spooled uploads are gone

    test = make_task("cat bin/x.txt files/x.txt")
    test_run, token = api.add(1, task=test, testrun="test", inputs={
        "bin": InputSource("build", run_id=build_run, artifact="out"),
        "files": InputSource("build", run_id=build_run, artifact="files")})
    status, body = call_api(api, "GET", f"/runs/{test_run}/assignment", token=token)
    inputs = json.loads(body)["inputs"]
    assert all(spec["url"].startswith(f"http://127.0.0.1:{port}/artifacts/tl/") and "Signature" in spec["url"]
               for spec in inputs.values())
    run_agent(api, test_run, token, tmp_path / "w2")
    text, _ = log_text(api, test_run)
    assert text.count("from-s3") >= 2 and "[testlooper] result: passed" in text


def test_an_upload_while_s3_is_down_is_refused_with_503_and_nothing_is_left_behind(api, s3, tmp_path):
    _, process, _ = s3
    run_id, token = api.add(1)
    process.kill()
    process.wait()
    status, body = call_api(api, "PUT", f"/runs/{run_id}/artifacts/out?format=Tar", token=token, body=b"x" * 1000)
    assert status == 503 and b"S3" in body
    assert os.listdir(tmp_path / "spool") == []


def test_a_missing_artifact_is_a_404_for_its_consumer(api, s3):
    run_id, token = api.add(1, inputs={"bin": InputSource("build", run_id="ns.none.1.1", artifact="out")})
    assert call_api(api, "GET", f"/runs/{run_id}/inputs/bin", token=token)[0] == 404
