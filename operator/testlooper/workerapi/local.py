"""The local runner's worker API: the protocol (workerapi/protocol.py) over runs held in memory
and files on disk, served on loopback from a thread running its own event loop.

The local runner (and the tests) register each run with its assignment, get its token, start an
agent with that token, and wait for its result:

    server = WorkerApiServer(artifact_root=DIR)
    server.start()
    token = server.register_run(run_id, assignment)
    ... start the agent with --api server.url and the token ...
    result = server.wait_result(run_id, timeout=600)

Logs land in ``artifact_root/<run>/log.txt`` and artifacts in ``artifact_root/<run>/artifacts/``.
Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import os
import secrets
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from testlooper.worker.agent import input_tar_filter
from testlooper.workerapi import tokens
from testlooper.workerapi.contract import (
    ARTIFACT_FORMATS, MAX_ARTIFACT_BYTES, MAX_LOG_CHUNK_BYTES, ApiError, Backend, Limits, Served, input_route,
)

_log = logging.getLogger(__name__)


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


class LocalBackend(Backend):
    """Runs registered in memory, their logs and artifacts in files under ``artifact_root``.

    ``on_log(run_id, data)`` receives each new range of log bytes once, in order;
    ``on_result(run_id, result)`` the RESULT when it arrives. Both run on the server's loop
    thread, so they must be quick.
    """

    def __init__(self, artifact_root, *, on_log=None, on_result=None, secret=None):
        self.artifact_root = os.path.abspath(artifact_root)
        self.on_log = on_log
        self.on_result = on_result
        # Tokens are derived as the operator derives them; the secret lives as long as the server.
        self._secret = secret or secrets.token_bytes(32)
        self._runs = {}
        self._runs_lock = threading.Lock()

    # -- what the runner calls (any thread) --------------------------------------------------

    def register_run(self, run_id, assignment, *, inputs_by_url=False):
        if not isinstance(assignment.get("task"), dict) or "source" not in assignment:
            raise ValueError("an assignment needs a task and a source")
        served_paths, handed_out = _served_assignment(assignment, inputs_by_url)
        handed_out["run_id"] = run_id
        run = _Run(run_id=run_id, token=tokens.run_token(self._secret, run_id), assignment=handed_out,
                   served_paths=served_paths,
                   directory=os.path.join(self.artifact_root, safe_file_name(run_id)))
        with self._runs_lock:
            if run_id in self._runs:  # checked first: registering again must not wipe its log
                raise ValueError(f"run {run_id!r} is already registered")
            os.makedirs(run.artifact_directory, exist_ok=True)
            open(run.log_path, "wb").close()
            self._runs[run_id] = run
        return run.token

    def find_run(self, run_id):
        with self._runs_lock:
            return self._runs.get(run_id)

    def run(self, run_id):
        run = self.find_run(run_id)
        if run is None:
            raise KeyError(f"unknown run {run_id!r}")
        return run

    # -- the protocol (the loop thread) --------------------------------------------------------

    async def authorize(self, run_id, token):
        run = self.find_run(run_id)
        if run is None:
            raise ApiError(404, "unknown run")
        if not tokens.verify(self._secret, run_id, token):
            raise ApiError(401, "a valid bearer token for this run is required")
        return run

    async def assignment(self, run):
        return run.assignment

    async def served(self, run, route):
        path = run.served_paths.get(route)
        if path is None:
            return None
        return Served("directory" if os.path.isdir(path) else "file", path)

    async def heartbeat(self, run, phase):
        with run.lock:
            run.last_heartbeat = time.time()
            run.phase = phase
        return run.cancel_requested

    async def append_log(self, run, offset, data):
        with run.lock:
            if offset > run.log_size:
                raise ApiError(409, f"offset {offset} leaves a gap: the log holds {run.log_size} bytes",
                               size=run.log_size)
            try:
                new_bytes = self._write_log(run, offset, data)
            except OSError as error:  # a full disk: what was written before stays
                raise _cannot_store(run, "the log", error) from None
            size = run.log_size
        if new_bytes:
            _call_back(self.on_log, run.run_id, new_bytes)
        return size

    async def store_artifact(self, run, name, archive_format, body, length):
        what = f"artifact {name!r}" if name else "the output artifact"
        final = os.path.join(run.artifact_directory, safe_file_name(name) + ARTIFACT_FORMATS[archive_format])
        try:
            handle, partial = tempfile.mkstemp(dir=run.artifact_directory, prefix=".upload-")
        except OSError as error:
            raise _cannot_store(run, what, error) from None
        try:
            # Streamed to disk as it arrives, never held in memory.
            with os.fdopen(handle, "wb") as out:
                async for block in body:
                    out.write(block)
            if archive_format == "Files":
                await asyncio.get_running_loop().run_in_executor(None, _extract_files_artifact, partial, final)
            else:
                os.replace(partial, final)
        except OSError as error:
            raise _cannot_store(run, what, error) from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        with run.lock:
            run.artifacts[name] = ArtifactRecord(name=name, format=archive_format, size=length, path=final)

    async def record_result(self, run, result):
        with run.lock:
            first = run.result is None
            if first:  # a retried post is the same result; the first one counts
                run.result = result
                run.phase = "finished"
        if first:
            run.result_ready.set()
            _call_back(self.on_result, run.run_id, result)

    @staticmethod
    def _write_log(run, offset, data):
        """Writes ``data`` at ``offset``: a resent chunk rewrites the same bytes, so it is harmless."""
        with open(run.log_path, "r+b") as log:
            log.seek(offset)
            log.write(data)
        previous_size, run.log_size = run.log_size, max(run.log_size, offset + len(data))
        return data[previous_size - offset:]


class WorkerApiServer:
    """The worker API for the runs registered with it, on ``host:port`` (0 picks a port).

    The protocol runs on an event loop of its own in a background thread, so the runner's
    threads call ``register_run``, ``wait_result`` and ``status`` as plain functions.
    """

    def __init__(self, *, artifact_root, host="127.0.0.1", port=0, on_log=None, on_result=None,
                 max_log_chunk_bytes=MAX_LOG_CHUNK_BYTES, max_artifact_bytes=MAX_ARTIFACT_BYTES, secret=None):
        """``secret`` (bytes) derives the tokens; a server started again with the same one, on the
        same port, takes the same agents back. By default a fresh one."""
        self.backend = LocalBackend(artifact_root, on_log=on_log, on_result=on_result, secret=secret)
        self.artifact_root = self.backend.artifact_root
        limits = Limits(max_log_chunk_bytes=max_log_chunk_bytes, max_artifact_bytes=max_artifact_bytes)

        def make_app():
            from testlooper.workerapi.protocol import build_root_app  # aiohttp: loaded in the server's thread

            return build_root_app(self.backend, limits)

        self._site = ThreadedSite(make_app, host, port)

    @property
    def url(self):
        return self._site.url

    def start(self, wait=True):
        """Listens at once; with ``wait=False`` it returns before the server's thread has loaded
        aiohttp (~0.13 s): agents may connect already, their requests wait in the backlog."""
        self._site.start(wait=wait)

    def stop(self):
        self._site.stop()

    def register_run(self, run_id, assignment, *, inputs_by_url=False):
        """Registers a run and returns its token.

        ``{"path": ...}`` sources and inputs are served at ``GET source`` / ``GET inputs/{key}``;
        with ``inputs_by_url`` the agent is told to fetch them from there rather than copy the
        path, which is what an agent on another machine has to do.
        """
        return self.backend.register_run(run_id, assignment, inputs_by_url=inputs_by_url)

    def cancel(self, run_id):
        """Asks the run's agent to stop: its next heartbeat is answered ``{"cancel": true}``."""
        self.backend.run(run_id).cancel_requested = True

    def wait_result(self, run_id, timeout=None):
        """The run's RESULT once posted, or None if ``timeout`` seconds pass first."""
        run = self.backend.run(run_id)
        return run.result if run.result_ready.wait(timeout) else None

    def status(self, run_id):
        run = self.backend.run(run_id)
        with run.lock:
            return RunStatus(phase=run.phase, last_heartbeat=run.last_heartbeat,
                             cancel_requested=run.cancel_requested, log_path=run.log_path,
                             log_size=run.log_size, artifacts=dict(run.artifacts), result=run.result,
                             storage_error=run.storage_error)

    def find_run(self, run_id):
        return self.backend.find_run(run_id)


