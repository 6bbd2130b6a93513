"""Where TestLooper keeps the history of run results: SQLite by default, Redis in a cluster.

`open_store(url)` picks the backend from the URL. When the backend is down, store methods
raise StoreUnavailable; the caller keeps the unrecorded runs in a spool file (`write_spool`)
and records them later with `replay_spool`, which is safe to repeat because recording a run
twice replaces it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from testlooper.store.base import (
    Aggregates, CaseResult, HistoryStore, RunRecord, StoreError, StoreUnavailable,
)
from testlooper.store.sqlite import SqliteHistoryStore

__all__ = [
    "Aggregates", "CaseResult", "DEFAULT_STORE_PATH", "HistoryStore", "RunRecord", "StoreError",
    "StoreUnavailable", "default_store_path", "open_store", "read_spool", "replay_spool",
    "write_spool",
]

# Runs recorded per store call while replaying; the spool is rewritten after each batch, so a
# failure part way leaves only the unrecorded runs in it.
REPLAY_BATCH = 100


def default_store_path() -> str:
    """`$XDG_DATA_HOME/testlooper/history.db`, `XDG_DATA_HOME` defaulting to ~/.local/share."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "testlooper", "history.db")


DEFAULT_STORE_PATH = default_store_path()


def open_store(url: str | None = None) -> HistoryStore:
    """Open the history store at `url`: a path or `sqlite:///ABS/PATH.db` for SQLite,
    `redis://HOST:PORT/DB` for Redis, None or "" for the default SQLite file."""
    if not url:
        return SqliteHistoryStore(default_store_path())
    if url.startswith(("redis://", "rediss://", "unix://")):
        # Imported here so that the local runner, which uses SQLite, never loads redis-py.
        from testlooper.store.redis_store import RedisHistoryStore
        return RedisHistoryStore(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise ValueError(f"history store URL {url!r}: write sqlite:///ABSOLUTE/PATH.db "
                             "(three slashes) or give a plain path")
        return SqliteHistoryStore(path)
    if "://" in url:
        raise ValueError(f"history store URL {url!r}: expected a path, sqlite:///ABS/PATH.db "
                         "or redis://HOST:PORT/DB")
    return SqliteHistoryStore(os.path.expanduser(url))


def write_spool(path: str, runs: Iterable[RunRecord]) -> None:
    """Append runs to a JSON-lines spool file, flushed to disk before returning."""
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
    that batch again on the next replay, which replaces rather than double counts. Only one
    process may write or replay a given spool file at a time.
    """
    pending = read_spool(path)
    recorded = 0
    while pending:
        batch, pending = pending[:REPLAY_BATCH], pending[REPLAY_BATCH:]
        store.record_runs(batch)
        recorded += len(batch)
        _rewrite_spool(path, pending)
    if os.path.exists(path):
        os.remove(path)
    return recorded


def _rewrite_spool(path: str, runs: list[RunRecord]) -> None:
    temporary = f"{path}.replaying"
    if os.path.exists(temporary):
        os.remove(temporary)
    write_spool(temporary, runs)
    os.replace(temporary, path)
