"""The worker protocol (docs/design.md, "The worker protocol"), once, as an aiohttp application.

Everything the protocol says is decided here: the routes, the bearer token, the body limits, what
a valid log chunk, artifact and RESULT are, and the error answers. Where things are kept is a
`Backend`'s business: the local runner's keeps them on disk in memory-held runs
(workerapi/local.py), the operator's in Redis, a git mirror and an artifact store
(workerapi/cluster.py). The operator mounts the application under ``/runs`` of its own server;
the local runner serves it from a thread with its own event loop (workerapi/local.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tarfile
import urllib.parse

from aiohttp import web

from testlooper.workerapi.contract import (  # noqa: F401 - the protocol's names, importable from here too
    ARTIFACT_FORMATS, COPY_BLOCK_BYTES, MAX_ARTIFACT_BYTES, MAX_CASE_NAME_CHARS, MAX_JSON_BYTES,
    MAX_LOG_CHUNK_BYTES, OUTCOMES, PIPE_BUFFER_BYTES, ApiError, Backend, Limits, Served,
    artifact_name_from_segment, input_route, result_problem,
)

_log = logging.getLogger(__name__)

BACKEND_KEY = web.AppKey("worker_backend", object)
LIMITS_KEY = web.AppKey("worker_limits", object)
PREFIX = "/runs"  # where the protocol is mounted: the agent calls {api}/runs/{run_id}/...
AGENT_PATH = "/agent.py"  # the agent itself, public: what an EC2 worker's user-data downloads
AGENT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker", "agent.py")


def build_worker_app(backend: Backend, limits: Limits = Limits()) -> web.Application:
    """The protocol's application, to mount at PREFIX of a server (``mount_worker_api``)."""
    app = web.Application(client_max_size=limits.max_result_bytes)
    app[BACKEND_KEY] = backend
    app[LIMITS_KEY] = limits
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def mount_worker_api(app: web.Application, backend: Backend, limits: Limits = Limits()) -> None:
    """Serves the protocol at ``/runs/...`` of ``app`` (the operator's one server, or the local one),
    and the agent at ``/agent.py``."""
    app.add_subapp(PREFIX, build_worker_app(backend, limits))
    app.router.add_get(AGENT_PATH, _get_agent)


async def _get_agent(request: web.Request) -> web.StreamResponse:
    """The agent's source, without a token: it is the project's public code and holds no secret,
    and the machine fetching it has only its run's token, kept for that run's own calls."""
    return web.FileResponse(AGENT_FILE, headers={"Content-Type": "text/x-python; charset=utf-8",
                                                 "Cache-Control": "no-cache"})


def build_root_app(backend: Backend, limits: Limits = Limits()) -> web.Application:
    """An application serving the protocol alone, at ``/runs/...``."""
    root = web.Application()
    mount_worker_api(root, backend, limits)
    return root


async def _dispatch(request: web.Request) -> web.StreamResponse:
    # The request line only, never a header (so never a token), and only at debug level.
    _log.debug("%s %s", request.method, request.rel_url.path)
    try:
        run, action, argument = await _authorize(request)
        handler = _ROUTES.get((request.method, action))
        if handler is None:
            known = any(key[1] == action for key in _ROUTES)
            raise ApiError(405 if known else 404, "no such endpoint")
        return await handler(request, run, argument)
    except ApiError as error:
        return _error_answer(request, error)


async def _authorize(request: web.Request):
    """Parses ``{run_id}/{action}[/{argument}]`` and asks the backend whether the token opens it."""
    # The raw path: a percent-encoded "/" in a run id or an artifact name is not a separator.
    raw = request.rel_url.raw_path
    parts = raw[len(PREFIX) + 1:].split("/") if raw.startswith(PREFIX + "/") else []
    if len(parts) < 2 or not parts[0]:
        raise ApiError(404, "not found")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    run = await request.app[BACKEND_KEY].authorize(urllib.parse.unquote(parts[0]),
                                                   token if scheme.lower() == "bearer" else "")
    return run, parts[1], "/".join(parts[2:])


# -- endpoints ----------------------------------------------------------------------------------


async def _get_assignment(request, run, argument):
    return web.json_response(await request.app[BACKEND_KEY].assignment(run))


async def _get_source(request, run, argument):
    return await _serve(request, await request.app[BACKEND_KEY].served(run, "source"))


