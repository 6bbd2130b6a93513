"""The TestLooper worker agent: runs one task of one run and reports it to the worker API.

    TESTLOOPER_WORKER_TOKEN=... python3 -m testlooper.worker.agent --api URL --run-id ID --workdir DIR
    python3 -S -E agent.py prepare|report --api URL --run-id ID --workspace DIR --token-file FILE ...
                                                    (in a pod: see "Pod modes" below and docs/pods.md)

One module, standard library only: this file alone, copied onto a bare machine (a pod's init
step, an EC2 instance's user data, a Windows host), runs as ``python3 agent.py`` with nothing
else. It includes the parsing of individual test results (testSummary.json, JUnit XML);
``testlooper.worker.results`` re-exports that part for code that imports it from there.
docs/worker.md describes the protocol, the workspace layout and how each failure is reported.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree
import zipfile

TOKEN_ENV = "TESTLOOPER_WORKER_TOKEN"
SHELL_ENV = "TESTLOOPER_SHELL"

LOG_CHUNK_BYTES = 256 * 1024
LOG_POLL_SECONDS = 0.5
COPY_BLOCK_BYTES = 1024 * 1024
HTTP_TIMEOUT_SECONDS = 60
PROCESS_POLL_SECONDS = 0.1
# While a command runs, WORKDIR/agent/process-groups is checked this often for groups that ended.
PROCESS_GROUPS_CHECK_SECONDS = 1.0
DEFAULT_TIMEOUT_SECONDS = 3600
# A cleanup that follows a timeout or a cancellation gets this long, then it is killed too.
CLEANUP_SECONDS_AFTER_STOP = 30
# An API that does not answer (an operator restarting, a `helm upgrade`) is asked again, waiting
# longer each time up to the cap, until the run's own deadline: its start, plus its timeout,
# plus this grace (an assignment's "report_grace_seconds" overrides it). Nothing of a run whose
# API comes back within that is lost.
RETRY_FIRST_DELAY_SECONDS = 0.5
RETRY_MAX_DELAY_SECONDS = 15
REPORT_GRACE_SECONDS = 600

ARCHIVE_EXTENSIONS = {"Tar": ".tar.gz", "Zip": ".zip", "Files": ".tar"}
# A run's log is cut past max_log_mb (the task's, else this), keeping its head and its tail.
DEFAULT_MAX_LOG_MB = 1024


class ApiError(Exception):
    """A request to the worker API failed; ``status`` is None when no HTTP answer came back."""

    def __init__(self, message, status=None, body=b""):
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def permanent(self):
        """True when asking again cannot help (bad token, unknown run, refused request)."""
        # 507: the API's disk is full; the run is an error, resending its log would only wait.
        return self.status is not None and (400 <= self.status < 500 and self.status not in (408, 409, 429)
                                            or self.status == 507)


class InfrastructureError(Exception):
    """Something outside the task failed (API, workspace, shell): the run is reported as ``error``."""


class StopRequested(Exception):
    """The run was cancelled while the workspace was being prepared."""


class ArtifactError(Exception):
    """An artifact the task declared cannot be packed: the task did not produce what it promised."""


# ---------------------------------------------------------------------------------------------
# The worker API


class ApiClient:
    """Talks to ``{api}/runs/{run_id}/`` with the run's bearer token.

    Each thread keeps its own keep-alive connection. Every request the agent makes is idempotent
    (log chunks carry their offset), so a request on a connection the server had closed is simply
    sent again once.
    """

    def __init__(self, api_url, run_id, token):
        parts = urllib.parse.urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--api must be an http:// or https:// URL, got {api_url!r}")
        run_path = parts.path.rstrip("/") + "/runs/" + urllib.parse.quote(run_id, safe="") + "/"
        self.run_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, run_path, "", ""))
        self._token = token
        self._local = threading.local()
        # time.monotonic() past which a failing request is not tried again; the assignment moves it.
        self.retry_until = time.monotonic() + REPORT_GRACE_SECONDS

    def extend_retries_for(self, assignment):
        """From now on, requests are retried until the run's own deadline."""
        task = assignment.get("task") or {}
        grace = assignment.get("report_grace_seconds", REPORT_GRACE_SECONDS)
        try:
            seconds = float(task.get("timeout_seconds") or DEFAULT_TIMEOUT_SECONDS) + float(grace)
        except (TypeError, ValueError):
            seconds = DEFAULT_TIMEOUT_SECONDS + REPORT_GRACE_SECONDS
        self.retry_until = time.monotonic() + seconds

    def retrying(self, call, stop=None):
        """``call()`` until it succeeds, fails for good (``ApiError.permanent``), the run's
        deadline passes or ``stop`` asks to stop; the last failure is raised."""
        delay = RETRY_FIRST_DELAY_SECONDS
        while True:
            try:
                return call()
            except ApiError as error:
                if error.permanent or time.monotonic() + delay > self.retry_until \
                        or (stop is not None and stop.reason):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_SECONDS)

    def request(self, method, path, body=b"", content_type="application/octet-stream"):
        """Sends one request and returns the answer's body; raises ApiError unless it is a 2xx."""
        response = self._send(method, urllib.parse.urljoin(self.run_url, path), body, content_type)
        try:
            data = response.read()
        except (http.client.HTTPException, OSError) as error:
            self._drop_connection()
            raise ApiError(f"{method} {path}: {error}") from error
        if not 200 <= response.status < 300:
            raise ApiError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}", response.status, data)
        return data

    def request_json(self, method, path, document=None):
        body = b"" if document is None else json.dumps(document).encode("utf-8")
        answer = self.request(method, path, body, "application/json")
        try:
            return json.loads(answer or b"{}")
        except ValueError as error:
            raise ApiError(f"{method} {path}: the answer is not JSON: {error}") from error

    def upload_file(self, path, file_path):
        with open(file_path, "rb") as body:
            return self.request("PUT", path, body)

    def download(self, url, destination, stop):
        """Streams ``url`` (relative to the run's URL, or absolute) into the file ``destination``.

        Only URLs on the API's own origin get the token; a presigned storage URL never sees it.
        """
        absolute = urllib.parse.urljoin(self.run_url, url)
        if _origin(absolute) == _origin(self.run_url):
            response = self._send("GET", absolute, b"", None)
            if response.status != 200:
                message = response.read()[:200]
                raise ApiError(f"GET {url}: HTTP {response.status}: {message!r}", response.status)
        else:
            try:
                response = urllib.request.urlopen(absolute, timeout=HTTP_TIMEOUT_SECONDS)
            except OSError as error:
                raise ApiError(f"GET {url}: {error}") from error
        try:
            with open(destination, "wb") as out:
                _copy_stream(response, out, stop)
        except (http.client.HTTPException, OSError) as error:
            self._drop_connection()
            raise ApiError(f"GET {url}: {error}") from error

    def _send(self, method, url, body, content_type):
        target = urllib.parse.urlsplit(url)
        path = target.path + (f"?{target.query}" if target.query else "")
        headers = {"Authorization": f"Bearer {self._token}", "Content-Length": str(_body_length(body))}
        if content_type:
            headers["Content-Type"] = content_type
        failure = None
        for _attempt in range(2):
            if hasattr(body, "seek"):
                body.seek(0)
            connection = self._connection()
            try:
                connection.request(method, path, body=body, headers=headers)
                return connection.getresponse()
            except (http.client.HTTPException, OSError) as error:
                self._drop_connection()
                failure = error
        raise ApiError(f"{method} {target.path}: {failure}") from failure

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            parts = urllib.parse.urlsplit(self.run_url)
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connection = kind(parts.hostname, parts.port, timeout=HTTP_TIMEOUT_SECONDS)
            self._local.connection = connection
        return connection

    def _drop_connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def _origin(url):
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def _body_length(body):
    return os.fstat(body.fileno()).st_size if hasattr(body, "fileno") else len(body)


def _copy_stream(source, destination, stop):
    while True:
        if stop.reason:
            raise StopRequested()
        block = source.read(COPY_BLOCK_BYTES)
        if not block:
            return
        destination.write(block)


def artifact_url_segment(name):
    """The path segment naming an artifact in ``PUT artifacts/{name}``.

    The whole-output artifact (name ``""``) is ``_``, so a real ``_`` is sent escaped; every other
    character outside ``[A-Za-z0-9.~-]`` is percent-encoded, and dots-only names too, so a name
    like ``../x`` or ``..`` is never a path to anything.
    """
    if name == "":
        return "_"
    segment = urllib.parse.quote(name, safe="").replace("_", "%5F")
    return segment.replace(".", "%2E") if set(segment) == {"."} else segment


# ---------------------------------------------------------------------------------------------
# Stopping early


class StopSignal:
    """Why the task must stop before its end: ``"timeout"``, ``"cancelled"`` or ``"failed"`` (its
    log passed its limit), else None.

    Set from the heartbeat thread and from signal handlers, so it holds plain attributes and no
    lock: a signal handler that waited on a lock the main thread holds would deadlock.
    """

    def __init__(self):
        self.reason = None
        self.message = ""

    def request(self, reason, message):
        if self.reason is None:
            self.message = message
            self.reason = reason


def install_signal_handlers(stop):
    """SIGTERM/SIGINT (and Windows' CTRL_BREAK) cancel the run: the tree is killed and reported."""
    def handle(signum, _frame):
        stop.request("cancelled", f"the agent received {signal.Signals(signum).name}")

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handle)


# ---------------------------------------------------------------------------------------------
# Background threads: heartbeat and log shipping


class Heartbeat(threading.Thread):
    """Posts ``heartbeat`` every few seconds; an answer asking to cancel stops the task."""

    def __init__(self, api, interval_seconds, stop):
        super().__init__(name="heartbeat", daemon=True)
        self.phase = "starting"
        self._api = api
        self._interval = interval_seconds
        self._stop_signal = stop
        self._finished = threading.Event()

    def run(self):
        while True:
            self._beat()
            if self._finished.wait(self._interval):
                return

    def finish(self):
        self._finished.set()
        self.join()

    def _beat(self):
        try:
            answer = self._api.request_json("POST", "heartbeat", {"phase": self.phase})
        except ApiError as error:
            # A run the API no longer knows (deleted, token revoked) is not worth finishing.
            if error.permanent:
                self._stop_signal.request("cancelled", f"the API refused the heartbeat: {error}")
            return
        if answer.get("cancel"):
            self._stop_signal.request("cancelled", "cancelled through the API")


