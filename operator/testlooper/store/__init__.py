"""Where TestLooper keeps the history of run results: SQLite by default, Redis in a cluster.

`open_store(url)` picks the backend from the URL. When the backend is down, store methods
raise StoreUnavailable; the caller keeps the unrecorded runs in a spool file (`write_spool`)
and records them later with `replay_spool`, which is safe to repeat because recording a run
twice replaces it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see `_spool_lock`
    fcntl = None

from testlooper.store.base import (
    Aggregates, CaseResult, HistoryStore, RunRecord, StoreError, StoreReadOnly, StoreUnavailable,
)
from testlooper.store.sqlite import SqliteHistoryStore

__all__ = [
    "Aggregates", "CaseResult", "DEFAULT_STORE_PATH", "HistoryStore", "RunRecord", "StoreError",
    "StoreReadOnly", "StoreUnavailable", "default_store_path", "open_store", "read_spool", "record_kept_runs",
    "replay_spool", "store_identity", "write_spool",
]

# Runs recorded per store call while replaying; the spool is rewritten after each batch, so a
# failure part way leaves only the unrecorded runs in it.
REPLAY_BATCH = 100


def default_store_path() -> str:
    """`$XDG_DATA_HOME/testlooper/history.db`, `XDG_DATA_HOME` defaulting to ~/.local/share."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "testlooper", "history.db")


DEFAULT_STORE_PATH = default_store_path()


def open_store(url: str | None = None, read_only: bool = False) -> HistoryStore:
    """Open the history store at `url`: a path or `sqlite:///ABS/PATH.db` for SQLite,
    `redis://HOST:PORT/DB` for Redis, None or "" for the default SQLite file (whose folder is
    made if need be; any other file's folder must exist).

    A SQLite file that cannot be written raises StoreReadOnly, unless `read_only` (for
    readers): then it is opened for reading only."""
    if is_redis_url(url):
        # Imported here so that the local runner, which uses SQLite, never loads redis-py.
        from testlooper.store.redis_store import RedisHistoryStore
        return RedisHistoryStore(url)
    return SqliteHistoryStore(_sqlite_path(url), create_folder=not url, read_only=read_only)


def store_identity(url: str | None) -> str:
    """The store `url` names, however it is written: `sqlite://` and the file's absolute path
    (the default store included), or the Redis URL without its password, with the default
    port and database filled in. A malformed URL is returned as it is (`open_store` says what
    is wrong with it)."""
    try:
        if is_redis_url(url):
            return _redis_identity(url)
        return f"sqlite://{os.path.abspath(_sqlite_path(url))}"
    except ValueError:
        return url or ""


def is_redis_url(url: str | None) -> bool:
    """A Redis store's URL (the cluster's store), as opposed to a SQLite path."""
    return bool(url) and url.startswith(("redis://", "rediss://", "unix://"))


def _sqlite_path(url: str | None) -> str:
    """The SQLite file a URL that is not Redis's names; ValueError if it is malformed."""
    if not url:
        return default_store_path()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise ValueError(f"history store URL {url!r}: write sqlite:///ABSOLUTE/PATH.db "
                             "(three slashes) or give a plain path")
        return path
    if "://" in url:
        raise ValueError(f"history store URL {url!r}: expected a path, sqlite:///ABS/PATH.db "
                         "or redis://HOST:PORT/DB")
    return os.path.expanduser(url)


def _redis_identity(url: str) -> str:
    """`SCHEME://[USER@]HOST:PORT/DB` (`unix://[USER@]PATH?db=DB`), as redis-py reads the URL:
    the database from `?db=`, else from the path, else 0."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    db = parse_qs(parts.query).get("db", [""])[0]
    if parts.scheme == "unix":
        return f"unix://{user}{os.path.normpath(parts.path)}?db={db or 0}"
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    db = db or parts.path.strip("/") or "0"
    return f"{parts.scheme}://{user}{host}:{parts.port or 6379}/{db}"


@contextmanager
def _spool_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on `PATH.lock`, beside the spool, while the spool is appended to
    or replayed, so that a replay never rewrites or removes lines appended meanwhile.

    A lock file of its own, because replaying replaces the spool file by renaming another
    over it: a lock on the spool itself would be left on the replaced file. The lock file is
    kept (removing it could let two processes hold locks on two different files). Where fcntl
    does not exist (Windows), there is no lock: one process at a time must then use a spool.
    """
    if fcntl is None:
        yield
        return
    descriptor = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor is closed
        yield
    finally:
        os.close(descriptor)


