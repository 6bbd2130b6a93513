"""The worker HTTP API (docs/design.md, "The worker protocol"), served in a background thread.

The local runner (and the tests) register each run with its assignment, get a fresh token for
it, start an agent with that token, and wait for its result:

    server = WorkerApiServer(artifact_root=DIR)
    server.start()
    token = server.register_run(run_id, assignment)
    ... start the agent with --api server.url and the token ...
    result = server.wait_result(run_id, timeout=600)

Logs land in ``artifact_root/<run>/log.txt`` and artifacts in ``artifact_root/<run>/artifacts/``.
Tokens are never logged. Standard library only, like the agent.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from testlooper.worker.agent import input_tar_filter

_log = logging.getLogger(__name__)

OUTCOMES = ("passed", "failed", "timeout", "error", "cancelled")
ARTIFACT_FORMATS = {"Tar": ".tar.gz", "Zip": ".zip", "Files": ""}

MAX_LOG_CHUNK_BYTES = 4 * 1024 * 1024
MAX_ARTIFACT_BYTES = 2 * 1024 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024  # a RESULT with 100,000 cases is ~10 MB
COPY_BLOCK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ArtifactRecord:
    name: str
    format: str
    size: int
    path: str  # a file for Tar and Zip, a directory for Files


@dataclass(frozen=True)
class RunStatus:
    """A snapshot of what the API knows about one run."""

    phase: str
    last_heartbeat: float | None  # time.time() of the last heartbeat
    cancel_requested: bool
    log_path: str
    log_size: int
    artifacts: dict
    result: dict | None
    storage_error: str = ""  # why the log or an artifact could not be stored (a full disk), if so


@dataclass
class _Run:
    run_id: str
    token: str
    assignment: dict  # as the agent receives it
    served_paths: dict  # "source" and "inputs/<key>" -> the local path streamed for it
    directory: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    result_ready: threading.Event = field(default_factory=threading.Event)
    phase: str = "registered"
    last_heartbeat: float | None = None
    cancel_requested: bool = False
    log_size: int = 0
    artifacts: dict = field(default_factory=dict)
    result: dict | None = None
    storage_error: str = ""

    @property
    def log_path(self):
        return os.path.join(self.directory, "log.txt")

    @property
    def artifact_directory(self):
        return os.path.join(self.directory, "artifacts")


class WorkerApiServer:
    """Serves the worker API for the runs registered with it, on ``host:port`` (0 picks a port).

    ``on_log(run_id, data)`` receives each new range of log bytes once, in order;
    ``on_result(run_id, result)`` the RESULT when it arrives. Both run on a request thread.
    """

    def __init__(self, *, artifact_root, host="127.0.0.1", port=0, on_log=None, on_result=None,
                 max_log_chunk_bytes=MAX_LOG_CHUNK_BYTES, max_artifact_bytes=MAX_ARTIFACT_BYTES):
        self.artifact_root = os.path.abspath(artifact_root)
        self.on_log = on_log
        self.on_result = on_result
        self.max_log_chunk_bytes = max_log_chunk_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self._runs = {}
        self._runs_lock = threading.Lock()
        self._http = ThreadingHTTPServer((host, port), _Handler)
        self._http.daemon_threads = True
        self._http.api = self
        self._thread = None

    @property
    def url(self):
        host, port = self._http.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self):
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="worker-api", daemon=True)
        self._thread.start()

    def stop(self):
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join()

    def register_run(self, run_id, assignment, *, inputs_by_url=False):
        """Registers a run and returns its fresh token.

        ``{"path": ...}`` sources and inputs are served at ``GET source`` / ``GET inputs/{key}``;
        with ``inputs_by_url`` the agent is told to fetch them from there rather than copy the
        path, which is what an agent on another machine has to do.
        """
        if not isinstance(assignment.get("task"), dict) or "source" not in assignment:
            raise ValueError("an assignment needs a task and a source")
        served_paths, handed_out = _served_assignment(assignment, inputs_by_url)
        handed_out["run_id"] = run_id
        run = _Run(run_id=run_id, token=secrets.token_urlsafe(32), assignment=handed_out,
                   served_paths=served_paths,
                   directory=os.path.join(self.artifact_root, safe_file_name(run_id)))
        with self._runs_lock:
            if run_id in self._runs:  # checked first: registering again must not wipe its log
                raise ValueError(f"run {run_id!r} is already registered")
            os.makedirs(run.artifact_directory, exist_ok=True)
            open(run.log_path, "wb").close()
            self._runs[run_id] = run
        return run.token

    def cancel(self, run_id):
        """Asks the run's agent to stop: its next heartbeat is answered ``{"cancel": true}``."""
        self._run(run_id).cancel_requested = True

    def wait_result(self, run_id, timeout=None):
        """The run's RESULT once posted, or None if ``timeout`` seconds pass first."""
        run = self._run(run_id)
        return run.result if run.result_ready.wait(timeout) else None

    def status(self, run_id):
        run = self._run(run_id)
        with run.lock:
            return RunStatus(phase=run.phase, last_heartbeat=run.last_heartbeat,
                             cancel_requested=run.cancel_requested, log_path=run.log_path,
                             log_size=run.log_size, artifacts=dict(run.artifacts), result=run.result,
                             storage_error=run.storage_error)

    def find_run(self, run_id):
        with self._runs_lock:
            return self._runs.get(run_id)

    def _run(self, run_id):
        run = self.find_run(run_id)
        if run is None:
            raise KeyError(f"unknown run {run_id!r}")
        return run