class LogShipper(threading.Thread):
    """Ships the log file to ``POST log?offset=N`` in bounded chunks, read back from the file.

    Reading from the file rather than holding output in memory means a task printing gigabytes,
    or an API that is slow or briefly down, costs disk space and never agent memory.
    """

    def __init__(self, api, log_path, chunk_bytes=LOG_CHUNK_BYTES):
        super().__init__(name="log-shipper", daemon=True)
        self.shipped_bytes = 0
        self.error = None
        # While the task's processes may write, bytes past this offset are not shipped: a log cut
        # for its size (TaskLog.enforce_limit) rewrites what follows its head. None: ship all.
        self.hold_beyond = None
        self._api = api
        self._path = log_path
        self._chunk_bytes = chunk_bytes
        self._finishing = threading.Event()

    def run(self):
        failures = 0
        with open(self._path, "rb") as log:
            while True:
                finishing = self._finishing.is_set()
                try:
                    progressed = self._ship_chunk(log)
                    failures = 0
                except ApiError as error:
                    failures += 1
                    if error.permanent or (finishing and time.monotonic() > self._api.retry_until):
                        self.error = str(error)
                        return
                    delay = min(0.25 * 2 ** min(failures, 16), RETRY_MAX_DELAY_SECONDS)
                    if finishing:
                        time.sleep(delay)  # the event is set already: waiting on it would not wait
                    else:
                        self._finishing.wait(delay)  # wakes early when the task ends
                    continue
                if not progressed:
                    if finishing:
                        return
                    self._finishing.wait(LOG_POLL_SECONDS)

    def finish(self):
        """Ships what is left (the caller has stopped writing) and returns an error or None."""
        self._finishing.set()
        self.join()
        return self.error

    def _ship_chunk(self, log):
        """Sends the next chunk, if any; returns False when there was nothing to send."""
        hold = self.hold_beyond
        wanted = self._chunk_bytes if hold is None else min(self._chunk_bytes, hold - self.shipped_bytes)
        if wanted <= 0:
            return False
        log.seek(self.shipped_bytes)
        data = log.read(wanted)
        if not data:
            return False
        try:
            self._api.request("POST", f"log?offset={self.shipped_bytes}", data)
            self.shipped_bytes += len(data)
        except ApiError as error:
            if error.status != 409:
                raise
            # The server holds less than we think (it lost data, a gap is refused): resend from
            # the size it reports.
            try:
                self.shipped_bytes = int(json.loads(error.body)["size"])
            except (ValueError, KeyError, TypeError):
                raise error from None
        return True


# ---------------------------------------------------------------------------------------------
# The workspace


class Workspace:
    """The directories of one run under ``--workdir`` (see docs/worker.md)."""

    TASK_DIRECTORIES = ("src", "inputs", "output", "build_output", "scratch")

    def __init__(self, workdir, ccache_dir=None):
        self.root = os.path.abspath(workdir)
        self.src = os.path.join(self.root, "src")
        self.inputs = os.path.join(self.root, "inputs")
        self.output = os.path.join(self.root, "output")
        self.build_output = os.path.join(self.root, "build_output")
        self.scratch = os.path.join(self.root, "scratch")
        self.ccache = os.path.abspath(ccache_dir) if ccache_dir else os.path.join(self.root, "ccache")
        self.agent_files = os.path.join(self.root, "agent")
        self.log_path = os.path.join(self.root, "log.txt")
        self.result_path = os.path.join(self.root, "result.json")
        # Read by a runner that kills the agent hard: see CommandRunner and docs/worker.md.
        self.process_groups_path = os.path.join(self.agent_files, "process-groups")

    def open_log(self):
        """Creates the work directory and an empty log; the log file is the agent's first output."""
        os.makedirs(self.root, exist_ok=True)
        return TaskLog(self.log_path)

    def create_directories(self):
        """Creates the task's directories; refuses a workdir holding another run's, because mixing
        two runs' files would make results lie."""
        leftovers = [name for name in self.TASK_DIRECTORIES if os.path.lexists(os.path.join(self.root, name))]
        if leftovers:
            raise InfrastructureError(
                f"workdir {self.root} already holds {', '.join(leftovers)}: use a fresh one")
        for path in (self.src, self.inputs, self.output, self.build_output, self.scratch):
            os.makedirs(path)
        os.makedirs(self.agent_files, exist_ok=True)
        os.makedirs(self.ccache, exist_ok=True)  # a compiler cache outlives runs by design

    def agent_path(self, name):
        return os.path.join(self.agent_files, name)


class TaskLog:
    """The task's log file: commands write into it directly, the agent adds its own notes.

    With a limit (``limit_bytes``), ``enforce_limit`` keeps it at most that long: past it, the
    first half stays as written (``head_bytes``, what the shipper may send while the task runs)
    and the rest becomes a line marking the cut followed by the newest bytes.
    """

    def __init__(self, path, limit_bytes=None, truncate=True):
        if truncate:  # the report container of a pod appends to the log its prepare step began
            open(path, "wb").close()
        self.path = path
        # Append mode: the agent and the commands share the file, every write must land at its end
        # (after a cut too: appending writers follow the file's new end).
        self.file = open(path, "ab")
        self.limit_bytes = limit_bytes
        self.left_out_bytes = 0
        self._marker_length = 0  # of the cut marker in the file, if any
        self.write_error = ""  # why a note could not be written (a full disk): the log is cut

    @property
    def head_bytes(self):
        return None if self.limit_bytes is None else self.limit_bytes // 2

    def note(self, text):
        try:
            self.file.write(f"[testlooper] {text}\n".encode("utf-8", "replace"))
            self.file.flush()
        except OSError as error:  # the run goes on to its result; that result says the log is cut
            self.write_error = self.write_error or (error.strerror or str(error))

    def close(self):
        try:
            self.file.close()
        except OSError as error:
            self.write_error = self.write_error or (error.strerror or str(error))

    def limit_message(self):
        return (f"the log passed its limit of {_size_text(self.limit_bytes)} (max_log_mb), so the task was stopped; "
                f"{self.left_out_bytes} bytes were cut from its middle")

    def enforce_limit(self):
        """Cuts the log when it is longer than its limit; returns True if it did."""
        self.file.flush()
        size = os.fstat(self.file.fileno()).st_size
        if self.limit_bytes is None or size <= self.limit_bytes:
            return False
        head, previous_marker = self.head_bytes, self._marker_length
        # After a cut an eighth of the limit stays free, so that a stage's cleanup and the agent's
        # notes have room before the log would be cut (and the cleanup stopped) again.
        room = self.limit_bytes // 8
        marker_length = 0
        while True:  # the marker shows the count it is part of: settle its length
            tail = max(0, self.limit_bytes - head - room - marker_length)
            removed = max(0, size - head - tail - previous_marker)  # output only, not an earlier marker
            marker = (f"\n[testlooper] ---- {self.left_out_bytes + removed} bytes of output cut here: the log "
                      f"passed its limit of {_size_text(self.limit_bytes)} (max_log_mb); what follows is its "
                      "end ----\n").encode()
            if len(marker) == marker_length:
                break
            marker_length = len(marker)
        self.left_out_bytes += removed
        self._marker_length = len(marker)
        _move_tail(self.path, size - tail, head, marker, tail)
        return True


def _move_tail(path, tail_start, head, marker, tail):
    """Rewrites ``path`` as its first ``head`` bytes, ``marker``, and the ``tail`` bytes that began
    at ``tail_start``, copied forwards in blocks (the destination is always before the source)."""
    with open(path, "r+b") as log:
        log.seek(head)
        log.write(marker)
        destination, source, left = head + len(marker), tail_start, tail
        while left > 0:
            log.seek(source)
            block = log.read(min(COPY_BLOCK_BYTES, left))
            if not block:
                break
            log.seek(destination)
            log.write(block)
            destination, source, left = destination + len(block), source + len(block), left - len(block)
        log.truncate(destination)


def _size_text(size):
    mib = size / (1024 * 1024)
    return f"{mib:g} MiB" if mib >= 1 else f"{size} bytes"


def prepare_workspace(workspace, assignment, api, stop, log):
    """Lays out the workspace: the commit's source, every input, and ``.git_commit`` files."""
    try:
        workspace.create_directories()
    except OSError as error:
        raise InfrastructureError(f"cannot create the workspace in {workspace.root}: {error}") from error
    message = assignment.get("commit_message", "")
    log.note("fetching the source")
    fetch_tree(assignment["source"], workspace.src, "source", api, stop, workspace)
    write_commit_message(workspace.src, message)
    for key, spec in sorted(assignment.get("inputs", {}).items()):
        log.note(f"fetching input {key!r}")
        destination = os.path.join(workspace.inputs, checked_input_key(key))
        fetch_tree(spec, destination, f"input {key!r}", api, stop, workspace)
        if spec.get("kind") == "source":
            write_commit_message(destination, message)


def checked_input_key(key):
    """Input keys become directory names under ``$TEST_INPUTS``: one plain name, nothing else."""
    if key in ("", ".", "..") or any(character in key for character in "/\\:\0"):
        raise InfrastructureError(f"input key {key!r} is not a plain directory name")
    return key


def fetch_tree(spec, destination, label, api, stop, workspace):
    """Materializes a source tree or build output at ``destination``.

    ``{"path": DIR}`` is copied (symlinks kept as links), ``{"path": FILE}`` is a packed artifact
    and is unpacked, ``{"url": URL}`` is downloaded and unpacked (tar, possibly compressed, or zip).
    """
    try:
        if "path" in spec:
            _materialize_local(spec["path"], destination, label)
        elif "url" in spec:
            download = workspace.agent_path("download")
            # Retried as the reports are: an operator restarting while a pod prepares is waited
            # for, not taken for a broken run.
            api.retrying(lambda: api.download(spec["url"], download, stop), stop)
            unpack_archive(download, destination, label)
            os.remove(download)
        else:
            raise InfrastructureError(f"{label}: neither a path nor a url in the assignment")
    except ApiError as error:
        raise InfrastructureError(f"cannot fetch {label}: {error}") from error
    except OSError as error:
        raise InfrastructureError(f"cannot lay out {label}: {error}") from error


def _materialize_local(path, destination, label):
    if os.path.isdir(path):
        shutil.copytree(path, destination, symlinks=True, dirs_exist_ok=True)
    elif os.path.isfile(path):
        unpack_archive(path, destination, label)
    else:
        raise InfrastructureError(f"{label}: {path} does not exist")


