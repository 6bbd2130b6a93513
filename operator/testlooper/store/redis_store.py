"""The Redis history store (`redis://HOST:PORT/DB`), used by the operator.

Key layout (see docs/history-store.md): per commit, three hashes, all updated in one
MULTI/EXEC so that a reader never sees a run without its counts:

    tl:{repo}:{sha}:runs    [task,run_index,attempt] -> the run without its cases (JSON)
    tl:{repo}:{sha}:cases   [task,run_index,attempt] -> its cases, column-wise JSON
    tl:{repo}:{sha}:counts  task -> the task's aggregates on this commit, column-wise JSON
    tl:{repo}:{sha}:next    task -> the first run index `allocate_run_indexes` has not given out

Cases and counts are stored column-wise (`{"cases": [...], "runs": [...], ...}`) because
decoding three long lists in C is much faster than decoding one small object per case, and
reads (a line of history) vastly outnumber writes. Counts are maintained at ingest with
optimistic locking (WATCH the commit's runs and counts), so reading a commit costs the same
however many runs it had.
"""

from __future__ import annotations

import functools
import json
from itertools import repeat
from typing import Iterable
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from redis.retry import Retry

from testlooper.store.base import (
    Aggregates, CaseResult, HistoryStore, RunRecord, StoreError, StoreUnavailable,
    case_outcomes, distinct_cases, final_attempt_change, run_outcomes,
)

# 2: `error` runs are no longer counted (schema 1 counted them as failures).
SCHEMA_VERSION = 2
SCHEMA_KEY = "tl:schema"
REPOS_KEY = "tl:repos"
COMMITS_PER_PIPELINE = 1_000
# Ride out a blip of about a second; anything longer is an outage the caller spools through.
RETRIES = 3
RETRY_BACKOFF_BASE_SECONDS = 0.05
RETRY_BACKOFF_CAP_SECONDS = 0.5


class CommitKeys:
    def __init__(self, repo: str, sha: str):
        # Percent-encoding keeps a ':' in a repo name from making two commits share keys.
        prefix = f"tl:{quote(repo, safe='')}:{quote(sha, safe='')}"
        self.runs = f"{prefix}:runs"
        self.cases = f"{prefix}:cases"
        self.counts = f"{prefix}:counts"
        self.next_index = f"{prefix}:next"


FEW_RUN_INDEXES = 4  # a batch of at most this many run indexes reads only theirs when recorded


def run_field(task: str, run_index: int, attempt: int) -> str:
    return json.dumps([task, run_index, attempt], separators=(",", ":"))


def field_pattern(task: str, run_index: int | None = None) -> str:
    """An HSCAN pattern matching the run fields of `task` (of that run index, when given)."""
    prefix = run_field(task, 0, 0)[:-len("0,0]")] + ("" if run_index is None else f"{run_index},")
    return "".join("\\" + char if char in "*?[]\\" else char for char in prefix) + "*"


def encode_cases(cases: list[CaseResult]) -> str:
    return json.dumps({"names": [c.name for c in cases],
                       "success": [c.success for c in cases],
                       "durations": [c.duration_seconds for c in cases]})


def decode_cases(blob: bytes | None) -> list[CaseResult]:
    if blob is None:
        return []
    data = json.loads(blob)
    return list(map(CaseResult, data["names"], data["success"], data["durations"]))


def encode_counts(counts: dict[str, list[int]]) -> str:
    return json.dumps({"cases": list(counts),
                       "runs": [runs for runs, _ in counts.values()],
                       "failures": [failures for _, failures in counts.values()]})


def decode_counts(blob: bytes | None) -> dict[str, list[int]]:
    if blob is None:
        return {}
    data = json.loads(blob)
    return dict(zip(data["cases"], map(list, zip(data["runs"], data["failures"]))))