def _served_assignment(assignment, inputs_by_url):
    """Returns (paths the API streams, the assignment handed to the agent)."""
    handed_out = copy.deepcopy(assignment)
    served = {}
    entries = [("source", handed_out["source"])]
    entries += [(_input_route(key), spec) for key, spec in handed_out.get("inputs", {}).items()]
    for route, spec in entries:
        if "path" not in spec:
            continue
        served[route] = os.path.abspath(spec["path"])
        if inputs_by_url:
            del spec["path"]
            spec["url"] = route
    return served, handed_out


def _input_route(key):
    return "inputs/" + urllib.parse.quote(key, safe="")


def safe_file_name(name):
    """A file name for any string: percent-encoded, never empty, ``.`` or ``..``, and bounded in
    length (long names keep a prefix and a hash), so a run id or artifact name such as
    ``../../x`` or ``a/b`` names a file inside its directory and nowhere else."""
    encoded = urllib.parse.quote(name, safe="").replace("_", "%5F") or "_"
    if set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    if len(encoded) > 150:
        encoded = encoded[:100] + "~" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return encoded


def artifact_name_from_segment(segment):
    """Reverses the agent's ``artifact_url_segment``: ``_`` is the whole-output artifact ``""``."""
    return "" if segment == "_" else urllib.parse.unquote(segment)


