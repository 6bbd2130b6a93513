"""The operator's worker API backend: the protocol (protocol.py) over state that survives an
operator restart.

- Tokens are derived (tokens.py): HMAC of the run id with the operator's secret.
- Which runs exist, and what each is, comes from a `RunDirectory` (the operator reads its
  TestRuns); nothing about a run is kept in the operator's memory.
- The source is `git archive` of the commit from the Repo's bare mirror; a source input is the
  same of a sub-tree; a build input is the artifact its producing run uploaded.
- Log chunks go to a capped Redis stream per run (store/logstream.py).
- Artifacts go to an `ArtifactStore` (a volume on disk here).
- Heartbeats, and the first RESULT of each run, are kept in Redis; a RESULT is recorded into the
  history store (the same code as `--store redis://`), keyed by (repo, commit, task, run index,
  attempt), so posted twice, by 50 runs at once, or again after a restart, it lands once.

Redis and the disk are reached from worker threads (`asyncio.to_thread`): the operator's loop
never waits on them.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol
from urllib.parse import quote

import redis

from testlooper.store.base import CaseResult, HistoryStore, RunRecord
from testlooper.store.logstream import LogGap, LogStreams
from testlooper.worker.agent import input_tar_filter
from testlooper.workerapi import tokens
from testlooper.workerapi.local import safe_file_name
from testlooper.workerapi.protocol import ARTIFACT_FORMATS, ApiError, Backend, Served, input_route


@dataclass(frozen=True)
class InputSource:
    """Where an input comes from: ``source`` (``path`` of the commit's tree; of ``commit`` in
    the mirror ``git_dir`` when they are set, for another repository's pinned commit) or
    ``build`` (the artifact ``artifact`` uploaded by the run ``run_id``). ``unavailable`` says
    why it cannot be served (a pinned repository with no mirror): the agent is told so."""

    kind: str
    path: str = ""
    run_id: str = ""
    artifact: str = ""
    git_dir: str = ""
    commit: str = ""
    unavailable: str = ""


@dataclass(frozen=True)
class ClusterRun:
    """One run (TestRun, run index, attempt), as the operator describes it."""

    run_id: str
    assignment: dict  # the ASSIGNMENT, without source and inputs (filled in here)
    git_dir: str  # the Repo's bare mirror
    commit: str
    repo: str  # the history store's repository id
    task: str
    kind: str
    run_index: int  # in the history store
    attempt: int
    branch: str = ""
    inputs: dict = field(default_factory=dict)  # key -> InputSource
    cancel: bool = False
    source: InputSource | None = None  # its source, when not ``commit`` of ``git_dir`` (a pinned build's)


class RunDirectory(Protocol):
    async def describe(self, run_id: str) -> ClusterRun | None:
        """The run, or None when there is no such run (anymore)."""


def parse_run_id(run_id: str) -> tuple[str, str, int, int]:
    """``{namespace}.{testrun}.{index}.{attempt}`` -> its parts (names are DNS labels: no dot)."""
    parts = run_id.split(".")
    if len(parts) != 4 or not all(parts) or not parts[2].isdigit() or not parts[3].isdigit():
        raise ValueError(f"not a run id: {run_id!r}")
    return parts[0], parts[1], int(parts[2]), int(parts[3])


def make_run_id(namespace: str, testrun: str, index: int, attempt: int) -> str:
    return f"{namespace}.{testrun}.{index}.{attempt}"


class DiskArtifactStore:
    """Artifacts on the operator's volume: ``root/<run>/<name>.tar.gz|.zip`` or ``<name>/``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, run_id: str, name: str, archive_format: str) -> str:
        return os.path.join(self.root, safe_file_name(run_id),
                            safe_file_name(name) + ARTIFACT_FORMATS[archive_format])

    def find(self, run_id: str, name: str) -> Served | None:
        for archive_format in ARTIFACT_FORMATS:
            path = self.path(run_id, name, archive_format)
            if os.path.exists(path):
                return Served("directory" if os.path.isdir(path) else "file", path)
        return None

    async def put(self, run_id: str, name: str, archive_format: str, body, length: int) -> None:
        final = self.path(run_id, name, archive_format)
        directory = os.path.dirname(final)
        await asyncio.to_thread(os.makedirs, directory, exist_ok=True)
        handle, partial = await asyncio.to_thread(tempfile.mkstemp, dir=directory, prefix=".upload-")
        out = os.fdopen(handle, "wb")
        try:
            async for block in body:
                await asyncio.to_thread(out.write, block)
            await asyncio.to_thread(out.close)
            if archive_format == "Files":
                await asyncio.to_thread(_extract_files, partial, final)
            else:
                await asyncio.to_thread(os.replace, partial, final)
        except OSError as error:
            raise ApiError(507, f"cannot store artifact {name!r}: {error.strerror or error}") from None
        finally:
            out.close()
            if os.path.exists(partial):
                os.remove(partial)


S3_EXTENSIONS = {"Tar": ".tar.gz", "Zip": ".zip", "Files": ".tar"}  # a Files artifact is kept as its tar


class S3ArtifactStore:
    """Artifacts in an S3 bucket (boto3: credentials and ``AWS_ENDPOINT_URL`` from the
    environment). An upload passes through the operator (spooled to ``spool_dir``, then sent
    in parts); a consumer downloads its inputs straight from S3 through a presigned GET URL,
    which the agent fetches without its token."""

    def __init__(self, bucket: str, *, prefix: str = "", spool_dir: str, presign_seconds: int = 6 * 3600,
                 client=None):
        import boto3  # only an operator configured for S3 pays for the import
        import botocore.config

        self.bucket = bucket
        self.prefix = prefix
        self.spool_dir = os.path.abspath(spool_dir)
        self.presign_seconds = presign_seconds
        # A few quick tries: botocore's defaults (60 s to connect, 5 tries) would hold a request,
        # or the operator's start, for minutes when S3 does not answer; the agent retries anyway.
        config = botocore.config.Config(connect_timeout=10, retries={"mode": "standard", "max_attempts": 3})
        self._s3 = client or boto3.session.Session().client("s3", config=config)

    @property
    def endpoint(self) -> str:
        return self._s3.meta.endpoint_url

    def check(self) -> str:
        """What keeps the bucket from being used, in one line, or "" when it answers."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            return "no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or an instance role)"
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code") or "")
            if code in ("404", "NoSuchBucket"):
                return f"there is no bucket {self.bucket} at {self.endpoint}"
            if code in ("403", "AccessDenied"):
                return f"access to bucket {self.bucket} at {self.endpoint} is denied to these credentials"
            return f"{self.endpoint} answered {code or type(error).__name__}"
        except BotoCoreError as error:
            return f"{self.endpoint} does not answer: {' '.join(str(error).split())}"
        return ""

    def key(self, run_id: str, name: str, archive_format: str) -> str:
        return f"{self.prefix}{safe_file_name(run_id)}/{safe_file_name(name)}{S3_EXTENSIONS[archive_format]}"

    async def put(self, run_id: str, name: str, archive_format: str, body, length: int) -> None:
        await asyncio.to_thread(os.makedirs, self.spool_dir, exist_ok=True)
        handle, partial = await asyncio.to_thread(tempfile.mkstemp, dir=self.spool_dir, prefix=".upload-")
        out = os.fdopen(handle, "wb")
        try:
            async for block in body:
                await asyncio.to_thread(out.write, block)
            await asyncio.to_thread(out.close)
            await asyncio.to_thread(self._s3.upload_file, partial, self.bucket, self.key(run_id, name, archive_format))
        except OSError as error:
            raise ApiError(507, f"cannot spool artifact {name!r}: {error.strerror or error}") from None
        except Exception as error:  # botocore's: S3 down or refusing; the agent retries on 503
            raise ApiError(503, f"cannot store artifact {name!r} in S3: {type(error).__name__}") from None
        finally:
            out.close()
            if os.path.exists(partial):
                os.remove(partial)

    def presigned_url(self, run_id: str, name: str) -> str | None:
        """A GET URL of the artifact, or None when the run uploaded none by that name."""
        from botocore.exceptions import ClientError

        for archive_format in S3_EXTENSIONS:
            key = self.key(run_id, name, archive_format)
            try:
                self._s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError:
                continue
            return self._s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                   ExpiresIn=self.presign_seconds)
        return None

    def find(self, run_id: str, name: str) -> Served | None:
        return None  # never streamed by the operator: see presigned_url


def _extract_files(archive: str, directory: str) -> None:
    staging = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".files-")
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter=input_tar_filter)
    except tarfile.TarError as error:
        shutil.rmtree(staging)
        raise ApiError(400, f"the Files artifact is not a safe tar: {error}") from None
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(staging, directory)


class SourceCache:
    """Tarballs of the trees served, kept on the artifact volume and sent with sendfile: the runs
    of one commit (often hundreds) share one `git archive`. The first run of a tree gets the
    archive streamed from git while it is written here too (so it waits for nothing more);
    runs asking while that is under way are streamed from git as well. At most ``max_bytes``
    are kept, the least recently served go first. A tarball that cannot be written (a full
    disk) only means the next run streams again."""

    def __init__(self, root: str, max_bytes: int = 4 * 1024 ** 3):
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self._writing: set[str] = set()

    def _path(self, git_dir: str, tree: str) -> str:
        digest = hashlib.sha256(f"{os.path.abspath(git_dir)}\0{tree}".encode()).hexdigest()[:32]
        return os.path.join(self.root, digest + ".tar")

    def served(self, git_dir: str, tree: str) -> Served:
        path = self._path(git_dir, tree)
        if os.path.exists(path):
            try:
                os.utime(path)  # recently served: evicted last
            except OSError:
                pass
            return Served("file", path)
        if path in self._writing:
            return Served("git", git_dir, tree)
        return Served("git", git_dir, tree, tee=_CacheWriter(self, path))

    def _evict(self, keep: str) -> None:
        entries = []
        for name in os.listdir(self.root):
            if name.endswith(".tar"):
                full = os.path.join(self.root, name)
                try:
                    status = os.stat(full)
                except OSError:
                    continue
                entries.append((status.st_mtime, status.st_size, full))
        total = sum(size for _, size, _ in entries)
        for _, size, full in sorted(entries):
            if total <= self.max_bytes:
                break
            if full != keep:
                try:
                    os.remove(full)  # a request sending it keeps its open file
                except OSError:
                    continue
                total -= size


class _CacheWriter:
    """Receives the blocks a streamed `git archive` sends, and files them once it is whole."""

    def __init__(self, cache: SourceCache, path: str):
        self._cache = cache
        self._path = path
        self._partial = f"{path}.{os.getpid()}.{id(self)}.partial"
        self._out = None
        cache._writing.add(path)

    def write(self, block: bytes) -> None:
        if self._out is False:
            return
        try:
            if self._out is None:
                os.makedirs(self._cache.root, exist_ok=True)
                self._out = open(self._partial, "wb")
            self._out.write(block)
        except OSError:
            self.abort()
            self._out = False  # the stream goes on; only the cache gives up

    def finish(self) -> None:
        if not self._out:
            self.abort()
            return
        try:
            self._out.close()
            os.replace(self._partial, self._path)
            self._cache._evict(keep=self._path)
        except OSError:
            self.abort()
        finally:
            self._cache._writing.discard(self._path)

    def abort(self) -> None:
        if self._out:
            self._out.close()
        if os.path.exists(self._partial):
            os.remove(self._partial)
        self._cache._writing.discard(self._path)


# The kept RESULT only guards against duplicates and feeds the TestRun; the history store keeps
# the run for good. A RESULT posted again after this long is recorded again, which replaces it.
RESULT_KEEP_SECONDS = 30 * 24 * 3600


class ClusterBackend(Backend):
    """``on_result(run, result)`` is awaited once the RESULT is kept and recorded (the operator
    updates the TestRun then); it may be awaited again for the same run after a restart, with
    the same result, so it must be idempotent too."""

    def __init__(self, *, secret: bytes, runs: RunDirectory, client: redis.Redis, history: HistoryStore,
                 artifacts: DiskArtifactStore | S3ArtifactStore, logs: LogStreams | None = None,
                 source_cache: SourceCache | None = None,
                 on_result: Callable[[ClusterRun, dict], Awaitable[None]] | None = None,
                 on_unrecorded: Callable[[ClusterRun, str], Awaitable[None]] | None = None,
                 on_store_error: Callable[[str, str], None] | None = None):
        if not secret:
            raise ValueError("the operator secret must not be empty")
        self._secret = secret
        self._runs = runs
        self._client = client
        self.history = history
        self.artifacts = artifacts
        self.logs = logs or LogStreams(client)
        self.source_cache = source_cache
        self._on_result = on_result
        self._on_unrecorded = on_unrecorded  # a RESULT could not be kept or recorded: the store is down
        self._on_store_error = on_store_error  # (operation, message) of each call Redis failed

    @staticmethod
    def _key(run_id: str, what: str) -> str:
        return f"tl:run:{quote(run_id, safe='')}:{what}"

    async def authorize(self, run_id, token):
        # The token first: whether a run exists is told only to who holds its token.
        if not tokens.verify(self._secret, run_id, token):
            raise ApiError(401, "a valid bearer token for this run is required")
        run = await self._runs.describe(run_id)
        if run is None:
            raise ApiError(404, "unknown run")
        return run

    async def assignment(self, run):
        handed_out = copy.deepcopy(run.assignment)
        handed_out["run_id"] = run.run_id
        handed_out["source"] = {"url": "source"}
        handed_out["inputs"] = {}
        for key, source in run.inputs.items():
            url = input_route(key)
            presign = getattr(self.artifacts, "presigned_url", None)
            if source.kind == "build" and presign is not None:
                try:
                    url = await asyncio.to_thread(presign, source.run_id, source.artifact) or url
                except Exception as error:  # S3 unreachable: the agent asks again
                    raise ApiError(503, f"cannot reach the artifact store: {type(error).__name__}") from None
            handed_out["inputs"][key] = {"kind": source.kind, "url": url}
        return handed_out

    async def served(self, run, route):
        if route == "source":
            if run.source is not None:
                return await self._source_tree(run, run.source)
            return await self._tree(run.git_dir, run.commit)
        for key, source in run.inputs.items():
            if input_route(key) != route:
                continue
            if source.kind == "source":
                return await self._source_tree(run, source)
            return await asyncio.to_thread(self.artifacts.find, source.run_id, source.artifact)
        return None

    async def _source_tree(self, run: ClusterRun, source: InputSource) -> Served:
        if source.unavailable:
            raise ApiError(404, source.unavailable)
        path = source.path.strip("/")
        git_dir, commit = source.git_dir or run.git_dir, source.commit or run.commit
        return await self._tree(git_dir, f"{commit}:{path}" if path else commit)

    async def _tree(self, git_dir: str, tree: str) -> Served:
        # Streamed from git unless cached; a tree git cannot archive answers 404 there.
        if self.source_cache is not None:
            return self.source_cache.served(git_dir, tree)
        return Served("git", git_dir, tree)

    async def heartbeat(self, run, phase):
        beat = json.dumps({"time": time.time(), "phase": phase[:200]})
        await self._redis("heartbeat", self._client.set, self._key(run.run_id, "heartbeat"), beat, ex=7 * 24 * 3600)
        return run.cancel

    async def last_heartbeat(self, run_id: str) -> dict | None:
        """``{"time", "phase"}`` of the run's last heartbeat, kept across operator restarts."""
        value = await self._redis("read_heartbeat", self._client.get, self._key(run_id, "heartbeat"))
        return json.loads(value) if value else None

    async def append_log(self, run, offset, data):
        try:
            return await self._redis("append_log", self.logs.append, run.run_id, offset, data)
        except LogGap as gap:
            raise ApiError(409, f"offset {offset} leaves a gap: the log holds {gap.size} bytes",
                           size=gap.size) from None

    async def store_artifact(self, run, name, archive_format, body, length):
        await self.artifacts.put(run.run_id, name, archive_format, body, length)

    async def record_result(self, run, result):
        try:
            kept = await self._keep_and_record(run, result)
        except ApiError as error:
            if error.status == 503 and self._on_unrecorded is not None:
                await self._on_unrecorded(run, str(error))
            raise
        if self._on_result is not None:
            await self._on_result(run, kept)

    async def _keep_and_record(self, run, result) -> dict:
        key = self._key(run.run_id, "result")
        # The first RESULT counts: one posted again, or another after a restart, changes nothing.
        await self._redis("keep_result", self._client.set, key, json.dumps({**result, "received_at": time.time()}),
                          nx=True, ex=RESULT_KEEP_SECONDS)
        kept = json.loads(await self._redis("keep_result", self._client.get, key))
        record = run_record(run, kept)
        try:
            await asyncio.to_thread(self.history.record_run, record)  # idempotent: same key, same record
        except Exception as error:  # the store down: the agent retries, nothing is lost
            if self._on_store_error is not None:
                self._on_store_error("record_result", str(error))
            raise ApiError(503, f"the history store cannot record the result now: {error}") from None
        await self._redis("end_log", self.logs.end, run.run_id)
        return kept

    async def kept_for(self, run_ids: list[str]) -> list[tuple[dict | None, dict | None]]:
        """(`result_of`, `last_heartbeat`) of each run, in one Redis round trip (a decision
        asks for every active run of its TestRun, and one may have hundreds)."""
        if not run_ids:
            return []
        keys = [self._key(run_id, what) for run_id in run_ids for what in ("result", "heartbeat")]
        values = [json.loads(value) if value else None for value in await self._redis("read_result", self._client.mget, keys)]
        return list(zip(values[0::2], values[1::2]))

    async def result_of(self, run_id: str) -> dict | None:
        value = await self._redis("read_result", self._client.get, self._key(run_id, "result"))
        return json.loads(value) if value else None

    async def _redis(self, operation: str, call, *args, **kwargs):
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if self._on_store_error is not None:
                self._on_store_error(operation, type(error).__name__)
            # 503: the agent asks again until the run's deadline.
            raise ApiError(503, f"the operator's Redis is unreachable: {type(error).__name__}") from None


def run_record(run: ClusterRun, result: dict) -> RunRecord:
    cases = [CaseResult(case["name"], case["success"], case.get("duration_seconds"))
             for case in result.get("cases") or ()]
    return RunRecord(repo=run.repo, commit=run.commit, task=run.task, kind=run.kind, run_index=run.run_index,
                     attempt=run.attempt, result=result["result"],
                     duration_seconds=float(result.get("duration_seconds") or 0.0),
                     exit_code=result.get("exit_code"),
                     started_at=float(result.get("received_at") or 0.0) - float(result.get("duration_seconds") or 0.0),
                     branch=run.branch, cases=cases)