async def _get_input(request, run, argument):
    route = input_route(urllib.parse.unquote(argument))
    return await _serve(request, await request.app[BACKEND_KEY].served(run, route))


async def _post_heartbeat(request, run, argument):
    beat = await _read_json(request, 64 * 1024)
    cancel = await request.app[BACKEND_KEY].heartbeat(run, str(beat.get("phase", "")))
    return web.json_response({"cancel": bool(cancel)})


async def _post_log(request, run, argument):
    offset = _single_int(request.query, "offset")
    data = await _read_body(request, request.app[LIMITS_KEY].max_log_chunk_bytes)
    size = await request.app[BACKEND_KEY].append_log(run, offset, data)
    return web.json_response({"ok": True, "size": size})


async def _put_artifact(request, run, argument):
    name = artifact_name_from_segment(argument)
    archive_format = request.query.get("format", "Tar")
    if archive_format not in ARTIFACT_FORMATS:
        raise ApiError(400, f"unknown artifact format {archive_format!r}")
    length = _content_length(request, request.app[LIMITS_KEY].max_artifact_bytes)
    await request.app[BACKEND_KEY].store_artifact(run, name, archive_format, _body_blocks(request, length), length)
    return web.json_response({"ok": True})


async def _post_result(request, run, argument):
    result = await _read_json(request, request.app[LIMITS_KEY].max_result_bytes)
    problem = result_problem(result)
    if problem:
        raise ApiError(400, problem)
    await request.app[BACKEND_KEY].record_result(run, result)
    return web.json_response({"ok": True})


_ROUTES = {
    ("GET", "assignment"): _get_assignment,
    ("GET", "source"): _get_source,
    ("GET", "inputs"): _get_input,
    ("POST", "heartbeat"): _post_heartbeat,
    ("POST", "log"): _post_log,
    ("PUT", "artifacts"): _put_artifact,
    ("POST", "result"): _post_result,
}


# -- validation ---------------------------------------------------------------------------------


def _single_int(query, name):
    try:
        value = int(query[name])
    except (KeyError, ValueError):
        raise ApiError(400, f"the query needs an integer {name}") from None
    if value < 0:
        raise ApiError(400, f"{name} must not be negative")
    return value


# -- bodies -------------------------------------------------------------------------------------


def _content_length(request, limit):
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        raise ApiError(411, "send a Content-Length, not a chunked body")
    length = request.content_length
    if length is None:
        raise ApiError(411, "a Content-Length is required")
    if length > limit:
        raise ApiError(413, f"the body may hold at most {limit} bytes")
    return length


async def _read_body(request, limit):
    length = _content_length(request, limit)
    if length == 0:  # aiohttp's empty body refuses even readexactly(0)
        return b""
    try:
        return await request.content.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        # ConnectionError: the worker went mid-body (its machine terminated, its node lost).
        # Its end, not ours: answered like a short body, never a traceback in the log.
        raise ApiError(400, "the body ended early") from None


async def _body_blocks(request, length):
    remaining = length
    while remaining:
        try:
            block = await request.content.read(min(COPY_BLOCK_BYTES, remaining))
        except ConnectionError:  # the worker went mid-upload
            block = b""
        if not block:
            raise ApiError(400, "the body ended early")
        remaining -= len(block)
        yield block


async def _read_json(request, limit):
    body = await _read_body(request, limit)
    try:
        document = json.loads(body or b"{}")
    except ValueError as error:
        raise ApiError(400, f"the body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object")
    return document


def _error_answer(request, error: ApiError) -> web.Response:
    response = web.json_response({"error": str(error), **error.details}, status=error.status)
    if not request.content.at_eof() and request.content_length:
        # The body was refused unread: close rather than read gigabytes to keep the connection.
        response.force_close()
    return response


# -- streaming what a run fetches ---------------------------------------------------------------


async def _serve(request, served: Served | None) -> web.StreamResponse:
    if served is None:
        raise ApiError(404, "nothing is served here for this run")
    if served.kind == "git":
        return await stream_git_archive(request, served.path, served.commit, served.tee)
    if served.kind == "directory" and os.path.isdir(served.path):
        return await _stream_directory(request, served.path)
    if served.kind == "file" and os.path.isfile(served.path):
        return web.FileResponse(served.path, chunk_size=COPY_BLOCK_BYTES,
                                headers={"Content-Type": "application/octet-stream"})
    raise ApiError(404, "nothing is served here for this run")