class _HttpError(Exception):
    def __init__(self, status, message, **details):
        super().__init__(message)
        self.status = status
        self.details = details


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the agent sends hundreds of log chunks
    server_version = "TestLooperWorkerAPI"
    # Headers and body leave in two writes; with Nagle on, each answer would wait for the
    # client's delayed ACK (~40 ms), which made shipping 200 MB of log take 35 s instead of 3.
    disable_nagle_algorithm = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def log_message(self, format, *args):
        # Request lines only (never headers, so never a token), and only at debug level.
        _log.debug("%s - %s", self.address_string(), format % args)

    @property
    def api(self):
        return self.server.api

    def _dispatch(self, method):
        self._body_read = False
        try:
            run, action, argument, query = self._authorize()
            handler = _ROUTES.get((method, action))
            if handler is None:
                raise _HttpError(405 if any(key[1] == action for key in _ROUTES) else 404, "no such endpoint")
            handler(self, run, argument, query)
        except _HttpError as error:
            self._send_json(error.status, {"error": str(error), **error.details})

    def _authorize(self):
        """Parses ``/runs/{run_id}/{action}[/{argument}]`` and checks the bearer token."""
        target = urllib.parse.urlsplit(self.path)
        parts = target.path.split("/")
        if len(parts) < 4 or parts[0] != "" or parts[1] != "runs":
            raise _HttpError(404, "not found")
        run = self.api.find_run(urllib.parse.unquote(parts[2]))
        if run is None:
            raise _HttpError(404, "unknown run")
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), run.token.encode()):
            raise _HttpError(401, "a valid bearer token for this run is required")
        return run, parts[3], "/".join(parts[4:]), urllib.parse.parse_qs(target.query)

    # -- endpoints ------------------------------------------------------------------------------

    def _get_assignment(self, run, argument, query):
        self._send_json(200, run.assignment)

    def _get_source(self, run, argument, query):
        self._serve_path(run.served_paths.get("source"))

    def _get_input(self, run, argument, query):
        self._serve_path(run.served_paths.get(_input_route(urllib.parse.unquote(argument))))

    def _post_heartbeat(self, run, argument, query):
        beat = self._read_json(64 * 1024)
        with run.lock:
            run.last_heartbeat = time.time()
            run.phase = str(beat.get("phase", ""))
        self._send_json(200, {"cancel": run.cancel_requested})

    def _post_log(self, run, argument, query):
        offset = _single_int(query, "offset")
        data = self._read_body(self.api.max_log_chunk_bytes)
        with run.lock:
            if offset > run.log_size:
                raise _HttpError(409, f"offset {offset} leaves a gap: the log holds {run.log_size} bytes",
                                 size=run.log_size)
            try:
                self._write_log(run, offset, data)
            except OSError as error:  # a full disk: what was written before stays
                raise self._cannot_store(run, "the log", error) from None
        self._send_json(200, {"ok": True, "size": run.log_size})

    def _put_artifact(self, run, argument, query):
        name = artifact_name_from_segment(argument)
        archive_format = (query.get("format") or ["Tar"])[0]
        if archive_format not in ARTIFACT_FORMATS:
            raise _HttpError(400, f"unknown artifact format {archive_format!r}")
        length = self._content_length(self.api.max_artifact_bytes)
        try:
            record = self._store_artifact(run, name, archive_format, length)
        except OSError as error:
            raise self._cannot_store(run, f"artifact {name!r}" if name else "the output artifact", error) from None
        with run.lock:
            run.artifacts[name] = record
        self._send_json(200, {"ok": True})

    def _post_result(self, run, argument, query):
        result = self._read_json(MAX_JSON_BYTES)
        if result.get("result") not in OUTCOMES:
            raise _HttpError(400, f"\"result\" must be one of {', '.join(OUTCOMES)}")
        problem = _cases_problem(result.get("cases", []))
        if problem:
            raise _HttpError(400, problem)
        with run.lock:
            first = run.result is None
            if first:  # a retried post is the same result; the first one counts
                run.result = result
                run.phase = "finished"
        if first:
            run.result_ready.set()
            _call_back(self.api.on_result, run.run_id, result)
        self._send_json(200, {"ok": True})

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _cannot_store(run, what, error):
        """507 Insufficient Storage; the run remembers why, and its runner reports it."""
        reason = error.strerror or str(error)
        run.storage_error = run.storage_error or f"{reason} (storing {what})"
        return _HttpError(507, f"cannot store {what}: {reason}")

    def _write_log(self, run, offset, data):
        """Writes ``data`` at ``offset``: a resent chunk rewrites the same bytes, so it is harmless."""
        with open(run.log_path, "r+b") as log:
            log.seek(offset)
            log.write(data)
        previous_size, run.log_size = run.log_size, max(run.log_size, offset + len(data))
        new_bytes = data[previous_size - offset:]
        if new_bytes:
            _call_back(self.api.on_log, run.run_id, new_bytes)

    def _store_artifact(self, run, name, archive_format, length):
        """Streams the upload to disk (never to memory), then files it under its safe name."""
        final = os.path.join(run.artifact_directory, safe_file_name(name) + ARTIFACT_FORMATS[archive_format])
        handle, partial = tempfile.mkstemp(dir=run.artifact_directory, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                self._copy_body(out, length)
            if archive_format == "Files":
                _extract_files_artifact(partial, final)
            else:
                os.replace(partial, final)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return ArtifactRecord(name=name, format=archive_format, size=length, path=final)

    def _serve_path(self, path):
        if path is None or not os.path.exists(path):
            raise _HttpError(404, "nothing is served here for this run")
        if os.path.isdir(path):
            self._stream_tar(path)
        else:
            self._stream_file(path)

    def _stream_tar(self, directory):
        # The size is unknown until the end, so the body runs until the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with tarfile.open(fileobj=self.wfile, mode="w|") as tar:
            for entry in sorted(os.listdir(directory)):
                tar.add(os.path.join(directory, entry), arcname=entry)

    def _stream_file(self, path):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.end_headers()
        with open(path, "rb") as source:
            shutil.copyfileobj(source, self.wfile, COPY_BLOCK_BYTES)

    def _content_length(self, limit):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _HttpError(411, "send a Content-Length, not a chunked body")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _HttpError(411, "a Content-Length is required") from None
        if length < 0:
            raise _HttpError(400, "negative Content-Length")
        if length > limit:
            raise _HttpError(413, f"the body may hold at most {limit} bytes")
        return length

    def _read_body(self, limit):
        length = self._content_length(limit)
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            raise _HttpError(400, "the body ended early")
        return data

    def _copy_body(self, out, length):
        remaining = length
        while remaining:
            block = self.rfile.read(min(COPY_BLOCK_BYTES, remaining))
            if not block:
                raise _HttpError(400, "the body ended early")
            out.write(block)
            remaining -= len(block)
        self._body_read = True

    def _read_json(self, limit):
        try:
            document = json.loads(self._read_body(limit) or b"{}")
        except ValueError as error:
            raise _HttpError(400, f"the body is not JSON: {error}") from None
        if not isinstance(document, dict):
            raise _HttpError(400, "the body must be a JSON object")
        return document

    def _send_json(self, status, document):
        body = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if not self._body_read and self.headers.get("Content-Length", "0") != "0":
            # The request body was never read (refused early): the connection cannot carry on.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


_ROUTES = {
    ("GET", "assignment"): _Handler._get_assignment,
    ("GET", "source"): _Handler._get_source,
    ("GET", "inputs"): _Handler._get_input,
    ("POST", "heartbeat"): _Handler._post_heartbeat,
    ("POST", "log"): _Handler._post_log,
    ("PUT", "artifacts"): _Handler._put_artifact,
    ("POST", "result"): _Handler._post_result,
}


def _extract_files_artifact(archive, directory):
    """A ``Files`` artifact arrives as a tar and is kept as the directory it describes."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(directory, filter=input_tar_filter)  # the same rules as a consumer's unpacking
    except tarfile.TarError as error:
        shutil.rmtree(directory)
        raise _HttpError(400, f"the Files artifact is not a safe tar: {error}") from None


def _single_int(query, name):
    try:
        value = int(query[name][0])
    except (KeyError, ValueError):
        raise _HttpError(400, f"the query needs an integer {name}") from None
    if value < 0:
        raise _HttpError(400, f"{name} must not be negative")
    return value


def _call_back(callback, *arguments):
    if callback is None:
        return
    try:
        callback(*arguments)
    except Exception:  # noqa: BLE001 - a broken callback must not break the agent's request
        _log.exception("worker API callback %r failed", callback)


def _cases_problem(cases):
    """Why a RESULT's cases cannot be recorded, or "". The agent's parsers refuse such cases
    already; an agent of another version must not slip them in: a case named "" would take the
    place of the task's own result in the history."""
    if not isinstance(cases, list):
        return "\"cases\" must be a list"
    for index, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or not case["name"]:
            return f"case {index}: \"name\" must be a non-empty string"
        if not isinstance(case.get("success"), bool):
            return f"case {index} ({case['name']!r}): \"success\" must be true or false"
    return ""