class ThreadedSite:
    """Serves an aiohttp application from a thread running its own event loop, on a socket that
    listens from ``start()`` on (so its URL is known, and connections queue, before the thread
    has even imported aiohttp)."""

    def __init__(self, make_app, host="127.0.0.1", port=0):
        self._make_app = make_app
        self._host, self._port = host, port
        self._loop = None
        self._runner = None
        self._thread = None
        self._socket = None
        self._started = threading.Event()
        self._failure = []

    @property
    def url(self):
        host, port = self._socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self, wait=True):
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((self._host, self._port))
            self._socket.listen(512)
        except OSError:
            self._socket.close()
            raise
        self._started.clear()
        self._failure.clear()
        self._thread = threading.Thread(target=self._serve, name="worker-api", daemon=True)
        self._thread.start()
        if wait:
            self._wait_started()

    def _wait_started(self):
        self._started.wait()
        if self._failure:
            self._thread.join()
            self._thread = None
            raise self._failure[0]

    def _serve(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._start_site())
        except BaseException as error:  # noqa: BLE001 - handed to the thread that waits for the start
            _log.error("the worker API cannot start: %s", error)
            self._failure.append(error)
            self._socket.close()
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start_site(self):
        from aiohttp import web

        # No access log: request lines are logged by the protocol at debug level, headers never.
        self._runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    def stop(self):
        if self._thread is None:
            return
        self._wait_started()
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None


def _served_assignment(assignment, inputs_by_url):
    """Returns (paths the API streams, the assignment handed to the agent)."""
    handed_out = copy.deepcopy(assignment)
    served = {}
    entries = [("source", handed_out["source"])]
    entries += [(input_route(key), spec) for key, spec in handed_out.get("inputs", {}).items()]
    for route, spec in entries:
        if "path" not in spec:
            continue
        served[route] = os.path.abspath(spec["path"])
        if inputs_by_url:
            del spec["path"]
            spec["url"] = route
    return served, handed_out


def safe_file_name(name):
    """A file name for any string: percent-encoded, never empty, ``.`` or ``..``, and bounded in
    length (long names keep a prefix and a hash), so a run id or artifact name such as
    ``../../x`` or ``a/b`` names a file inside its directory and nowhere else."""
    encoded = urllib.parse.quote(name, safe="").replace("_", "%5F") or "_"
    if set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    if len(encoded) > 150:
        encoded = encoded[:100] + "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return encoded


def _cannot_store(run, what, error):
    """507 Insufficient Storage; the run remembers why, and its runner reports it."""
    reason = error.strerror or str(error)
    run.storage_error = run.storage_error or f"{reason} (storing {what})"
    return ApiError(507, f"cannot store {what}: {reason}")


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
        raise ApiError(400, f"the Files artifact is not a safe tar: {error}") from None


def _call_back(callback, *arguments):
    if callback is None:
        return
    try:
        callback(*arguments)
    except Exception:  # noqa: BLE001 - a broken callback must not break the agent's request
        _log.exception("worker API callback %r failed", callback)