def add_outcomes(counts: dict[str, list[int]], outcomes: dict[str, bool], sign: int) -> None:
    """Add (sign 1) or take back (sign -1) one run's outcomes; a case at 0 runs is dropped."""
    for name, passed in outcomes.items():
        entry = counts.setdefault(name, [0, 0])
        entry[0] += sign
        if not passed:
            entry[1] += sign
        if entry[0] == 0:
            del counts[name]


def unavailable_on_connection_error(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise StoreUnavailable(f"history store {self.url} is unreachable: {error}") from error
    return wrapper


class RedisHistoryStore(HistoryStore):
    def __init__(self, url: str):
        retry = Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP_SECONDS,
                                         base=RETRY_BACKOFF_BASE_SECONDS), retries=RETRIES)
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=60,
                                            retry=retry)
        kwargs = self._client.connection_pool.connection_kwargs
        # The URL shown in messages, without any password the given one carried.
        self.url = (f"{urlsplit(url).scheme}://{kwargs.get('host')}:{kwargs.get('port')}"
                    f"/{kwargs.get('db', 0)}")
        self._check_schema()

    @unavailable_on_connection_error
    def _check_schema(self) -> None:
        self._client.set(SCHEMA_KEY, SCHEMA_VERSION, nx=True)
        version = int(self._client.get(SCHEMA_KEY))
        if version > SCHEMA_VERSION:
            raise StoreError(f"history store {self.url} has schema version {version}; this "
                             f"TestLooper knows up to {SCHEMA_VERSION}: upgrade TestLooper")
        if version == 1:
            self._stop_counting_errors()

    def _stop_counting_errors(self) -> None:
        """From schema 1, which counted `error` runs as failures: count again each commit whose
        final attempts include an error, then mark the layout 2.

        Counting again from the recorded runs (rather than taking back) makes this safe to run
        in several processes at once, or again after a crash part way: the version moves to 2
        only once every commit is done.
        """
        for runs_key in self._client.scan_iter(match="tl:*:runs", count=1_000):
            self._count_commit_again(runs_key[:-len(b":runs")])
        with self._client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(SCHEMA_KEY)
                    if int(pipe.get(SCHEMA_KEY)) < SCHEMA_VERSION:
                        pipe.multi()
                        pipe.set(SCHEMA_KEY, SCHEMA_VERSION)
                        pipe.execute()
                    return
                except WatchError:
                    pipe.reset()

    def _count_commit_again(self, prefix: bytes) -> None:
        runs_key, cases_key, counts_key = (prefix + b":runs", prefix + b":cases",
                                           prefix + b":counts")
        with self._client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(runs_key, counts_key)
                    final: dict[tuple[str, int], tuple[int, bytes]] = {}
                    recorded = pipe.hgetall(runs_key)
                    for field in recorded:
                        task, run_index, attempt = json.loads(field)
                        if final.get((task, run_index), (-1,))[0] < attempt:
                            final[task, run_index] = attempt, field
                    finals = {field: json.loads(recorded[field]) for _, field in final.values()}
                    if not any(run["result"] == "error" for run in finals.values()):
                        return
                    counts: dict[str, dict[str, list[int]]] = {}
                    for field, run in finals.items():
                        cases = ((c.name, c.success)
                                 for c in decode_cases(pipe.hget(cases_key, field)))
                        add_outcomes(counts.setdefault(run["task"], {}),
                                     case_outcomes(run["result"], cases), 1)
                    pipe.multi()
                    pipe.delete(counts_key)
                    for task, task_counts in counts.items():
                        if task_counts:
                            pipe.hset(counts_key, task, encode_counts(task_counts))
                    pipe.execute()
                    return
                except WatchError:
                    pipe.reset()

    # -- writing -----------------------------------------------------------------------------

    @unavailable_on_connection_error
    def record_runs(self, runs: Iterable[RunRecord]) -> None:
        by_commit: dict[tuple[str, str], list[RunRecord]] = {}
        for run in runs:
            by_commit.setdefault((run.repo, run.commit), []).append(run)
        for (repo, sha), commit_runs in by_commit.items():
            self._record_commit(repo, sha, commit_runs)

    def _record_commit(self, repo: str, sha: str, runs: list[RunRecord]) -> None:
        keys = CommitKeys(repo, sha)
        with self._client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(keys.runs, keys.counts)
                    self._write_commit(pipe, keys, repo, runs)
                    return
                except WatchError:
                    # Another writer changed this commit between our reads and EXEC (or the
                    # connection dropped while watching): read again and recompute.
                    pipe.reset()

    @staticmethod
    def _write_commit(pipe, keys: CommitKeys, repo: str, runs: list[RunRecord]) -> None:
        pairs = {(run.task, run.run_index) for run in runs}
        if len(pairs) <= FEW_RUN_INDEXES:
            # A run or two landing (the operator records each RESULT alone): read those run
            # indexes' attempts, not every run of the commit (thousands, for a big commit).
            recorded = {}
            for task, run_index in pairs:
                recorded.update(pipe.hscan_iter(keys.runs, match=field_pattern(task, run_index), count=1000))
        else:
            recorded = pipe.hgetall(keys.runs)
        attempts: dict[tuple[str, int], set[int]] = {}
        for field in recorded:
            task, run_index, attempt = json.loads(field)
            attempts.setdefault((task, run_index), set()).add(attempt)
        tasks = list(dict.fromkeys(run.task for run in runs))
        counts = dict(zip(tasks, map(decode_counts, pipe.hmget(keys.counts, tasks))))

        written: dict[str, RunRecord] = {}
        for run in runs:
            taken_back, contributes = final_attempt_change(
                attempts.get((run.task, run.run_index), ()), run.attempt)
            if taken_back is not None:
                old_field = run_field(run.task, run.run_index, taken_back)
                if old_field in written:
                    old_outcomes = run_outcomes(written[old_field])
                else:
                    old_run = json.loads(recorded[old_field.encode()])
                    old_cases = decode_cases(pipe.hget(keys.cases, old_field))
                    old_outcomes = case_outcomes(old_run["result"],
                                                 ((c.name, c.success) for c in old_cases))
                add_outcomes(counts[run.task], old_outcomes, -1)
            if contributes:
                add_outcomes(counts[run.task], run_outcomes(run), 1)
            attempts.setdefault((run.task, run.run_index), set()).add(run.attempt)
            written[run_field(run.task, run.run_index, run.attempt)] = run

        pipe.multi()
        for field, run in written.items():
            pipe.hset(keys.runs, field, json.dumps(run.to_json(with_cases=False)))
            cases = distinct_cases(run.cases)
            if cases:
                pipe.hset(keys.cases, field, encode_cases(cases))
            else:
                pipe.hdel(keys.cases, field)
        for task, task_counts in counts.items():
            if task_counts:
                pipe.hset(keys.counts, task, encode_counts(task_counts))
            else:
                pipe.hdel(keys.counts, task)
        pipe.sadd(REPOS_KEY, repo)
        pipe.execute()

    @unavailable_on_connection_error
    def allocate_run_indexes(self, repo: str, commit: str, task: str, count: int) -> int:
        keys = CommitKeys(repo, commit)
        with self._client.pipeline() as pipe:
            while True:
                try:
                    # The runs too: a spool replay may record runs without allocating.
                    pipe.watch(keys.next_index, keys.runs)
                    allocated = pipe.hget(keys.next_index, task)
                    recorded = max((run_index + 1 for recorded_task, run_index, _ in
                                    map(json.loads, pipe.hkeys(keys.runs))
                                    if recorded_task == task), default=0)
                    first = max(recorded, int(allocated) if allocated is not None else 0)
                    pipe.multi()
                    pipe.hset(keys.next_index, task, first + count)
                    pipe.execute()
                    return first
                except WatchError:
                    pipe.reset()  # another command allocated or recorded meanwhile: again

    # -- reading -----------------------------------------------------------------------------

    @unavailable_on_connection_error
    def runs(self, repo: str, commit: str, with_cases: bool = False) -> list[RunRecord]:
        keys = CommitKeys(repo, commit)
        with self._client.pipeline() as pipe:
            pipe.hgetall(keys.runs)
            if with_cases:
                pipe.hgetall(keys.cases)
            recorded, *cases = pipe.execute()
        records = []
        for field, value in recorded.items():
            run = RunRecord.from_json(json.loads(value))
            if with_cases:
                run.cases = sorted(decode_cases(cases[0].get(field)), key=lambda c: c.name)
            records.append(run)
        return sorted(records, key=lambda run: (run.task, run.run_index, run.attempt))

    @unavailable_on_connection_error
    def task_runs(self, repo: str, commit: str, task: str, with_cases: bool = False) -> list[RunRecord]:
        keys = CommitKeys(repo, commit)
        # A run's field starts with its task, JSON-encoded: the server matches that prefix, so
        # only this task's records cross the wire.
        recorded = dict(self._client.hscan_iter(keys.runs, match=field_pattern(task), count=1000))
        fields = list(recorded)
        cases = self._client.hmget(keys.cases, fields) if with_cases and fields else [None] * len(fields)
        records = []
        for field, blob in zip(fields, cases):
            run = RunRecord.from_json(json.loads(recorded[field]))
            if run.task != task:
                continue
            if with_cases:
                run.cases = sorted(decode_cases(blob), key=lambda c: c.name)
            records.append(run)
        return sorted(records, key=lambda run: (run.task, run.run_index, run.attempt))

    @unavailable_on_connection_error
    def case_counts(self, repo: str, commits: Iterable[str]) -> dict[str, Aggregates]:
        counts: dict[str, Aggregates] = {}
        for shas, by_task_per_commit in self._per_commit(repo, commits, "hgetall", "counts"):
            for sha, by_task in zip(shas, by_task_per_commit):
                if not by_task:
                    continue
                aggregates: Aggregates = {}
                for task, blob in by_task.items():
                    data = json.loads(blob)
                    keys = zip(repeat(task.decode()), data["cases"])
                    aggregates.update(zip(keys, zip(data["runs"], data["failures"])))
                counts[sha] = aggregates
        return counts

    @unavailable_on_connection_error
    def tested_commits(self, repo: str, commits: Iterable[str]) -> set[str]:
        return {sha for shas, exists in self._per_commit(repo, commits, "exists", "counts")
                for sha, found in zip(shas, exists) if found}

    def _per_commit(self, repo: str, commits: Iterable[str], command: str, key: str):
        """Run `command` on one key of each commit, pipelined; yields (shas, replies) chunks."""
        shas = list(dict.fromkeys(commits))
        for start in range(0, len(shas), COMMITS_PER_PIPELINE):
            chunk = shas[start:start + COMMITS_PER_PIPELINE]
            with self._client.pipeline(transaction=False) as pipe:
                for sha in chunk:
                    getattr(pipe, command)(getattr(CommitKeys(repo, sha), key))
                yield chunk, pipe.execute()

    @unavailable_on_connection_error
    def repos(self) -> list[str]:
        return sorted(member.decode() for member in self._client.smembers(REPOS_KEY))

    @staticmethod
    def _lines_key(repo: str) -> str:
        return f"tl:lines:{quote(repo, safe='')}"

    @unavailable_on_connection_error
    def record_branch_line(self, repo: str, branch: str, line: list[str]) -> None:
        self._client.hset(self._lines_key(repo), branch, " ".join(line))

    @unavailable_on_connection_error
    def branch_line(self, repo: str, branch: str) -> list[str] | None:
        value = self._client.hget(self._lines_key(repo), branch)
        return value.decode().split() if value is not None else None

    @unavailable_on_connection_error
    def branches(self, repo: str) -> list[str]:
        return sorted(branch.decode() for branch in self._client.hkeys(self._lines_key(repo)))

    @unavailable_on_connection_error
    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()