def write_spool(path: str, runs: Iterable[RunRecord]) -> None:
    """Append runs to a JSON-lines spool file, flushed to disk before returning.

    Safe while another process replays the same spool (see `_spool_lock`).
    """
    runs = list(runs)
    with _spool_lock(path):
        _append(path, runs)


def _append(path: str, runs: list[RunRecord]) -> None:
    with open(path, "a", encoding="utf-8") as spool:
        for run in runs:
            spool.write(json.dumps(run.to_json(), ensure_ascii=False) + "\n")
        spool.flush()
        os.fsync(spool.fileno())


def read_spool(path: str) -> list[RunRecord]:
    """The runs in a spool file; none if it does not exist.

    A last line without its newline is a write that was cut off (the process died in
    `write_spool`), so it is skipped rather than failing the whole replay.
    """
    try:
        with open(path, encoding="utf-8") as spool:
            lines = spool.read().split("\n")
    except FileNotFoundError:
        return []
    return [RunRecord.from_json(json.loads(line)) for line in lines[:-1] if line]


def replay_spool(store: HistoryStore, path: str) -> int:
    """Record the spooled runs, then remove them from the spool; returns how many.

    If the store fails part way, StoreUnavailable propagates and the spool keeps exactly the
    runs not yet recorded. A crash between recording a batch and rewriting the spool records
    that batch again on the next replay, which replaces rather than double counts. The spool
    is locked from its reading to its last rewrite, so processes appending to it meanwhile
    (`write_spool`) wait, and lose nothing.

    A spooled run never replaces another command's run: a command that could not reach the
    store could not allocate its run indexes (`HistoryStore.allocate_run_indexes`), and those
    it numbered may be another command's, recorded or still running. So each spooled run
    index that is not in the store yet moves, with its attempts, to an index allocated now.
    The renumbered runs are written back to the spool before anything is recorded, so a
    replay cut short renumbers nothing twice.
    """
    if not os.path.exists(path):
        return 0  # and no lock file is made for a spool that was never written
    recorded = 0
    with _spool_lock(path):
        pending = read_spool(path)
        if _renumber_unplaced_runs(store, pending):
            _rewrite_spool(path, pending)
        while pending:
            batch, pending = pending[:REPLAY_BATCH], pending[REPLAY_BATCH:]
            store.record_runs(batch)
            recorded += len(batch)
            _rewrite_spool(path, pending)
        if os.path.exists(path):
            os.remove(path)
    return recorded


def record_kept_runs(store: HistoryStore, runs: list[RunRecord]) -> int:
    """Record runs a command kept outside the store and outside any spool (no spool could be
    written), renumbered as `replay_spool` renumbers spooled runs; returns how many."""
    _renumber_unplaced_runs(store, runs)
    store.record_runs(runs)
    return len(runs)


def _renumber_unplaced_runs(store: HistoryStore, runs: list[RunRecord]) -> bool:
    """Gives each spooled run index none of whose attempts the store holds a freshly allocated
    index, in place (its attempts move together); True if any moved.

    An index already placed (one of its attempts is in the store with the same start time: a
    replay cut short) keeps its number, so nothing is counted twice.
    """
    moved = False
    for repo, commit in sorted({(run.repo, run.commit) for run in runs}):
        stored = {(r.task, r.run_index, r.attempt): r.started_at for r in store.runs(repo, commit)}
        groups: dict[tuple[str, int], list[RunRecord]] = {}
        for run in runs:
            if (run.repo, run.commit) == (repo, commit):
                groups.setdefault((run.task, run.run_index), []).append(run)
        unplaced: dict[str, list[list[RunRecord]]] = {}
        for (task, index), attempts in sorted(groups.items()):
            if not any(stored.get((task, index, run.attempt)) == run.started_at for run in attempts):
                unplaced.setdefault(task, []).append(attempts)
        for task, task_groups in unplaced.items():
            first = store.allocate_run_indexes(repo, commit, task, len(task_groups))
            for new_index, attempts in enumerate(task_groups, start=first):
                for run in attempts:
                    moved = moved or run.run_index != new_index
                    run.run_index = new_index
    return moved


def _rewrite_spool(path: str, runs: list[RunRecord]) -> None:
    """Replace the spool's content (under its lock) by writing another file and renaming it."""
    temporary = f"{path}.replaying"
    if os.path.exists(temporary):
        os.remove(temporary)
    _append(temporary, runs)
    os.replace(temporary, path)
