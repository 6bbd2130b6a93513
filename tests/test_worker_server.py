"""The worker API server, spoken to with raw HTTP requests."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading

import pytest

from testlooper.worker.server import WorkerApiServer, safe_file_name
from worker_helpers import api_server, call_api, call_api_json, make_assignment, make_task  # noqa: F401


@pytest.fixture
def source(tmp_path):
    directory = tmp_path / "checkout"
    (directory / "pkg").mkdir(parents=True)
    (directory / "pkg" / "module.py").write_text("print('hi')\n")
    (directory / "README").write_text("readme\n")
    return directory


@pytest.fixture
def registered(api_server, source):
    token = api_server.register_run("run-1", make_assignment(make_task("true"), source))
    return api_server, token


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- authentication ------------------------------------------------------------------------------


def test_each_run_gets_its_own_fresh_token(api_server, source):
    assignment = make_assignment(make_task("true"), source)
    tokens = {api_server.register_run(f"run-{index}", assignment) for index in range(3)}

    assert len(tokens) == 3 and all(len(token) >= 43 for token in tokens)
    with pytest.raises(ValueError, match="already registered"):
        api_server.register_run("run-0", assignment)


@pytest.mark.parametrize("path", ["assignment", "source", "inputs/src"])
def test_requests_without_the_right_token_get_nothing(registered, source, path):
    server, token = registered
    other_token = server.register_run("run-2", make_assignment(make_task("true"), source))

    for credentials in (None, "", "wrong", other_token, token + "x"):
        status, body = call_api(server, "GET", f"/runs/run-1/{path}", token=credentials)
        assert status == 401 and b"task" not in body and b"README" not in body
    status, _ = call_api(server, "GET", "/runs/run-1/assignment", headers={"Authorization": f"Basic {token}"})
    assert status == 401


def test_unknown_runs_and_paths_are_not_found(registered):
    server, token = registered

    assert call_api(server, "GET", "/runs/nobody/assignment", token=token)[0] == 404
    assert call_api(server, "GET", "/elsewhere", token=token)[0] == 404
    assert call_api(server, "GET", "/runs/run-1/nothing", token=token)[0] == 404
    assert call_api(server, "GET", "/runs/run-1/result", token=token)[0] == 405


def test_tokens_never_reach_the_log(registered, caplog):
    server, token = registered
    caplog.set_level(logging.DEBUG, logger="testlooper.workerapi")

    call_api(server, "GET", "/runs/run-1/assignment", token=token)
    call_api(server, "POST", "/runs/run-1/log?offset=0", token=token, body=b"x")
    call_api(server, "GET", "/runs/run-1/assignment", token=token[:-1])

    assert "/runs/run-1/assignment" in caplog.text
    assert token not in caplog.text and token[:-1] not in caplog.text


# -- assignment, source and inputs ---------------------------------------------------------------


def test_the_assignment_is_served_with_its_run_id(registered):
    server, token = registered

    status, assignment = call_api_json(server, "GET", "/runs/run-1/assignment", token=token)

    assert status == 200
    assert assignment["run_id"] == "run-1" and assignment["task"]["stages"][0]["command"] == "true"


def test_sources_and_inputs_are_served_as_tar_streams_or_files(api_server, source, tmp_path):
    packed = tmp_path / "build.tar.gz"
    packed.write_bytes(b"packed artifact bytes")
    inputs = {"src": {"kind": "source", "path": str(source)}, "odd key": {"kind": "build", "path": str(packed)}}
    token = api_server.register_run("run-1", make_assignment(make_task("true"), source, inputs=inputs),
                                    inputs_by_url=True)

    _, assignment = call_api_json(api_server, "GET", "/runs/run-1/assignment", token=token)
    status, body = call_api(api_server, "GET", "/runs/run-1/source", token=token)
    _, packed_body = call_api(api_server, "GET", "/runs/run-1/" + assignment["inputs"]["odd key"]["url"], token=token)

    assert assignment["source"] == {"url": "source"}
    assert assignment["inputs"]["odd key"] == {"kind": "build", "url": "inputs/odd%20key"}
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert sorted(tar.getnames()) == ["README", "pkg", "pkg/module.py"]
        assert tar.extractfile("pkg/module.py").read() == b"print('hi')\n"
    assert packed_body == b"packed artifact bytes"
    assert call_api(api_server, "GET", "/runs/run-1/inputs/missing", token=token)[0] == 404


# -- heartbeat, cancellation, result -------------------------------------------------------------


def test_heartbeats_are_recorded_and_carry_cancellation(registered):
    server, token = registered

    assert call_api_json(server, "POST", "/runs/run-1/heartbeat", token=token, document={"phase": "stage 1/2"}) \
        == (200, {"cancel": False})
    status = server.status("run-1")
    assert status.phase == "stage 1/2" and status.last_heartbeat is not None

    server.cancel("run-1")
    assert call_api_json(server, "POST", "/runs/run-1/heartbeat", token=token, document={})[1] == {"cancel": True}


def test_the_result_is_validated_kept_once_and_waited_for(tmp_path, source):
    received = []
    server = WorkerApiServer(artifact_root=tmp_path / "artifacts", on_result=lambda run, result: received.append(run))
    server.start()
    try:
        token = server.register_run("run-1", make_assignment(make_task("true"), source))
        assert server.wait_result("run-1", timeout=0.05) is None

        invalid = {"result": "great"}
        assert call_api_json(server, "POST", "/runs/run-1/result", token=token, document=invalid)[0] == 400
        assert call_api(server, "POST", "/runs/run-1/result", token=token, body=b"[1]")[0] == 400
        for cases in ([{"name": "", "success": False}], [{"name": "a", "success": "yes"}], {"a": True}):
            status, answer = call_api_json(server, "POST", "/runs/run-1/result", token=token,
                                           document={"result": "passed", "cases": cases})
            assert status == 400, (cases, answer)
        poster = threading.Timer(0.1, call_api_json, (server, "POST", "/runs/run-1/result"),
                                 {"token": token, "document": {"result": "passed", "cases": []}})
        poster.start()
        assert server.wait_result("run-1", timeout=5) == {"result": "passed", "cases": []}
        call_api_json(server, "POST", "/runs/run-1/result", token=token, document={"result": "failed"})
        assert server.wait_result("run-1", 0)["result"] == "passed"
        assert received == ["run-1"]
    finally:
        server.stop()


# -- logs ----------------------------------------------------------------------------------------


def test_log_chunks_land_by_offset_and_resends_are_harmless(tmp_path, source):
    shipped = []
    server = WorkerApiServer(artifact_root=tmp_path / "artifacts", on_log=lambda run, data: shipped.append(data))
    server.start()
    try:
        token = server.register_run("run-1", make_assignment(make_task("true"), source))
        for offset, data in ((0, b"hello "), (0, b"hello "), (6, b"world"), (3, b"lo wor")):
            assert call_api_json_bytes(server, f"/runs/run-1/log?offset={offset}", token, data)[0] == 200
        status, answer = call_api_json_bytes(server, "/runs/run-1/log?offset=100", token, b"gap")

        assert (status, answer["size"]) == (409, 11)  # the agent resumes from the size the server holds
        assert open(server.status("run-1").log_path, "rb").read() == b"hello world"
        assert server.status("run-1").log_size == 11
        assert shipped == [b"hello ", b"world"]  # every byte once, in order
        assert call_api(server, "POST", "/runs/run-1/log", token=token, body=b"x")[0] == 400
    finally:
        server.stop()


def call_api_json_bytes(server, path, token, data):
    status, body = call_api(server, "POST", path, token=token, body=data)
    return status, json.loads(body)


def test_oversized_log_chunks_are_refused(tmp_path, source):
    server = WorkerApiServer(artifact_root=tmp_path / "artifacts", max_log_chunk_bytes=1024)
    server.start()
    try:
        token = server.register_run("run-1", make_assignment(make_task("true"), source))

        assert call_api(server, "POST", "/runs/run-1/log?offset=0", token=token, body=b"x" * 2048)[0] == 413
        assert call_api(server, "POST", "/runs/run-1/log?offset=0", token=token, body=b"x" * 1024)[0] == 200
    finally:
        server.stop()


# -- artifacts -----------------------------------------------------------------------------------


def test_artifacts_are_stored_by_format_under_safe_names(registered):
    server, token = registered
    uploads = {"_": ("Tar", b"whole output"), "%2E%2E": ("Zip", b"dots"), "a%2Fb": ("Tar", b"slash"),
               "%5F": ("Tar", b"underscore"), "..%2F..%2Fx": ("Tar", b"escape")}

    for segment, (archive_format, data) in uploads.items():
        status, _ = call_api(server, "PUT", f"/runs/run-1/artifacts/{segment}?format={archive_format}",
                             token=token, body=data)
        assert status == 200

    stored = server.status("run-1").artifacts
    assert sorted(stored) == ["", "..", "../../x", "_", "a/b"]
    directory = os.path.join(os.path.dirname(server.status("run-1").log_path), "artifacts")
    assert sorted(os.listdir(directory)) == sorted(["_.tar.gz", "%2E%2E.zip", "a%2Fb.tar.gz", "%5F.tar.gz",
                                                    "..%2F..%2Fx.tar.gz"])
    assert open(stored[".."].path, "rb").read() == b"dots" and stored[".."].size == 4


def test_files_artifacts_become_directories_and_unsafe_ones_are_refused(registered):
    server, token = registered

    status, _ = call_api(server, "PUT", "/runs/run-1/artifacts/docs?format=Files", token=token,
                         body=tar_bytes({"guide/index.html": b"<h1>hi</h1>"}))
    refused, message = call_api(server, "PUT", "/runs/run-1/artifacts/evil?format=Files", token=token,
                                body=tar_bytes({"../../outside.txt": b"no"}))

    assert status == 200
    docs = server.status("run-1").artifacts["docs"]
    assert open(os.path.join(docs.path, "guide", "index.html"), "rb").read() == b"<h1>hi</h1>"
    assert refused == 400 and b"not a safe tar" in message
    assert "evil" not in server.status("run-1").artifacts
    assert not os.path.exists(os.path.join(os.path.dirname(docs.path), "..", "..", "outside.txt"))


def test_artifact_uploads_are_capped_and_need_a_known_format(tmp_path, source):
    server = WorkerApiServer(artifact_root=tmp_path / "artifacts", max_artifact_bytes=1000)
    server.start()
    try:
        token = server.register_run("run-1", make_assignment(make_task("true"), source))

        assert call_api(server, "PUT", "/runs/run-1/artifacts/big", token=token, body=b"x" * 1001)[0] == 413
        assert call_api(server, "PUT", "/runs/run-1/artifacts/x?format=Rar", token=token, body=b"x")[0] == 400
        assert server.status("run-1").artifacts == {}
        assert os.listdir(tmp_path / "artifacts" / "run-1" / "artifacts") == []  # no partial upload left
    finally:
        server.stop()


@pytest.mark.parametrize("name, expected", [
    ("", "_"), ("_", "%5F"), ("..", "%2E%2E"), (".", "%2E"), ("a/b", "a%2Fb"), ("ü", "%C3%BC"), ("x" * 200, None)])
def test_safe_file_names(name, expected):
    encoded = safe_file_name(name)

    assert "/" not in encoded and encoded not in ("", ".", "..") and len(encoded) <= 150
    if expected is not None:
        assert encoded == expected