class _LoopWriter(io.RawIOBase):
    """A file that a worker thread writes and the event loop sends: ``tarfile`` is synchronous."""

    def __init__(self, loop, response):
        self._loop = loop
        self._response = response

    def writable(self):
        return True

    def write(self, data):
        asyncio.run_coroutine_threadsafe(self._response.write(bytes(data)), self._loop).result()
        return len(data)


def _write_tar(directory, raw):
    with io.BufferedWriter(raw, COPY_BLOCK_BYTES) as buffered:
        with tarfile.open(fileobj=buffered, mode="w|") as tar:
            for entry in sorted(os.listdir(directory)):
                tar.add(os.path.join(directory, entry), arcname=entry)


async def _stream_directory(request, directory):
    # The size is unknown until the end: the body goes chunked.
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _write_tar, directory, _LoopWriter(loop, response))
    await response.write_eof()
    return response


_PIPE_READERS = []


def _pipe_readers():
    """Threads of their own for reading git's pipes: hundreds of runs fetching at once must not
    take the default executor's few threads, which Redis and the disk are reached through."""
    if not _PIPE_READERS:
        from concurrent.futures import ThreadPoolExecutor

        _PIPE_READERS.append(ThreadPoolExecutor(max_workers=16, thread_name_prefix="git-archive"))
    return _PIPE_READERS[0]


def stop_pipe_readers() -> None:
    """Lets the pipe readers' idle threads go (at the operator's exit: left alone, they wait for
    work that never comes, and the exit waits for them). A reader still copying finishes its
    block; the next fetch makes a new pool."""
    if _PIPE_READERS:
        _PIPE_READERS.pop().shutdown(wait=False, cancel_futures=True)


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of Linux's 64 KiB: git writes, and the server reads, in big blocks."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), COPY_BLOCK_BYTES)
    except (OSError, ImportError, ValueError):
        pass  # not Linux, or capped lower: smaller reads, same bytes


async def stream_git_archive(request, git_dir: str, commit: str, tee=None) -> web.StreamResponse:
    """``git archive`` of ``commit`` from the bare repository ``git_dir``, streamed as it is made.

    A commit git cannot archive is a 404 (nothing was sent yet); git failing mid-way cuts the
    connection, so the agent sees a broken body and never a short tar taken for a whole one.
    The pipe is read with plain ``os.read`` in a worker thread: one copy per block, where an
    asyncio pipe reader copies each block twice more through its buffer.
    """
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    _widen_pipe(write_end)
    try:
        process = await asyncio.create_subprocess_exec(
            "git", "--git-dir", git_dir, "archive", "--format=tar", commit,
            stdin=asyncio.subprocess.DEVNULL, stdout=write_end, stderr=asyncio.subprocess.PIPE)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)

    def read_block():
        return os.read(read_end, COPY_BLOCK_BYTES)

    readers = _pipe_readers()
    try:
        first = await loop.run_in_executor(readers, read_block)
        if not first:
            error = (await process.stderr.read()).decode("utf-8", "replace").strip()
            await process.wait()
            raise ApiError(404, f"cannot archive commit {commit}: {error.splitlines()[-1] if error else 'no output'}")
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        block = first
        try:
            while block:
                if tee is not None:
                    tee.write(block)
                await response.write(block)
                block = await loop.run_in_executor(readers, read_block)
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            # The run went away mid-download (its pod deleted): no one to answer; git is stopped.
            _log.debug("%s: the client went away during git archive %s", request.rel_url.path, commit)
            return response
        stderr = await process.stderr.read()
        if await process.wait() != 0:
            _log.warning("git archive %s failed mid-way: %s", commit, stderr.decode("utf-8", "replace")[-500:])
            if request.transport is not None:
                request.transport.close()
            return response
        if tee is not None:
            tee.finish()  # whole: from now on it is sent from the cache
            tee = None
        try:
            await response.write_eof()
        except ConnectionResetError:
            _log.debug("%s: the client went away at the end of git archive %s", request.rel_url.path, commit)
        return response
    finally:
        if tee is not None:
            tee.abort()  # git failed, or the client went away: nothing half-made is kept
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(read_end)