def unpack_archive(archive, destination, label):
    """Unpacks a tar (any compression) or zip into ``destination``.

    Symlinks are made as links whatever their target, never replaced by what they point to: a
    build's ``python -> /usr/bin/python3`` (every virtualenv has one) must reach its consumer as
    it was built. What is refused is writing anywhere but inside ``destination``: absolute member
    names, ``..``, a member whose path goes through an already-extracted link to the outside,
    hard links to the outside, and device files.
    """
    os.makedirs(destination, exist_ok=True)
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(destination, filter=input_tar_filter)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as packed:
                _extract_zip(packed, destination)
        else:
            raise InfrastructureError(f"{label}: not a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, UnsafeMemberError) as error:
        raise InfrastructureError(f"{label}: cannot unpack: {error}") from error


class UnsafeMemberError(Exception):
    """A zip member would be written outside the destination, or is a device file."""


def input_tar_filter(member, destination):
    """The extraction filter for inputs: tarfile's ``tar`` filter, made strict where it is lax.

    In Python 3.11.4+ (``tarfile.tar_filter``), the ``tar`` filter strips a leading ``/`` and
    clears setuid/setgid/sticky and group/other write bits. It does not judge where a symlink
    points, which is what lets absolute links through (the ``data`` filter refuses them). Its
    check that a member stays inside the destination rests on ``os.path.realpath``, which is not
    trusted here (see ``_resolves_inside``), and it neither checks hard-link targets nor refuses
    device files. So this filter refuses absolute names outright, special files, and members or
    hard-link targets that resolve outside, and drops the archive's owners as the ``data``
    filter does.

    tarfile applies the filter to each member just before extracting it, so the checks see the
    links the earlier members created.
    """
    _refuse_absolute_name(member)
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise tarfile.SpecialFileError(member)
    if not _resolves_inside(destination, member.name, follow_last=member.isreg()):
        raise tarfile.OutsideDestinationError(member, os.path.join(destination, member.name))
    if member.islnk():
        # tarfile makes the hard link with os.link(destination/linkname), which follows symlinks.
        if _is_absolute_name(member.linkname):
            raise tarfile.AbsoluteLinkError(member)
        if not _resolves_inside(destination, member.linkname, follow_last=True):
            raise tarfile.LinkOutsideDestinationError(member, os.path.join(destination, member.linkname))
    member = tarfile.tar_filter(member, destination)
    changes = {"uid": None, "gid": None, "uname": None, "gname": None}
    if member.mode is not None and not (member.isdir() or member.issym()):
        changes["mode"] = member.mode | 0o600  # the agent can always read and remove what it unpacked
    return member.replace(**changes, deep=False)


def _resolves_inside(destination, name, follow_last):
    """Whether ``destination/name`` stays inside ``destination`` when the links already on disk
    are followed (the last one too when ``follow_last``: writing a file follows it).

    Resolved here step by step with ``lstat`` and ``readlink`` rather than with
    ``os.path.realpath``, which older Pythons stop resolving past PATH_MAX (CVE-2025-4517); a
    path that cannot be looked at, or a chain of more than 40 links, is refused. Absolute link
    targets are kept as links when unpacked but never followed here.
    """
    root = os.path.abspath(destination)
    pending = name.replace("\\", "/").split("/")
    current, hops = root, 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                return False
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except FileNotFoundError:
            is_link = False
        except OSError:
            return False
        if is_link and (pending or follow_last):
            hops += 1
            target = os.readlink(candidate)
            if hops > 40 or _is_absolute_name(target):
                return False
            pending[:0] = target.split("/")
            continue
        current = candidate
    return True


def _is_absolute_name(name):
    return name.startswith(("/", "\\")) or name[1:2] == ":"


def _refuse_absolute_name(member):
    if _is_absolute_name(member.name):
        raise tarfile.AbsolutePathError(member)


# Zip "made by" systems whose external attributes carry a Unix mode (Unix, macOS).
ZIP_UNIX_SYSTEMS = (3, 19)


def _extract_zip(packed, destination):
    """Extracts a zip with the care of ``input_tar_filter``: a Unix symlink entry becomes a link
    whatever its target, and every member is checked, just before it is written, against the
    links already on disk (``_resolves_inside``), so none is written through a link to the outside."""
    root = os.path.realpath(destination)
    for info in packed.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if _is_absolute_name(name) or ".." in parts or not _resolves_inside(root, name, follow_last=True):
            raise UnsafeMemberError(f"refusing zip member {name!r}: it points outside the directory")
        path = os.path.join(root, *[part for part in name.split("/") if part not in ("", ".")])
        kind = _zip_member_kind(info)
        if kind == "link":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(os.fsdecode(packed.read(info)), path)
        elif kind == "directory":
            os.makedirs(path, exist_ok=True)
        elif kind == "file":
            packed.extract(info, root)  # to ``path``: the name is plain, checked above
        else:
            raise UnsafeMemberError(f"refusing zip member {name!r}: it is a device or other special file")


def _zip_member_kind(info):
    mode = info.external_attr >> 16
    if info.create_system in ZIP_UNIX_SYSTEMS and stat.S_IFMT(mode):
        if stat.S_ISLNK(mode):
            return "link"
        if stat.S_ISDIR(mode):
            return "directory"
        if not stat.S_ISREG(mode):
            return "special"
    return "directory" if info.is_dir() else "file"


def write_commit_message(tree, message):
    with open(os.path.join(tree, ".git_commit"), "w", encoding="utf-8") as out:
        out.write(message)


def task_environment(workspace, assignment, base_environment):
    """The environment of every command: the agent's own, the task's variables, then the
    ``TEST_*`` contract (which a variable of the same name cannot override)."""
    environment = dict(base_environment)
    variables = assignment["task"].get("variables", {})
    environment.update({str(name): str(value) for name, value in variables.items()})
    environment.update({
        "TEST_SRC_DIR": workspace.src,
        "TEST_INPUTS": workspace.inputs,
        "TEST_OUTPUT_DIR": workspace.output,
        "TEST_BUILD_OUTPUT_DIR": workspace.build_output,
        "TEST_SCRATCH_DIR": workspace.scratch,
        "TEST_CCACHE_DIR": workspace.ccache,
        "TEST_CORES_AVAILABLE": str(assignment.get("cores", 0)),
        "TEST_RAM_GB_AVAILABLE": _number_text(assignment.get("ram_gb", 0)),
        "TEST_LOOPER_TEST_ID": str(assignment.get("run_id", "")),
        # Extensions: which of a test's `runs` this is (0-based), and which attempt of it.
        "TEST_LOOPER_RUN_INDEX": str(assignment.get("run_index", 0)),
        "TEST_LOOPER_ATTEMPT": str(assignment.get("attempt", 1)),
    })
    return environment


def _number_text(value):
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------------------------
# Running commands


class CommandOutcome:
    def __init__(self, exit_code, stopped):
        self.exit_code = exit_code  # None when the command was killed
        self.stopped = stopped  # None, "timeout" or "cancelled"


class CommandRunner:
    """Runs shell commands, each in its own process group, all writing into the task log.

    Processes a command leaves behind (a server started with ``&``) live on until the task ends,
    as they would in the task's container; ``kill_all`` then ends every one of them.

    Each command's process group id goes into ``process_groups_path`` (one decimal number per
    line) as soon as the command is started, for a runner that has to kill the agent itself:
    the agent's own end cannot take the task's process groups with it, they are other sessions.
    Groups that have ended (killed by the agent, or found empty when a command exits and every
    second while one runs) are dropped from the file, because the kernel may give their ids to
    unrelated processes.
    """

    def __init__(self, shell_prefix, cwd, environment, log, kill_grace_seconds, process_groups_path=None):
        self._shell_prefix = shell_prefix
        self._cwd = cwd
        self._environment = environment
        self._log = log
        self._kill_grace = kill_grace_seconds
        self._processes = []
        self._groups_path = process_groups_path
        self._listed_groups = None  # as last written to the file; None: unknown, rewrite it
        self._groups_checked = time.monotonic()
        self._write_groups()

    def run(self, label, command, deadline, stop=None, extra_environment=None):
        """Runs ``command`` until it exits, ``deadline`` (monotonic) passes or ``stop`` is set."""
        self._log.note(f"{label}: {command}")
        process = self._start(command, extra_environment or {})
        started = time.monotonic()
        stopped = self._wait(process, deadline, stop)
        if not stopped and self._log.enforce_limit():  # it wrote too much in its last moments
            if stop is not None:
                stop.request("failed", self._log.limit_message())
            stopped = "failed"
        if stopped:
            self._log.note(f"{label}: {'log too long' if stopped == 'failed' else stopped}, killing its processes")
            self._kill([process])
            # Killed for good; checking its group again at the end could only find zombies that
            # an init which does not reap leaves behind, and wait a grace period for nothing.
            self._processes.remove(process)
            self._write_groups()
            return CommandOutcome(None, stopped)
        self._log.note(f"{label}: exit code {process.returncode} after {time.monotonic() - started:.1f} s")
        self._write_groups()
        return CommandOutcome(process.returncode, None)

    def kill_all(self):
        self._kill(self._processes)
        self._processes = []
        self._write_groups()

    def _start(self, command, extra_environment):
        options = {"cwd": self._cwd, "env": {**self._environment, **extra_environment},
                   "stdin": subprocess.DEVNULL, "stdout": self._log.file, "stderr": subprocess.STDOUT}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True  # its own process group, so the tree can be killed
        try:
            process = subprocess.Popen(shell_command_line(self._shell_prefix, command), **options)
        except (OSError, ValueError) as error:
            raise InfrastructureError(f"cannot start the shell {self._shell_prefix!r}: {error}") from error
        self._processes.append(process)
        self._record_group(process)
        return process

    def _record_group(self, process):
        """Appends the new command's process group id (its leader's pid) to the file, and flushes
        it to the system at once: whatever the command starts from now on is in that group."""
        if not self._groups_path:
            return
        try:
            with open(self._groups_path, "a", encoding="ascii") as groups:
                groups.write(f"{process.pid}\n")
        except OSError as error:
            # The process is in self._processes already: kill_all ends it.
            raise InfrastructureError(f"cannot record the process group in {self._groups_path}: {error}") from error
        if self._listed_groups is not None:
            self._listed_groups.append(process.pid)

    def _write_groups(self):
        """Replaces the file (atomically) with the groups that may still hold processes, when
        that list has changed. Only the thread running the commands writes the file."""
        self._groups_checked = time.monotonic()
        if not self._groups_path:
            return
        groups = [process.pid for process in self._processes if _may_hold_processes(process)]
        if groups == self._listed_groups:
            return
        partial = self._groups_path + ".new"
        try:
            with open(partial, "w", encoding="ascii") as out:
                out.write("".join(f"{group}\n" for group in groups))
            os.replace(partial, self._groups_path)
            self._listed_groups = groups
        except OSError as error:
            self._log.note(f"cannot update {self._groups_path}: {error}")

    def _wait(self, process, deadline, stop):
        while True:
            try:
                process.wait(timeout=PROCESS_POLL_SECONDS)
                return None
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - self._groups_checked >= PROCESS_GROUPS_CHECK_SECONDS:
                self._write_groups()  # drops the groups of earlier commands that have ended since
            if self._log.enforce_limit():
                if stop is not None:
                    stop.request("failed", self._log.limit_message())
                return "failed"
            if stop is not None and stop.reason:
                return stop.reason
            if time.monotonic() >= deadline:
                return "timeout"

    def _kill(self, processes):
        if os.name == "nt":
            _kill_trees_windows(processes)
        else:
            _kill_groups_posix(processes, self._kill_grace)


def _kill_groups_posix(processes, grace_seconds):
    """SIGTERM to each process group, then SIGKILL to those still alive after the grace period
    (a child that ignores SIGTERM dies with its own children all the same)."""
    alive = [process for process in processes if _group_alive(process)]
    for process in alive:
        _signal_group(process.pid, signal.SIGTERM)
    give_up = time.monotonic() + grace_seconds
    while alive and time.monotonic() < give_up:
        time.sleep(0.05)
        alive = [process for process in alive if _group_alive(process)]
    for process in alive:
        _signal_group(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait()


def _group_alive(process):
    process.poll()  # reap the leader: an unreaped leader would keep its group "alive" forever
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # only processes we may not signal are left (a sudo, say): still there
    return True


def _may_hold_processes(process):
    """True while the command's process group (Windows: its shell) may still hold processes."""
    return process.poll() is None if os.name == "nt" else _group_alive(process)


def _signal_group(group_id, signum):
    try:
        os.killpg(group_id, signum)
    except (ProcessLookupError, PermissionError):
        pass


def kill_processes_of_run(run_id):
    """Kills every process still carrying ``TEST_LOOPER_TEST_ID=run_id`` in its environment, and
    returns ``[(pid, command line)]`` of those killed.

    A command's process group dies with ``kill_all``, but a process can leave it (``setsid``,
    a daemon that double-forks); every process the task starts inherits the variable, whatever
    group or session it moves to. Linux only (``/proc/PID/environ``); elsewhere there is nothing
    to scan and an empty list comes back. Processes of other users cannot be read, so are left.
    """
    if not run_id or not os.path.isdir("/proc/self"):
        return []
    marker = f"TEST_LOOPER_TEST_ID={run_id}".encode()
    killed, own, signalled = [], os.getpid(), set()
    # Again until a pass finds nothing new: a process may fork between the listing and its kill.
    # (One killed but not yet gone may still show its environment: it is not counted twice.)
    for _ in range(20):
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == own or int(entry) in signalled:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker not in environ.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    command = cmdline.read().replace(b"\0", b" ").strip().decode("utf-8", "replace")
                os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone already, or not ours to read
            found += 1
            signalled.add(int(entry))
            killed.append((int(entry), command))
        if not found:
            break
        time.sleep(0.05)
    return killed


def report_escaped(killed, log):
    if not killed:
        return
    shown = ", ".join(f"{pid} ({command[:80] or '?'})" for pid, command in killed[:10])
    more = f" and {len(killed) - 10} more" if len(killed) > 10 else ""
    log.note(f"killed {len(killed)} process{'es' if len(killed) > 1 else ''} that outlived the run "
             f"outside its process groups: {shown}{more}")


def _kill_trees_windows(processes):
    """``taskkill /T /F`` ends a process and its descendants. Windows finds descendants through
    the parent, so leftovers of a command whose shell has already exited cannot be reached."""
    for process in processes:
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        process.wait()


def default_shell_prefix():
    """``$TESTLOOPER_SHELL`` if set, else ``/bin/sh -c`` (POSIX) or ``cmd.exe /d /s /c`` (Windows)."""
    configured = os.environ.get(SHELL_ENV, "").strip()
    if configured:
        return configured
    return "cmd.exe /d /s /c" if os.name == "nt" else "/bin/sh -c"


def shell_command_line(prefix, command):
    """The argv (POSIX) or command line (Windows) running ``command`` through the shell ``prefix``."""
    if os.name != "nt":
        return shlex.split(prefix) + [command]
    if prefix.lower().startswith("cmd"):
        # With /s, cmd strips exactly the outer quotes and runs the rest verbatim.
        return f'{prefix} "{command}"'
    return f"{prefix} {subprocess.list2cmdline([command])}"


# ---------------------------------------------------------------------------------------------
# Artifacts


class PackedArtifact:
    def __init__(self, name, archive_format, path):
        self.name = name
        self.archive_format = archive_format
        self.path = path
        self.size = os.path.getsize(path)

    def summary(self):
        return {"name": self.name, "format": self.archive_format, "size": self.size}


def pack_artifact(artifact, base_directory, destination_without_extension):
    """Packs one declared artifact; ``directory`` is relative to ``base_directory`` and the
    include/exclude globs relative to that directory (see ``path_matcher``)."""
    name, archive_format = artifact.get("name", ""), artifact.get("format") or "Tar"
    if archive_format not in ARCHIVE_EXTENSIONS:
        raise ArtifactError(f"artifact {name!r}: unknown format {archive_format!r} (Tar, Zip or Files)")
    directory = _inside(base_directory, artifact.get("directory", ""), name)
    if not os.path.isdir(directory):
        raise ArtifactError(f"artifact {name!r}: directory {artifact.get('directory', '')!r} does not exist")
    selected = select_files(directory, artifact.get("include_patterns") or [],
                            artifact.get("exclude_patterns") or [])
    path = destination_without_extension + ARCHIVE_EXTENSIONS[archive_format]
    if archive_format == "Zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as packed:
            for relative in selected:
                _zip_add(packed, os.path.join(directory, relative), relative)
    else:
        mode = "w:gz" if archive_format == "Tar" else "w"
        options = {"compresslevel": 6} if archive_format == "Tar" else {}
        with tarfile.open(path, mode, **options) as packed:
            for relative in selected:
                packed.add(os.path.join(directory, relative), relative, recursive=False)
    return PackedArtifact(name, archive_format, path)


def _zip_add(packed, path, relative):
    """Adds a file, or a symlink as a link (as tar does and as unpacking restores it): following
    it would pack whatever it points to, which in a pod may be a file the task cannot read."""
    if not os.path.islink(path):
        packed.write(path, relative)
        return
    info = zipfile.ZipInfo(relative)
    info.create_system = ZIP_UNIX_SYSTEMS[0]
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    packed.writestr(info, os.readlink(path))


def _inside(base, relative, name):
    path = os.path.realpath(os.path.join(base, relative))
    root = os.path.realpath(base)
    if os.path.commonpath([path, root]) != root:
        raise ArtifactError(f"artifact {name!r}: directory {relative!r} is outside the output directory")
    return path


def select_files(directory, include_patterns, exclude_patterns):
    """Relative ``/``-separated paths of the files (and symlinks) under ``directory`` that match
    an include pattern (all do when there is none) and no exclude pattern."""
    include = [path_matcher(pattern) for pattern in include_patterns]
    exclude = [path_matcher(pattern) for pattern in exclude_patterns]
    selected = []
    for root, directories, files in os.walk(directory):
        directories.sort()
        links = [name for name in directories if os.path.islink(os.path.join(root, name))]
        for name in sorted(files + links):
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if include and not any(match(relative) for match in include):
                continue
            if not any(match(relative) for match in exclude):
                selected.append(relative)
    return selected


def path_matcher(pattern):
    """A predicate for one glob, gitignore-like: ``*`` and ``?`` stay within a path segment,
    ``**`` spans segments, a pattern without ``/`` matches a name at any depth, and a pattern
    matching a directory matches everything under it."""
    pattern = pattern.strip("/")
    regex = _glob_regex(pattern)
    if "/" not in pattern:
        regex = "(?:.*/)?" + regex
    compiled = re.compile(regex + r"(?:/.*)?\Z", re.DOTALL)
    return lambda path: compiled.match(path) is not None


def _glob_regex(pattern):
    parts, index = [], 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        elif pattern[index] == "[" and "]" in pattern[index + 2:]:
            end = pattern.index("]", index + 2)
            body = pattern[index + 1:end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            index = end + 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The task


def sorted_stages(task):
    """The task's stages in the order they run: by ``order``, stable."""
    return sorted(task.get("stages", []), key=lambda stage: stage.get("order", 0))


class TaskRun:
    """Runs the task of an assignment in a prepared workspace: setup script, then the stages in
    order, each followed by its cleanup and the packing and upload of its artifacts."""

    def __init__(self, assignment, workspace, runner, api, stop, heartbeat, log):
        self.task = assignment["task"]
        self.workspace = workspace
        self.runner = runner
        self.api = api
        self.stop = stop
        self.heartbeat = heartbeat
        self.log = log
        self.timeout_seconds = self.task.get("timeout_seconds") or DEFAULT_TIMEOUT_SECONDS
        self.deadline = None
        self.first_failing_exit_code = None
        self.artifacts = []
        self.artifact_problems = []
        self._packed_count = 0

    @property
    def artifact_base(self):
        return self.workspace.build_output if self.task.get("kind") == "build" else self.workspace.output

    def execute(self):
        """Runs everything; returns True when every command that had to pass exited 0."""
        self.deadline = time.monotonic() + self.timeout_seconds
        passed = True
        if self.task.get("setup_script"):
            passed = self._step("setup_script", self.task["setup_script"])
        stages = sorted_stages(self.task)
        for number, stage in enumerate(stages, 1):
            label = f"stage {number}/{len(stages)}"
            if self.stop.reason:
                self.log.note(f"{label}: not run ({self.stop.reason})")
            elif passed or stage.get("always_run"):
                passed = self._run_stage(label, number, stage) and passed
            else:
                self.log.note(f"{label}: skipped, an earlier step failed")
        return passed and not self.artifact_problems

    def _run_stage(self, label, number, stage):
        passed = self._run_stage_commands(label, number, stage)
        if stage.get("cleanup"):
            self._run_cleanup(label, stage["cleanup"])
        if self.stop.reason != "cancelled":
            self._ship_artifacts(stage.get("artifacts", []))
        return passed

    def _run_stage_commands(self, label, number, stage):
        """A plain stage runs its ``command``. A listing stage runs ``list_tests_command``, then
        ``run_tests_command`` with the list, and not ``command``: the definitions engine sets
        ``command`` to the ``run_tests_command`` (so tools showing one command per stage show
        it), and running it on its own would run the tests before any list exists."""
        if not stage.get("list_tests_command"):
            return not stage.get("command") or self._step(f"{label} command", stage["command"])
        test_list = self.workspace.agent_path(f"tests-stage-{number}.txt")
        if not self._step(f"{label} list_tests_command", stage["list_tests_command"],
                          {"TEST_LOOPER_TEST_LIST_OUTPUT": test_list}):
            return False
        if not os.path.isfile(test_list):
            self.log.note(f"{label}: list_tests_command did not write $TEST_LOOPER_TEST_LIST_OUTPUT")
            return False
        run_tests_command = stage.get("run_tests_command") or stage.get("command")
        if not run_tests_command:
            return True
        return self._step(f"{label} run_tests_command", run_tests_command,
                          {"TEST_LOOPER_TESTS_TO_RUN": test_list})

    def _step(self, label, command, extra_environment=None):
        """Runs one command that counts towards the verdict; returns True if it exited 0."""
        if time.monotonic() >= self.deadline:
            self.stop.request("timeout", self._timeout_message())
        if self.stop.reason:
            return False
        self.heartbeat.phase = label
        outcome = self.runner.run(label, command, self.deadline, self.stop, extra_environment)
        if outcome.stopped == "timeout":
            self.stop.request("timeout", self._timeout_message())
        if outcome.exit_code not in (0, None) and self.first_failing_exit_code is None:
            self.first_failing_exit_code = outcome.exit_code
        return outcome.exit_code == 0

    def _run_cleanup(self, label, command):
        """Cleanup runs whatever happened; after a timeout or cancellation it gets a short grace."""
        self.heartbeat.phase = f"{label} cleanup"
        if self.stop.reason:
            self.runner.run(f"{label} cleanup", command, time.monotonic() + CLEANUP_SECONDS_AFTER_STOP)
            return
        outcome = self.runner.run(f"{label} cleanup", command, self.deadline, self.stop)
        if outcome.stopped == "timeout":
            self.stop.request("timeout", self._timeout_message())

    def _ship_artifacts(self, artifacts):
        for artifact in artifacts:
            self.heartbeat.phase = "uploading artifacts"
            self._packed_count += 1
            try:
                destination = self.workspace.agent_path(f"artifact-{self._packed_count}")
                packed = pack_artifact(artifact, self.artifact_base, destination)
            except (ArtifactError, OSError) as error:
                self.log.note(f"error: {error}")
                self.artifact_problems.append(str(error))
                continue
            self._upload(packed)

    def _upload(self, packed):
        path = f"artifacts/{artifact_url_segment(packed.name)}?format={packed.archive_format}"
        try:
            self.api.retrying(lambda: self.api.upload_file(path, packed.path))
        except ApiError as error:
            raise InfrastructureError(f"cannot upload artifact {packed.name!r}: {error}") from error
        self.log.note(f"uploaded artifact {packed.name!r} ({packed.archive_format}, {packed.size} bytes)")
        os.remove(packed.path)
        self.artifacts.append(packed.summary())

    def _timeout_message(self):
        return f"timed out after {self.timeout_seconds} s"


# ---------------------------------------------------------------------------------------------
# Individual test results: testSummary.json and JUnit XML (formerly the module results.py)
#
# A pure function of the files in the output directory. Every parser returns ``(cases, errors)``:
# ``cases`` is a list of ``{"name": str, "success": bool, "duration_seconds": float | None}`` and
# ``errors`` a list of human-readable messages naming the file and the reason. A malformed file
# never raises: its problems become messages, and whatever could be read from it is kept.

TEST_SUMMARY_FILE = "testSummary.json"

# The whole JSON document is held in memory, so refuse absurd ones instead of exhausting RAM.
MAX_TEST_SUMMARY_BYTES = 512 * 1024 * 1024

# XML is fed to the parser in blocks of this size, so memory stays flat whatever the file size.
XML_READ_BLOCK_BYTES = 64 * 1024

# A file with thousands of bad entries reports the first few and a count, not thousands of lines.
MAX_ERRORS_PER_FILE = 20

JUNIT_ROOT_TAGS = ("testsuites", "testsuite", "testcase")


def collect_results(output_dir, confine_to=None):
    """Collects every case reported under ``output_dir``: its testSummary.json and all JUnit files.

    A missing directory reports nothing. A case reported more than once (pytest writes a second
    ``<testcase>`` for a test whose teardown errors after it failed; a runner may write one test
    into two files) is one case of this run: it fails if any of its entries failed.
    """
    cases, errors = [], []
    if not os.path.isdir(output_dir):
        return cases, errors
    summary_path = os.path.join(output_dir, TEST_SUMMARY_FILE)
    if os.path.isfile(summary_path) and _confined(summary_path, confine_to, TEST_SUMMARY_FILE, errors):
        _extend(cases, errors, parse_test_summary(summary_path, label=TEST_SUMMARY_FILE))
    for path in _xml_files(output_dir):
        label = os.path.relpath(path, output_dir).replace(os.sep, "/")
        if _confined(path, confine_to, label, errors):
            _extend(cases, errors, parse_junit(path, label=label))
    return merge_duplicate_cases(cases), errors


def _confined(path, root, label, errors):
    """With ``root`` (a pod's workspace), a result file that links outside it is not read: the
    report container can read files the task cannot, such as the run's token."""
    if root is None:
        return True
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) == real_root:
        return True
    errors.append(f"{label}: refused: it links outside the workspace")
    return False


def merge_duplicate_cases(cases):
    """One case per name, in the order first seen: failed if any entry failed, and the sum of the
    known durations (pytest's second entry times the teardown). The first entry is updated in
    place: the parsers' cases are fresh dicts, and 100,000 of them are not copied."""
    merged = {}
    for case in cases:
        seen = merged.get(case["name"])
        if seen is None:
            merged[case["name"]] = case
            continue
        seen["success"] = seen["success"] and case["success"]
        durations = [d for d in (seen["duration_seconds"], case["duration_seconds"]) if d is not None]
        seen["duration_seconds"] = sum(durations) if durations else None
    return list(merged.values())


def parse_test_summary(path, label=None):
    """Parses a testSummary.json: a dict ``{name: bool | {"success", "logs"}}`` or a list of
    ``{"testName", "success", "logs", "elapsed", "startTimestamp"}``."""
    label = label or path
    try:
        document = _load_json(path)
    except (OSError, ValueError) as error:
        return [], [f"{label}: cannot read test results: {error}"]
    if isinstance(document, dict):
        parsed = [_case_from_summary_item(name, value) for name, value in document.items()]
    elif isinstance(document, list):
        parsed = [_case_from_summary_entry(index, entry) for index, entry in enumerate(document)]
    else:
        return [], [f"{label}: expected a JSON object or list of test results, got {type(document).__name__}"]
    cases = [case for case in parsed if isinstance(case, dict)]
    problems = [problem for problem in parsed if isinstance(problem, str)]
    return cases, _bounded_errors(label, problems)


def parse_junit(path, label=None):
    """Parses a JUnit XML file, one case per ``<testcase>`` (``collect_results`` merges repeated
    names). A case with ``<failure>`` or ``<error>`` fails, a ``<skipped>`` one is left out, any
    other passes. A file whose root is not a JUnit element is not a result
    file and reports nothing. A JUnit file declaring a DOCTYPE is refused, so no entity is ever
    defined (the "billion laughs" expansion and external entities cannot happen)."""
    label = label or path
    collector = _JUnitCollector()
    # A target parser, not iterparse: iterparse cannot be told to refuse a DOCTYPE, a target's
    # doctype() hook can, before the parser reads a single entity declaration. It keeps no tree.
    parser = ElementTree.XMLParser(target=collector)
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(XML_READ_BLOCK_BYTES), b""):
                parser.feed(block)
        parser.close()
    except _NotJUnit:
        return [], []
    except _DoctypeRefused:
        collector.problems.append("refused: the file declares a DOCTYPE (entity declarations are not allowed)")
    except ElementTree.ParseError as error:
        collector.problems.append(f"not well-formed XML: {error}")
    except OSError as error:
        collector.problems.append(f"cannot read: {error}")
    return collector.cases, _bounded_errors(label, collector.problems)


class _NotJUnit(Exception):
    """The document's root element shows it is some other kind of XML file."""


class _DoctypeRefused(Exception):
    """The document declares a DOCTYPE, the only place entities can be defined."""


class _JUnitCollector:
    """ElementTree parser target that turns ``<testcase>`` elements into cases as they stream by."""

    def __init__(self):
        self.cases = []
        self.problems = []
        self._depth = 0
        self._seen_root = False
        self._case_attributes = None
        self._case_depth = 0
        self._case_outcome = "passed"

    def doctype(self, name, pubid, system):
        # The declaration names the root element: a coverage report's DOCTYPE is not our business.
        if _local_name(name) not in JUNIT_ROOT_TAGS:
            raise _NotJUnit()
        raise _DoctypeRefused()

    def start(self, tag, attributes):
        self._depth += 1
        tag = _local_name(tag)
        if not self._seen_root:
            self._seen_root = True
            if tag not in JUNIT_ROOT_TAGS:
                raise _NotJUnit()
        if tag == "testcase" and self._case_attributes is None:
            self._case_attributes = dict(attributes)
            self._case_depth = self._depth
            self._case_outcome = "passed"
        elif self._case_attributes is not None and self._depth == self._case_depth + 1:
            self._note_child(tag)

    def end(self, tag):
        if self._case_attributes is not None and self._depth == self._case_depth:
            self._finish_case()
        self._depth -= 1

    def close(self):
        return None

    def _note_child(self, tag):
        if tag in ("failure", "error"):
            self._case_outcome = "failed"
        elif tag == "skipped" and self._case_outcome == "passed":
            self._case_outcome = "skipped"

    def _finish_case(self):
        attributes, self._case_attributes = self._case_attributes, None
        name = attributes.get("name", "")
        if not name:
            self.problems.append(f"a <testcase> has no name attribute (case {len(self.cases) + 1})")
            return
        if self._case_outcome == "skipped":
            return
        classname = attributes.get("classname", "")
        self.cases.append({
            "name": f"{classname}.{name}" if classname else name,
            "success": self._case_outcome == "passed",
            "duration_seconds": _seconds(attributes.get("time")),
        })


def _case_from_summary_item(name, value):
    """One ``name: value`` pair of the dict shape; returns a case, or a problem message."""
    if not name:
        # The history keeps a task's own result as its case "": a case of that name would replace it.
        return f"a test has an empty name (its value: {_json_preview(value)})"
    if isinstance(value, bool):
        return {"name": name, "success": value, "duration_seconds": None}
    if isinstance(value, dict) and isinstance(value.get("success"), bool):
        return {"name": name, "success": value["success"], "duration_seconds": _seconds(value.get("elapsed"))}
    return f"test {name!r}: expected true, false or {{\"success\": true|false}}, got {_json_preview(value)}"


def _case_from_summary_entry(index, entry):
    """One entry of the list shape; returns a case, or a problem message."""
    if not isinstance(entry, dict):
        return f"entry {index}: expected an object, got {_json_preview(entry)}"
    name, success = entry.get("testName"), entry.get("success")
    if not isinstance(name, str) or not name:
        return f"entry {index}: \"testName\" must be a non-empty string"
    if not isinstance(success, bool):
        return f"entry {index} ({name!r}): \"success\" must be true or false"
    return {"name": name, "success": success, "duration_seconds": _seconds(entry.get("elapsed"))}


def _load_json(path):
    size = os.path.getsize(path)
    if size > MAX_TEST_SUMMARY_BYTES:
        raise ValueError(f"{size} bytes is more than the {MAX_TEST_SUMMARY_BYTES} bytes allowed")
    # utf-8-sig: Windows tools (PowerShell's Out-File) like to start files with a BOM.
    with open(path, encoding="utf-8-sig") as stream:
        return json.load(stream)


def _seconds(value):
    """A duration from JSON or an XML attribute; None when absent or not a finite, non-negative number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _xml_files(directory):
    found = []
    for root, _dirs, files in os.walk(directory):
        found.extend(os.path.join(root, name) for name in files if name.lower().endswith(".xml"))
    return sorted(found)


def _local_name(tag):
    """``{namespace}testcase`` -> ``testcase``: some runners put JUnit elements in a namespace."""
    return tag.rsplit("}", 1)[-1]


def _json_preview(value):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded_errors(label, problems):
    messages = [f"{label}: {problem}" for problem in problems[:MAX_ERRORS_PER_FILE]]
    if len(problems) > MAX_ERRORS_PER_FILE:
        messages.append(f"{label}: ... and {len(problems) - MAX_ERRORS_PER_FILE} more problems")
    return messages


def _extend(cases, errors, parsed):
    cases.extend(parsed[0])
    errors.extend(parsed[1])


# ---------------------------------------------------------------------------------------------
# The whole run


def make_result(outcome, *, exit_code=None, duration_seconds=0.0, error="", cases=(), case_parse_errors=(),
                artifacts=()):
    return {"result": outcome, "exit_code": exit_code, "duration_seconds": round(duration_seconds, 3),
            "error": error, "cases": list(cases), "case_parse_errors": list(case_parse_errors),
            "artifacts": list(artifacts)}


def fetch_assignment(api):
    try:
        assignment = api.retrying(lambda: api.request_json("GET", "assignment"))
    except ApiError as error:
        raise InfrastructureError(f"cannot fetch the assignment: {error}") from error
    if not isinstance(assignment, dict) or not isinstance(assignment.get("task"), dict) \
            or "source" not in assignment:
        raise InfrastructureError("the assignment has no task or no source")
    api.extend_retries_for(assignment)
    return assignment


class Agent:
    """One run, start to end: workspace, task, results, log and the final RESULT."""

    def __init__(self, options, api, stop):
        self.options = options
        self.api = api
        self.stop = stop
        self.workspace = Workspace(options.workdir, options.ccache_dir)
        self.shipper = None
        self.heartbeat = None

    def stop_heartbeat(self):
        """Once the RESULT is delivered (or given up): until then the run is alive, and an
        operator restarting meanwhile must not take it for lost."""
        if self.heartbeat is not None:
            self.heartbeat.finish()

    def run(self):
        """Returns the RESULT; the log has been shipped (as far as the API allowed) by then.
        The heartbeat goes on until `stop_heartbeat`."""
        try:
            log = self.workspace.open_log()
        except OSError as error:
            return make_result("error", error=f"cannot create the workspace in {self.workspace.root}: {error}")
        shipper = self.shipper = LogShipper(self.api, self.workspace.log_path)
        heartbeat = self.heartbeat = Heartbeat(self.api, self.options.heartbeat_seconds, self.stop)
        shipper.start()
        heartbeat.start()
        try:
            result = self._run_logged_guarded(log, heartbeat)
            log.note(f"result: {result['result']}" + (f" ({result['error']})" if result["error"] else ""))
        finally:
            heartbeat.phase = "reporting"
            log.close()
        if log.write_error and result["result"] in ("passed", "failed", "timeout"):
            # The task's output was cut too: its verdict cannot be trusted.
            result = {**result, "result": "error",
                      "error": f"cannot write the run's log: {log.write_error}; it is kept up to that point"}
        shipping_error = shipper.finish()
        if shipping_error:
            complain(f"the log could not be shipped completely: {shipping_error}")
        return result

    def _run_logged_guarded(self, log, heartbeat):
        """A bug in the agent is still reported, as ``error``, rather than leaving the run hanging."""
        try:
            return self._run_logged(log, heartbeat)
        except Exception as error:  # noqa: BLE001 - the last line of defence, the traceback is logged
            log.note("agent failure:\n" + traceback.format_exc())
            return make_result("error", error=f"agent failure: {error!r}")

    def _run_logged(self, log, heartbeat):
        try:
            assignment = fetch_assignment(self.api)
            heartbeat.phase = "preparing"
            prepare_workspace(self.workspace, assignment, self.api, self.stop, log)
        except StopRequested:
            return make_result(self.stop.reason, error=self.stop.message)
        except InfrastructureError as error:
            log.note(f"error: {error}")
            return make_result("error", error=str(error))
        return self._run_task(assignment, log, heartbeat)

    def _run_task(self, assignment, log, heartbeat):
        environment = task_environment(self.workspace, assignment, os.environ)
        log.limit_bytes = int(assignment["task"].get("max_log_mb") or DEFAULT_MAX_LOG_MB) * 1024 * 1024
        self.shipper.hold_beyond = log.head_bytes
        # looper_version 2 ran commands in the source checkout; later versions in $TEST_INPUTS.
        in_source = assignment["task"].get("working_directory") == "source"
        runner = CommandRunner(self.options.shell, self.workspace.src if in_source else self.workspace.inputs,
                               environment, log,
                               self.options.kill_grace_seconds, self.workspace.process_groups_path)
        task_run = TaskRun(assignment, self.workspace, runner, self.api, self.stop, heartbeat, log)
        started = time.monotonic()
        try:
            passed = task_run.execute()
        except InfrastructureError as error:
            log.note(f"error: {error}")
            return make_result("error", error=str(error), duration_seconds=time.monotonic() - started,
                               artifacts=task_run.artifacts)
        finally:
            runner.kill_all()
            report_escaped(kill_processes_of_run(environment["TEST_LOOPER_TEST_ID"]), log)
            if log.enforce_limit():  # what processes left running wrote last
                self.stop.request("failed", log.limit_message())
            if self.stop.reason == "failed":
                log.note(f"error: {self.stop.message}")
            self.shipper.hold_beyond = None  # nothing but the agent writes from here on
        duration = time.monotonic() - started
        heartbeat.phase = "collecting results"
        cases, parse_errors = collect_results(self.workspace.output)
        for message in parse_errors:
            log.note(f"test results: {message}")
        outcome = self.stop.reason or ("passed" if passed else "failed")
        return make_result(outcome, exit_code=0 if outcome == "passed" else task_run.first_failing_exit_code,
                           duration_seconds=duration, error=self._verdict_message(task_run),
                           cases=cases, case_parse_errors=parse_errors, artifacts=task_run.artifacts)

    def _verdict_message(self, task_run):
        if self.stop.reason:
            return self.stop.message
        return "; ".join(task_run.artifact_problems)


def complain(text):
    """A line on stderr, which may be a file on the disk that just filled up: a line that cannot
    be written must not keep the RESULT from being posted."""
    try:
        sys.stderr.write(f"testlooper agent: {text}\n")
        sys.stderr.flush()
    except OSError:
        pass


def deliver_result(api, result_path, result):
    """Writes ``result.json`` first (so nothing is lost), then posts the RESULT with retries."""
    try:
        with open(result_path, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
    except OSError as error:
        complain(f"cannot write result.json: {error}")
    try:
        api.retrying(lambda: api.request_json("POST", "result", result))
        return True
    except ApiError as error:
        complain(f"cannot post the result ({error}); it is in {result_path}")
        return False


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="testlooper-agent",
        description=f"Run one TestLooper task. The run's token is read from ${TOKEN_ENV}, or with "
                    "--from-stdin from one JSON line on standard input.")
    parser.add_argument("--api", required=True, help="base URL of the worker API")
    parser.add_argument("--run-id")
    parser.add_argument("--workdir", help="directory for the run's workspace")
    parser.add_argument("--from-stdin", action="store_true",
                        help='read runs from standard input, one JSON line {"run_id", "workdir", "token"[, "shell"]} '
                             "each, until its end: a runner starts agents ahead of time and keeps them")
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--kill-grace-seconds", type=float, default=2.0,
                        help="time between SIGTERM and SIGKILL when killing a process tree")
    parser.add_argument("--ccache-dir", help="persistent compiler cache (default: WORKDIR/ccache)")
    options = parser.parse_args(argv)
    if not options.from_stdin and not (options.run_id and options.workdir):
        parser.error("--run-id and --workdir are required without --from-stdin")
    options.shell = default_shell_prefix()
    return options


def read_run_from_stdin(options):
    """Blocks until the runner hands over a run; returns its token, or None on end of input."""
    line = sys.stdin.readline()
    if not line.strip():
        return None  # the runner needed no more agents
    handed = json.loads(line)
    options.run_id, options.workdir = str(handed["run_id"]), str(handed["workdir"])
    if handed.get("shell"):
        options.shell = str(handed["shell"])
    return str(handed["token"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in POD_MODES:
        return pod_main(argv)
    options = parse_arguments(argv)
    # Popped, not read: the task's commands must never see the token that could forge its result.
    token = os.environ.pop(TOKEN_ENV, "")
    if not options.from_stdin:
        if not token:
            sys.stderr.write(f"testlooper agent: ${TOKEN_ENV} is not set\n")
            return 2
        return run_once(options, token)
    # One run per line, until the end of input: a runner keeps its agents and saves Python's
    # start-up on every run after the first.
    status = 0
    while True:
        options.shell = default_shell_prefix()
        try:
            token = read_run_from_stdin(options)
        except (ValueError, KeyError, TypeError) as error:
            sys.stderr.write(f"testlooper agent: unreadable run on standard input: {error}\n")
            return 2
        if token is None:
            return status
        status = max(status, run_once(options, token))


def run_once(options, token):
    """Runs the one run named by ``options`` and reports it: 0 when the result was delivered."""
    try:
        api = ApiClient(options.api, options.run_id, token)
    except ValueError as error:
        sys.stderr.write(f"testlooper agent: {error}\n")
        return 2
    stop = StopSignal()
    install_signal_handlers(stop)
    agent = Agent(options, api, stop)
    try:
        result = agent.run()
        return 0 if deliver_result(api, agent.workspace.result_path, result) else 1
    finally:
        agent.stop_heartbeat()


# ---------------------------------------------------------------------------------------------
# Pod modes: "prepare" (the pod's init container) and "report" (its sidecar)
#
# In a pod the task's commands run in the test container, whose image needs nothing but /bin/sh,
# and never next to the run's token. So the agent runs twice, in the worker image:
#
#   agent.py prepare ...   lays out the workspace (the shared volume) as for a local run and
#                          writes the task's steps as one /bin/sh script there;
#   agent.py report ...    runs beside the test container: ships the log, heartbeats, stops the
#                          script at the timeout or on cancellation, uploads each stage's
#                          artifacts once it ran, then parses the results and posts the RESULT.
#
# The two halves talk through files in WORKSPACE/agent/pod/ (docs/pods.md):
#   stages.sh   the script; it appends its output to WORKSPACE/log.txt
#   events      one line per event, appended by the script: "begin", "stage N", "start STEP",
#               "exit STEP CODE", "pack N", "end FAILED FIRST_FAILING_CODE" (as Prow's marker
#               files)
#   ack         a FIFO: after "pack N" the script waits on it until the report half has packed
#               stage N's artifacts, so they hold what the stage left, as locally
#   control     a FIFO: the report half writes "TERM" or "KILL", the script's watchdog signals
#               the running step; "stop" (a file) names why, and keeps the next steps from running
#   pid         the running step's process id, for the watchdog
# Every file there is one the task can replace: the report half opens them without following
# symlinks, and never echoes what it reads from them.

POD_MODES = ("prepare", "report")
API_URL_ENV = "TESTLOOPER_API_URL"
POD_FILES_DIRECTORY = "pod"
POD_SCRIPT_NAME = "stages.sh"
POD_POLL_SECONDS = 0.1
POD_EVENT_LINE_LIMIT = 4096
POD_ACK_SECONDS = 10
# After a stop, the script has this long beyond the kill grace and the cleanup's own time to
# write "end"; past it the report half concludes the test container is gone.
POD_END_WAIT_SECONDS = 5
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class PodFiles:
    """The paths of the files the two halves share, under ``WORKSPACE/agent/pod``."""

    def __init__(self, workspace):
        self.directory = workspace.agent_path(POD_FILES_DIRECTORY)
        self.script = os.path.join(self.directory, POD_SCRIPT_NAME)
        self.events = os.path.join(self.directory, "events")
        self.control = os.path.join(self.directory, "control")
        self.ack = os.path.join(self.directory, "ack")
        self.pid = os.path.join(self.directory, "pid")
        self.stop = os.path.join(self.directory, "stop")


def parse_pod_arguments(argv):
    mode = argv[0]
    parser = argparse.ArgumentParser(
        prog=f"testlooper-agent {mode}",
        description="prepare: lay out a pod's workspace and write the task's script (init container); "
                    "report: watch that script, then report the run (sidecar). See docs/pods.md.")
    parser.add_argument("--api", default=os.environ.get(API_URL_ENV, ""),
                        help=f"base URL of the worker API (default ${API_URL_ENV})")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--workspace", required=True, help="the volume shared with the test container")
    parser.add_argument("--token-file", help=f"file holding the run's token (else ${TOKEN_ENV})")
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--kill-grace-seconds", type=float, default=2.0,
                        help="time between TERM and KILL when a step is stopped")
    if mode == "prepare":
        parser.add_argument("--install-agent", help="copy this agent file there first (for the report container)")
    else:
        parser.add_argument("--result-file", required=True,
                            help="where the RESULT is kept if it cannot be posted (not in the workspace)")
    options = parser.parse_args(argv[1:])
    if not options.api:
        parser.error(f"the worker API's URL is needed: --api URL or ${API_URL_ENV}")
    return mode, options


def read_token(options):
    """The token from ``--token-file`` (a mounted Secret), else the environment (popped)."""
    token = os.environ.pop(TOKEN_ENV, "")
    if options.token_file:
        with open(options.token_file, encoding="ascii") as source:
            token = source.read().strip()
    return token


def pod_main(argv):
    mode, options = parse_pod_arguments(argv)
    try:
        token = read_token(options)
    except (OSError, ValueError) as error:
        complain(f"cannot read the token file {options.token_file}: {error}")
        return 2
    if not token:
        complain(f"no token: give --token-file or set ${TOKEN_ENV}")
        return 2
    try:
        api = ApiClient(options.api, options.run_id, token)
    except ValueError as error:
        complain(str(error))
        return 2
    stop = StopSignal()
    if mode == "prepare":
        install_signal_handlers(stop)
        return pod_prepare(options, api, stop)
    install_report_signal_handlers(stop)
    return pod_report(options, api, stop)


# -- prepare -----------------------------------------------------------------------------------


def pod_prepare(options, api, stop):
    """Lays out the workspace and writes the script; 0 when the test container may start.

    A failure is reported here (log shipped, RESULT posted) and the exit status is 1, so the pod
    stops before its test container starts.
    """
    os.umask(0o002)  # the test container may run as another user of the pod's group (fsGroup)
    if options.install_agent:
        try:
            shutil.copyfile(os.path.abspath(__file__), options.install_agent)
        except OSError as error:
            complain(f"cannot copy the agent to {options.install_agent}: {error}")
            return 2
    workspace = Workspace(options.workspace)
    try:
        log = workspace.open_log()
    except OSError as error:
        result = make_result("error", error=f"cannot create the workspace in {workspace.root}: {error}")
        deliver_result(api, os.devnull, result)
        return 1
    heartbeat = Heartbeat(api, options.heartbeat_seconds, stop)
    heartbeat.phase = "preparing"
    heartbeat.start()
    result = None
    try:
        assignment = fetch_assignment(api)
        check_shell_names(assignment["task"])  # before fetching what could not be used
        prepare_workspace(workspace, assignment, api, stop, log)
        write_pod_files(workspace, assignment)
        log.note("the workspace is ready; the test container runs the task's steps")
    except StopRequested:
        result = make_result(stop.reason, error=stop.message)
    except InfrastructureError as error:
        log.note(f"error: {error}")
        result = make_result("error", error=str(error))
    except Exception as error:  # noqa: BLE001 - reported as error, with the traceback in the log
        log.note("agent failure:\n" + traceback.format_exc())
        result = make_result("error", error=f"agent failure: {error!r}")
    finally:
        heartbeat.finish()
        log.close()
    if result is None:
        return 0
    shipper = LogShipper(api, workspace.log_path)
    shipper.start()
    shipping_error = shipper.finish()
    if shipping_error:
        complain(f"the log could not be shipped completely: {shipping_error}")
    deliver_result(api, workspace.result_path, result)
    return 1


def write_pod_files(workspace, assignment):
    """The files the test container and the report container share (see PodFiles)."""
    files = PodFiles(workspace)
    try:
        os.makedirs(files.directory, exist_ok=True)
        for path in (files.events, files.pid):
            open(path, "wb").close()
        os.mkfifo(files.control, 0o666)
        os.mkfifo(files.ack, 0o666)
        with open(files.script, "w", encoding="utf-8") as out:
            out.write(stage_script(assignment, workspace, files))
    except OSError as error:
        raise InfrastructureError(f"cannot write the pod's stage script: {error}") from error


def check_shell_names(task):
    """The script exports the task's variables: a name /bin/sh cannot export is an error (the
    local agent passes any name through the process environment)."""
    for name in task.get("variables", {}):
        if not _SHELL_NAME.match(str(name)):
            raise InfrastructureError(
                f"variable {name!r} cannot reach the task through /bin/sh: a name is letters, digits and _")


def stage_script(assignment, workspace, files):
    """The task's steps as one /bin/sh script, with the local agent's order and rules: the setup
    script, then the stages by ``order``; a stage runs while all went well or when it is
    ``always_run``; a listing stage lists, then runs the listed tests; cleanups always run."""
    task = assignment["task"]
    check_shell_names(task)
    environment = task_environment(workspace, assignment, {})
    q = shlex.quote
    in_source = task.get("working_directory") == "source"
    directory = workspace.src if in_source else workspace.inputs
    lines = [
        "#!/bin/sh",
        f"# The steps of run {assignment.get('run_id', '')}, written by the testlooper agent (prepare).",
        "# It needs /bin/sh only; the report container reads its events and stops it (docs/pods.md).",
        f"tl_dir={q(files.directory)}",
        f"exec >>{q(workspace.log_path)} 2>&1 </dev/null",
        "tl_note() { printf '[testlooper] %s\\n' \"$*\"; }",
        "tl_event() { printf '%s\\n' \"$*\" >>\"$tl_dir/events\"; }",
        "tl_failed=0",
        "tl_first=0",
        "tl_why=",
        "tl_stopped() {",
        "  [ -e \"$tl_dir/stop\" ] || return 1",
        "  read -r tl_why <\"$tl_dir/stop\" || :",
        "}",
        "tl_exec() {  # step, label, command[, variable, value]",
        "  tl_note \"$2: $3\"",
        "  tl_event \"start $1\"",
        "  if [ $# -ge 5 ]; then (export \"$4=$5\"; exec /bin/sh -c \"$3\") & else /bin/sh -c \"$3\" & fi",
        "  tl_pid=$!",
        "  printf '%s\\n' \"$tl_pid\" >\"$tl_dir/pid\"",
        "  wait \"$tl_pid\"",
        "  tl_status=$?",
        "  : >\"$tl_dir/pid\"",
        "  tl_note \"$2: exit code $tl_status\"",
        "  tl_event \"exit $1 $tl_status\"",
        "}",
        "tl_step() {  # a step that counts towards the verdict",
        "  if tl_stopped; then tl_note \"$2: not run ($tl_why)\"; return 1; fi",
        "  tl_exec \"$@\"",
        "  if [ \"$tl_status\" != 0 ] && [ \"$tl_first\" = 0 ]; then tl_first=$tl_status; fi",
        "  [ \"$tl_status\" = 0 ]",
        "}",
        "tl_stage() {  # number, count, always_run",
        "  if tl_stopped; then tl_note \"stage $1/$2: not run ($tl_why)\"; return 1; fi",
        "  if [ \"$tl_failed\" != 0 ] && [ \"$3\" != 1 ]; then",
        "    tl_note \"stage $1/$2: skipped, an earlier step failed\"; return 1",
        "  fi",
        "  tl_event \"stage $1\"",
        "}",
        "# The watchdog: signals the running step when the report container asks.",
        "( exec 3<>\"$tl_dir/control\"",
        "  while read -r tl_signal <&3; do",
        "    tl_target=",
        "    read -r tl_target <\"$tl_dir/pid\" || :",
        "    case $tl_signal in",
        "      TERM|KILL) [ -n \"$tl_target\" ] && kill \"-$tl_signal\" \"$tl_target\" 2>/dev/null ;;",
        "    esac",
        "  done ) &",
        "tl_watchdog=$!",
    ]
    for name, value in sorted(environment.items()):
        lines.append(f"{name}={q(value)}; export {name}")
    lines += [
        "tl_event begin",
        f"if cd {q(directory)}; then",
    ]
    body = []
    if task.get("setup_script"):
        body.append(f"tl_step setup setup_script {q(task['setup_script'])} || tl_failed=1")
    stages = sorted_stages(task)
    for number, stage in enumerate(stages, 1):
        label = f"stage {number}/{len(stages)}"
        body.append(f"if tl_stage {number} {len(stages)} {1 if stage.get('always_run') else 0}; then")
        body += ["  " + line for line in _stage_lines(number, label, stage, workspace)]
        if stage.get("cleanup"):
            body.append(f"  tl_exec s{number}-cleanup {q(label + ' cleanup')} {q(stage['cleanup'])}")
        if stage.get("artifacts"):
            body.append(f"  tl_event 'pack {number}'; read -r tl_ack <\"$tl_dir/ack\" || :")
        body.append("fi")
    lines += ["  " + line for line in body or [":"]]
    lines += [
        "else",
        f"  tl_note {q('cannot enter ' + directory)}; tl_failed=1",
        "fi",
        "kill \"$tl_watchdog\" 2>/dev/null",
        "tl_event \"end $tl_failed $tl_first\"",
        "if [ \"$tl_failed\" = 0 ]; then exit 0; elif [ \"$tl_first\" != 0 ]; then exit \"$tl_first\"; else exit 1; fi",
        "",
    ]
    return "\n".join(lines)


def _stage_lines(number, label, stage, workspace):
    q = shlex.quote
    if not stage.get("list_tests_command"):
        if not stage.get("command"):
            return [":"]
        return [f"tl_step s{number} {q(label + ' command')} {q(stage['command'])} || tl_failed=1"]
    test_list = q(workspace.agent_path(f"tests-stage-{number}.txt"))
    run_tests = stage.get("run_tests_command") or stage.get("command")
    listed = [f"tl_step s{number}-run {q(label + ' run_tests_command')} {q(run_tests)} "
              f"TEST_LOOPER_TESTS_TO_RUN {test_list} || tl_failed=1"] if run_tests else [":"]
    missing = q(f"{label}: list_tests_command did not write $TEST_LOOPER_TEST_LIST_OUTPUT")
    return [
        f"if tl_step s{number}-list {q(label + ' list_tests_command')} {q(stage['list_tests_command'])} "
        f"TEST_LOOPER_TEST_LIST_OUTPUT {test_list}; then",
        f"  if [ -f {test_list} ]; then",
        *["    " + line for line in listed],
        f"  else tl_note {missing}; tl_failed=1; fi",
        "else tl_failed=1; fi",
    ]


# -- report ------------------------------------------------------------------------------------


def install_report_signal_handlers(stop):
    """In a pod, SIGTERM comes from Kubernetes (pod deleted, evicted, node drained, or past its
    activeDeadlineSeconds), not from a user: unless the API cancelled the run or its time was
    up already, that is the infrastructure failing, an ``error`` the operator may retry."""
    def handle(signum, _frame):
        stop.request("error", f"the pod was stopped by Kubernetes ({signal.Signals(signum).name}: "
                              "deleted, evicted, or past its activeDeadlineSeconds)")

    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), handle)


def open_shared_file(path, flags, mode=0o664, fifo=False):
    """Opens a file of the shared workspace without following a symlink the task may have put
    in its place (the report container can read the run's token; the task must not make it
    read that instead). Never blocks (a FIFO put in a file's place would block a plain open).
    Returns a descriptor of a regular file, or of a FIFO when ``fifo``."""
    descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    kind = os.fstat(descriptor).st_mode
    if not (stat.S_ISFIFO(kind) if fifo else stat.S_ISREG(kind)):
        os.close(descriptor)
        raise OSError(f"{path} is not a {'FIFO' if fifo else 'regular file'}")
    return descriptor


class PodEvents:
    """Reads the script's events file as it grows; only complete lines count."""

    def __init__(self, path):
        self._descriptor = open_shared_file(path, os.O_RDONLY)
        self._pending = b""

    def read(self):
        """The complete lines written since the last call (at most ~1 MiB of them: a task
        flooding the file costs neither memory nor an endless read)."""
        events = []
        for _ in range(16):
            block = os.read(self._descriptor, 65536)
            if not block:
                break
            self._pending += block
        *complete, self._pending = self._pending.split(b"\n")
        if len(self._pending) > POD_EVENT_LINE_LIMIT:
            self._pending = b""  # not a line the script wrote
        for line in complete:
            words = line.decode("ascii", "replace").split()
            if words:
                events.append(words)
        return events

    def close(self):
        os.close(self._descriptor)


class PodScriptWatch:
    """Follows the script through its events and stops it when the run must stop."""

    def __init__(self, files, timeout_seconds, kill_grace_seconds, stop, heartbeat, log, pack=None):
        self.files = files
        self.pack = pack  # pack(stage number): ships that stage's artifacts
        self.timeout_seconds = timeout_seconds
        self.kill_grace = kill_grace_seconds
        self.stop = stop
        self.heartbeat = heartbeat
        self.log = log
        self.begun_at = None
        self.ended_at = None
        self.failed = None
        self.first_failing_exit_code = None
        self._step = None
        self._step_started = None
        self._stop_sent_at = None
        self._last_signal_at = None
        self._control_problem_noted = False

    def follow(self):
        """Returns when the script has ended, or when waiting for it is pointless."""
        events = PodEvents(self.files.events)
        try:
            while True:
                for event in events.read():
                    self._note_event(event)
                if self.ended_at is not None:
                    return
                now = time.monotonic()
                if self.log.enforce_limit():
                    self.stop.request("failed", self.log.limit_message())
                if self.begun_at is not None and now >= self.begun_at + self.timeout_seconds:
                    self.stop.request("timeout", f"timed out after {self.timeout_seconds} s")
                if self.stop.reason and self._stop_script(now):
                    for event in events.read():  # what the script wrote while it was stopped
                        self._note_event(event)
                    return
                time.sleep(POD_POLL_SECONDS)
        finally:
            events.close()

    def _note_event(self, words):
        kind = words[0]
        if kind == "begin" and self.begun_at is None:
            self.begun_at = time.monotonic()
            self.heartbeat.phase = "running"
        elif kind == "pack" and len(words) == 2 and words[1].isdigit():
            if self.pack is not None:
                self.pack(int(words[1][:6]))
            self._acknowledge()
        elif kind == "start" and len(words) == 2:
            self._step, self._step_started = words[1][:80], time.monotonic()
            self.heartbeat.phase = self._step
        elif kind == "end" and len(words) == 3 and self.ended_at is None:
            self.ended_at = time.monotonic()
            self.failed = words[1] != "0"
            code = _small_int(words[2])
            self.first_failing_exit_code = code if code else None

    def _stop_script(self, now):
        """Asks the script to stop, escalating; returns True when there is nothing to wait for."""
        if self._stop_sent_at is None:
            self._stop_sent_at = self._last_signal_at = now
            self._write_stop_file()
            if self.begun_at is None:
                return True  # the test container never started: it will run no step now
            self.log.note(f"stopping the task: {self.stop.reason}")
            self._signal("TERM")
            return False
        in_cleanup = (self._step or "").endswith("-cleanup") and self._step_started >= self._stop_sent_at
        allowance = CLEANUP_SECONDS_AFTER_STOP if in_cleanup else self.kill_grace
        since = self._step_started if in_cleanup else self._last_signal_at
        if now - since >= allowance:
            self._last_signal_at = now
            if not self._signal("KILL"):
                self.log.note("the test container's script is gone: it was stopped without finishing")
                return True
        # Kubernetes' SIGTERM leaves little time: report rather than wait for a cleanup.
        patience = self.kill_grace + POD_END_WAIT_SECONDS
        if self.stop.reason != "error":
            patience += CLEANUP_SECONDS_AFTER_STOP
        if now - self._stop_sent_at >= patience:
            self.log.note("the test container did not finish its script after being stopped")
            return True
        return False

    def _acknowledge(self):
        """Lets the script go on after "pack N". It opens the FIFO just after writing the event:
        until it does, opening it to write finds no reader (ENXIO), so this tries again a while."""
        give_up = time.monotonic() + POD_ACK_SECONDS
        while True:
            try:
                descriptor = open_shared_file(self.files.ack, os.O_WRONLY, fifo=True)
            except OSError as error:
                if error.errno == errno.ENXIO and time.monotonic() < give_up:
                    time.sleep(0.01)
                    continue
                self.log.note(f"cannot let the test container go on after packing: {error.strerror or error}")
                return
            try:
                os.write(descriptor, b"done\n")
            finally:
                os.close(descriptor)
            return

    def _write_stop_file(self):
        try:
            descriptor = open_shared_file(self.files.stop, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(descriptor, f"{self.stop.reason}\n".encode("ascii"))
            finally:
                os.close(descriptor)
        except OSError as error:
            self.log.note(f"cannot write {self.files.stop}: {error}")

    def _signal(self, name):
        """Writes to the watchdog's FIFO; False when no watchdog reads it any more."""
        try:
            descriptor = open_shared_file(self.files.control, os.O_WRONLY, fifo=True)
            try:
                os.write(descriptor, f"{name}\n".encode("ascii"))
            finally:
                os.close(descriptor)
            return True
        except OSError as error:  # ENXIO: no watchdog reads (the script has ended, or is gone)
            if error.errno == errno.ENXIO:
                return False
            if not self._control_problem_noted:
                self._control_problem_noted = True
                self.log.note(f"cannot signal the test container's step: {error.strerror or error}")
            return True


def _small_int(text):
    return int(text) if text.isdigit() and len(text) <= 6 else None


def pod_report(options, api, stop):
    """Reports the run the test container executes; 0 when the RESULT was delivered."""
    workspace = Workspace(options.workspace)
    files = PodFiles(workspace)
    try:
        log_descriptor = open_shared_file(workspace.log_path, os.O_RDWR | os.O_APPEND)
    except OSError as error:
        result = make_result("error", error=f"cannot open the run's log {workspace.log_path}: {error}")
        return 0 if deliver_result(api, options.result_file, result) else 1
    # The log is read and cut through this descriptor's /proc alias: a path the task replaced
    # by a link after this point is never followed.
    log_alias = f"/proc/self/fd/{log_descriptor}"
    log = TaskLog(log_alias, truncate=False)
    shipper = LogShipper(api, log_alias)
    # The test container may already be writing: nothing is shipped until the log's limit is
    # known, since a cut rewrites what follows the head.
    shipper.hold_beyond = 0
    heartbeat = Heartbeat(api, options.heartbeat_seconds, stop)
    heartbeat.phase = "waiting for the test container"
    shipper.start()
    heartbeat.start()
    # The heartbeat goes on until the RESULT is delivered: shipping the rest of the log and the
    # RESULT may wait minutes for an API (or its store) that is down, and a run that is only
    # waiting to report must not be taken for a lost one.
    try:
        try:
            try:
                result = _report_run(options, api, stop, workspace, files, log, shipper, heartbeat)
            except Exception as error:  # noqa: BLE001 - the last line of defence, the traceback is logged
                log.note("agent failure:\n" + traceback.format_exc())
                result = make_result("error", error=f"agent failure: {error!r}")
            log.note(f"result: {result['result']}" + (f" ({result['error']})" if result["error"] else ""))
        finally:
            log.close()
        heartbeat.phase = "reporting"
        shipper.hold_beyond = None
        shipping_error = shipper.finish()
        if shipping_error:
            complain(f"the log could not be shipped completely: {shipping_error}")
        os.close(log_descriptor)
        return 0 if deliver_result(api, options.result_file, result) else 1
    finally:
        heartbeat.finish()


def _report_run(options, api, stop, workspace, files, log, shipper, heartbeat):
    try:
        assignment = fetch_assignment(api)
    except InfrastructureError as error:
        log.note(f"error: {error}")
        return make_result("error", error=str(error))
    task = assignment["task"]
    log.limit_bytes = int(task.get("max_log_mb") or DEFAULT_MAX_LOG_MB) * 1024 * 1024
    shipper.hold_beyond = log.head_bytes
    task_run = TaskRun(assignment, workspace, None, api, stop, heartbeat, log)
    stages = sorted_stages(task)

    def pack(number):
        """As locally: after each stage that ran, unless cancelled; an upload failure is an error."""
        if stop.reason in ("cancelled", "error") or not 1 <= number <= len(stages):
            return
        try:
            task_run._ship_artifacts(stages[number - 1].get("artifacts", []))
        except InfrastructureError as error:
            log.note(f"error: {error}")
            stop.request("error", str(error))
        heartbeat.phase = "running"

    watch = PodScriptWatch(files, task.get("timeout_seconds") or DEFAULT_TIMEOUT_SECONDS,
                           options.kill_grace_seconds, stop, heartbeat, log, pack)
    try:
        watch.follow()
    except OSError as error:
        log.note(f"error: cannot follow the test container's script: {error}")
        return make_result("error", error=f"cannot follow the test container's script: {error}")
    finally:
        if log.enforce_limit() and watch.ended_at is not None:
            stop.request("failed", log.limit_message())
        shipper.hold_beyond = None  # the test container writes no more (or is being killed)
    ended = watch.ended_at is not None
    duration = ((watch.ended_at or time.monotonic()) - watch.begun_at) if watch.begun_at is not None else 0.0
    if watch.begun_at is None and stop.reason == "error":
        stop.message += "; the test container had not started the task"
    heartbeat.phase = "collecting results"
    cases, parse_errors = collect_results(workspace.output, confine_to=workspace.root)
    for message in parse_errors:
        log.note(f"test results: {message}")
    passed = ended and not watch.failed and not task_run.artifact_problems
    outcome = stop.reason or ("passed" if passed else "failed")
    error = stop.message if stop.reason else "; ".join(task_run.artifact_problems)
    return make_result(outcome, exit_code=0 if outcome == "passed" else watch.first_failing_exit_code,
                       duration_seconds=duration, error=error, cases=cases, case_parse_errors=parse_errors,
                       artifacts=task_run.artifacts)


if __name__ == "__main__":
    sys.exit(main())
