"""The embedded history store: one SQLite file, shared by a `watch` writer and `history` readers.

WAL mode lets readers run while a writer writes; `busy_timeout` makes a second writer wait
instead of failing. Writes take the write lock up front (`BEGIN IMMEDIATE`) because a
transaction that upgrades from read to write while another process writes fails at once,
whatever the timeout. Per-(commit, task, case) aggregates are maintained at ingest, so reading
a line of history is one index range scan per commit however many runs each commit had.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from typing import Iterable, Iterator

from testlooper.store.base import (
    Aggregates, CaseResult, HistoryStore, RunRecord, StoreError, StoreReadOnly, StoreUnavailable,
    TASK_CASE, case_outcomes, distinct_cases, final_attempt_change, run_outcomes,
)

# 2: `error` runs are no longer counted (schema 1 counted them as failures).
# 3: run indexes are allocated (run_index_allocations).
SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 30_000
# Errors (by primary result code) meaning the file cannot be used now, rather than a bug.
UNAVAILABLE_ERRORS = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})
# Stay well under SQLite's limit on bound parameters per statement.
IDS_PER_QUERY = 500

# Per (commit, task), the first run index not yet given out by `allocate_run_indexes`.
ALLOCATIONS_TABLE = """CREATE TABLE IF NOT EXISTS run_index_allocations (
        commit_id INTEGER NOT NULL REFERENCES commits (id),
        task TEXT NOT NULL,
        following INTEGER NOT NULL,
        PRIMARY KEY (commit_id, task)) WITHOUT ROWID"""

# Per (repo, branch), the first-parent line last recorded by the operator (shas, space separated).
BRANCH_LINES_TABLE = """CREATE TABLE IF NOT EXISTS branch_lines (
        repo TEXT NOT NULL,
        branch TEXT NOT NULL,
        line TEXT NOT NULL,
        PRIMARY KEY (repo, branch)) WITHOUT ROWID"""

SCHEMA = (
    """CREATE TABLE commits (
        id INTEGER PRIMARY KEY,
        repo TEXT NOT NULL,
        sha TEXT NOT NULL,
        UNIQUE (repo, sha))""",
    # Each (task, case) name once: the per-commit tables hold small integers instead of long
    # names, which makes the file several times smaller and reading history faster. Rows are
    # never deleted, so an id always means the same case.
    """CREATE TABLE case_keys (
        id INTEGER PRIMARY KEY,
        task TEXT NOT NULL,
        name TEXT NOT NULL,
        UNIQUE (task, name))""",
    """CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        commit_id INTEGER NOT NULL REFERENCES commits (id),
        task TEXT NOT NULL,
        kind TEXT NOT NULL,
        run_index INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        result TEXT NOT NULL,
        duration_seconds REAL NOT NULL,
        exit_code INTEGER,
        started_at REAL NOT NULL,
        branch TEXT NOT NULL,
        UNIQUE (commit_id, task, run_index, attempt))""",
    # The cases a run reported; the task's own result (case "") is the run's result.
    """CREATE TABLE cases (
        run_id INTEGER NOT NULL REFERENCES runs (id),
        case_id INTEGER NOT NULL REFERENCES case_keys (id),
        success INTEGER NOT NULL,
        duration_seconds REAL,
        PRIMARY KEY (run_id, case_id)) WITHOUT ROWID""",
    # Only the final attempt of each run index, and no blocked, cancelled or error run, is
    # counted here. Rows whose runs drop to 0 are deleted: a case here was run on that commit.
    """CREATE TABLE case_counts (
        commit_id INTEGER NOT NULL REFERENCES commits (id),
        case_id INTEGER NOT NULL REFERENCES case_keys (id),
        runs INTEGER NOT NULL,
        failures INTEGER NOT NULL,
        PRIMARY KEY (commit_id, case_id)) WITHOUT ROWID""",
    ALLOCATIONS_TABLE,
    BRANCH_LINES_TABLE,
)


class SqliteHistoryStore(HistoryStore):
    """The store in the SQLite file at `path`.

    The file's folder must exist unless `create_folder` (the default store's folder is made;
    a path the user typed wrong must not silently start a new, empty history). A file that
    cannot be written is refused with StoreReadOnly, unless `read_only`: then it is opened
    for reading only (and writing raises StoreUnavailable).
    """

    def __init__(self, path: str, create_folder: bool = False, read_only: bool = False):
        self.path = path
        self.url = f"sqlite://{os.path.abspath(path)}"
        # One connection shared by the caller's threads, one transaction at a time.
        self._lock = threading.Lock()
        # Case ids never change (see case_keys), so both directions are cached for the life
        # of the store; ids are cached only once the transaction that made them committed.
        self._case_ids: dict[tuple[str, str], int] = {}
        self._case_keys: dict[int, tuple[str, str]] = {}
        if read_only:
            self._open_read_only()
            return
        self._check_writable_place(create_folder)
        with self._unavailable_when_unusable():
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._use_wal()
            # WAL stays consistent after a crash at NORMAL; only the last commits may be lost.
            self._db.execute("PRAGMA synchronous = NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            with self._transaction() as cursor:
                self._migrate(cursor)

    def _use_wal(self) -> None:
        """Switch the file to WAL, once for its life. Switching takes a lock for which SQLite
        does not wait (busy_timeout does not apply): two commands opening a new store at the same
        moment, one of them would fail "database is locked". So it asks again, up to the busy
        timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                busy = error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _check_writable_place(self, create_folder: bool) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if create_folder:
            with self._unavailable_when_unusable():
                os.makedirs(folder, exist_ok=True)
        elif not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise StoreError(f"history store {self.url}: its folder {folder} {what}")
        if os.path.isdir(self.path):
            raise StoreError(f"history store {self.url} is a folder, not a database file")
        # SQLite opens a file it cannot write read-only without a word, and WAL needs the
        # folder writable too (for FILE-wal and FILE-shm): refuse here, not at the first run.
        exists = os.path.exists(self.path)
        if exists and not (os.access(self.path, os.W_OK) and os.access(folder, os.W_OK)):
            raise StoreReadOnly(f"history store {self.url} is read-only: it can be read "
                                "(testlooper history, flaky) but no run can be recorded in it")
        if not exists and not os.access(folder, os.W_OK):
            raise StoreReadOnly(f"history store {self.url} cannot be created: its folder "
                                f"{folder} is not writable")

    def _open_read_only(self) -> None:
        if not os.path.isfile(self.path):
            raise StoreError(f"history store {self.url} does not exist")
        location = urllib.parse.quote(os.path.abspath(self.path))
        with self._unavailable_when_unusable():
            self._db = sqlite3.connect(f"file:{location}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN:
                    raise
                # A WAL file in a read-only folder: SQLite cannot make FILE-shm to read it
                # shared. Closed cleanly, the file holds everything; read it as immutable.
                self._db.close()
                self._db = sqlite3.connect(f"file:{location}?immutable=1", uri=True,
                                           isolation_level=None, check_same_thread=False)
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise StoreError(f"history store {self.url} holds no TestLooper history "
                             "(and is read-only)")
        if version > SCHEMA_VERSION:
            raise StoreError(f"history store {self.url} has schema version {version}; this "
                             f"TestLooper knows up to {SCHEMA_VERSION}: upgrade TestLooper")

    @contextmanager
    def _unavailable_when_unusable(self) -> Iterator[None]:
        """Errors meaning the file cannot be used now (busy, unreadable, disk full) become
        StoreUnavailable; a file that is no database, or a damaged one, is a StoreError the
        user can fix; other errors are bugs and stay as they are."""
        try:
            yield
        except OSError as error:
            raise StoreUnavailable(f"history store {self.url} is unavailable: {error}") from error
        except sqlite3.DatabaseError as error:  # OperationalError too
            code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
            if code == sqlite3.SQLITE_NOTADB:
                raise StoreError(f"history store {self.url} is not a SQLite database "
                                 f"({error})") from None
            if code == sqlite3.SQLITE_CORRUPT:
                raise StoreError(f"history store {self.url} is damaged ({error}): move it aside "
                                 "to start a new history, or restore a copy") from None
            if isinstance(error, sqlite3.OperationalError) and code in UNAVAILABLE_ERRORS:
                raise StoreUnavailable(
                    f"history store {self.url} is unavailable: {error}") from error
            raise

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Cursor]:
        """A transaction holding the lock it needs from its start."""
        with self._lock, self._unavailable_when_unusable():
            cursor = self._db.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield cursor
                except BaseException:
                    # SQLite itself rolls back on some errors (disk full, I/O).
                    if self._db.in_transaction:
                        cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT")
            finally:
                cursor.close()

    def _migrate(self, cursor: sqlite3.Cursor) -> None:
        # Read again under the write lock: another process may have just created the schema.
        version = cursor.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"history store {self.url} has schema version {version}; this "
                             f"TestLooper knows up to {SCHEMA_VERSION}: upgrade TestLooper")
        if version == 0:
            if cursor.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                raise StoreError(f"history store {self.url} is a SQLite database of another "
                                 "program (it has tables, but no TestLooper schema)")
            # Statement by statement: executescript() would commit our transaction first.
            for statement in SCHEMA:
                cursor.execute(statement)
        else:
            if version == 1:
                self._stop_counting_errors(cursor)
            if version <= 2:
                cursor.execute(ALLOCATIONS_TABLE)
            if version <= 3:
                cursor.execute(BRANCH_LINES_TABLE)
        cursor.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _stop_counting_errors(self, cursor: sqlite3.Cursor) -> None:
        """From schema 1: take back what each final attempt that is an `error` counted then,
        which is what a failed run with its cases counts."""
        finals = cursor.execute(
            "SELECT r.id, r.commit_id, r.task FROM runs r WHERE r.result = 'error' AND r.attempt ="
            " (SELECT MAX(o.attempt) FROM runs o WHERE o.commit_id = r.commit_id"
            " AND o.task = r.task AND o.run_index = r.run_index)").fetchall()
        for run_id, commit_id, task in finals:
            counted = case_outcomes("failed", cursor.execute(
                "SELECT k.name, c.success FROM cases c JOIN case_keys k ON k.id = c.case_id"
                " WHERE c.run_id = ?", (run_id,)))
            # Ids made here are not cached: the cache takes only committed ids.
            ids = self._ids_of(cursor, task, list(counted), {})
            self._add_counts(cursor, commit_id, ids, counted, sign=-1)

    # -- writing -----------------------------------------------------------------------------

    def record_runs(self, runs: Iterable[RunRecord]) -> None:
        new_case_ids: dict[tuple[str, str], int] = {}
        with self._transaction() as cursor:
            for run in runs:
                self._record(cursor, run, new_case_ids)
        # Committed: now the ids are real. (One dict.update is atomic for other threads.)
        self._case_ids.update(new_case_ids)

    def _record(self, cursor: sqlite3.Cursor, run: RunRecord,
                new_case_ids: dict[tuple[str, str], int]) -> None:
        commit_id = self._commit_id(cursor, run.repo, run.commit)
        attempts = dict(cursor.execute(
            "SELECT attempt, id FROM runs WHERE commit_id = ? AND task = ? AND run_index = ?",
            (commit_id, run.task, run.run_index)))
        taken_back, contributes = final_attempt_change(attempts, run.attempt)
        if taken_back is not None:
            outcomes = self._stored_outcomes(cursor, attempts[taken_back])
            ids = self._ids_of(cursor, run.task, list(outcomes), new_case_ids)
            self._add_counts(cursor, commit_id, ids, outcomes, sign=-1)
        replaced = attempts.get(run.attempt)
        if replaced is not None:
            cursor.execute("DELETE FROM cases WHERE run_id = ?", (replaced,))
            cursor.execute("DELETE FROM runs WHERE id = ?", (replaced,))
        cursor.execute(
            "INSERT INTO runs (commit_id, task, kind, run_index, attempt, result,"
            " duration_seconds, exit_code, started_at, branch) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (commit_id, run.task, run.kind, run.run_index, run.attempt, run.result,
             run.duration_seconds, run.exit_code, run.started_at, run.branch))
        run_id = cursor.lastrowid
        cases = distinct_cases(run.cases)
        ids = self._ids_of(cursor, run.task, [c.name for c in cases] + [TASK_CASE], new_case_ids)
        cursor.executemany(
            "INSERT INTO cases (run_id, case_id, success, duration_seconds) VALUES (?,?,?,?)",
            ((run_id, ids[c.name], c.success, c.duration_seconds) for c in cases))
        if contributes:
            self._add_counts(cursor, commit_id, ids, run_outcomes(run), sign=1)

    def allocate_run_indexes(self, repo: str, commit: str, task: str, count: int) -> int:
        # BEGIN IMMEDIATE holds the write lock from the read to the update: no other process
        # can allocate, or record, in between.
        with self._transaction() as cursor:
            commit_id = self._commit_id(cursor, repo, commit)
            (recorded,) = cursor.execute(
                "SELECT COALESCE(MAX(run_index) + 1, 0) FROM runs WHERE commit_id = ? AND task = ?",
                (commit_id, task)).fetchone()
            allocated = cursor.execute(
                "SELECT following FROM run_index_allocations WHERE commit_id = ? AND task = ?",
                (commit_id, task)).fetchone()
            first = max(recorded, allocated[0] if allocated else 0)
            cursor.execute(
                "INSERT INTO run_index_allocations (commit_id, task, following) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET following = excluded.following",
                (commit_id, task, first + count))
            return first

    @staticmethod
    def _commit_id(cursor: sqlite3.Cursor, repo: str, sha: str) -> int:
        cursor.execute("INSERT INTO commits (repo, sha) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (repo, sha))
        return cursor.execute("SELECT id FROM commits WHERE repo = ? AND sha = ?",
                              (repo, sha)).fetchone()[0]

    def _ids_of(self, cursor: sqlite3.Cursor, task: str, names: list[str],
                new_case_ids: dict[tuple[str, str], int]) -> dict[str, int]:
        """`{name: case id}` for the task's cases, creating the ids not seen before."""
        known = self._case_ids
        missing = [name for name in names
                   if (task, name) not in known and (task, name) not in new_case_ids]
        if missing:
            cursor.executemany("INSERT INTO case_keys (task, name) VALUES (?, ?)"
                               " ON CONFLICT DO NOTHING", ((task, name) for name in missing))
            # Every id of the task in one query: cheaper than looking up many names one by one.
            new_case_ids.update(((task, name), case_id) for case_id, name in cursor.execute(
                "SELECT id, name FROM case_keys WHERE task = ?", (task,)))
        return {name: known[task, name] if (task, name) in known else new_case_ids[task, name]
                for name in names}

    @staticmethod
    def _stored_outcomes(cursor: sqlite3.Cursor, run_id: int) -> dict[str, bool]:
        """`{case name: passed}` that a stored run contributed to its commit's counts."""
        (result,) = cursor.execute("SELECT result FROM runs WHERE id = ?", (run_id,)).fetchone()
        return case_outcomes(result, cursor.execute(
            "SELECT k.name, c.success FROM cases c JOIN case_keys k ON k.id = c.case_id"
            " WHERE c.run_id = ?", (run_id,)))

    @staticmethod
    def _add_counts(cursor: sqlite3.Cursor, commit_id: int, ids: dict[str, int],
                    outcomes: dict[str, bool], sign: int) -> None:
        """Add (sign 1) or take back (sign -1) one run's outcomes; rows at 0 runs go."""
        cursor.executemany(
            "INSERT INTO case_counts (commit_id, case_id, runs, failures) VALUES (?,?,?,?)"
            " ON CONFLICT DO UPDATE SET runs = runs + excluded.runs,"
            " failures = failures + excluded.failures",
            ((commit_id, ids[name], sign, sign * (not passed))
             for name, passed in outcomes.items()))
        if sign < 0:
            cursor.execute("DELETE FROM case_counts WHERE commit_id = ? AND runs = 0",
                           (commit_id,))

    # -- reading -----------------------------------------------------------------------------

    def runs(self, repo: str, commit: str, with_cases: bool = False) -> list[RunRecord]:
        with self._transaction(write=False) as cursor:
            rows = cursor.execute(
                "SELECT r.id, r.task, r.kind, r.run_index, r.attempt, r.result,"
                " r.duration_seconds, r.exit_code, r.started_at, r.branch"
                " FROM runs r JOIN commits c ON c.id = r.commit_id"
                " WHERE c.repo = ? AND c.sha = ? ORDER BY r.task, r.run_index, r.attempt",
                (repo, commit)).fetchall()
            records = []
            for run_id, *fields in rows:
                cases = []
                if with_cases:
                    cases = [CaseResult(name, bool(success), duration)
                             for name, success, duration in cursor.execute(
                                 "SELECT k.name, c.success, c.duration_seconds FROM cases c"
                                 " JOIN case_keys k ON k.id = c.case_id WHERE c.run_id = ?"
                                 " ORDER BY k.name", (run_id,))]
                records.append(RunRecord(repo, commit, *fields, cases=cases))
            return records

    def case_counts(self, repo: str, commits: Iterable[str]) -> dict[str, Aggregates]:
        counts: dict[str, Aggregates] = {}
        with self._transaction(write=False) as cursor:
            for sha, commit_id in self._commit_ids(cursor, repo, commits):
                rows = cursor.execute(
                    "SELECT case_id, runs, failures FROM case_counts WHERE commit_id = ?",
                    (commit_id,)).fetchall()
                if rows:
                    keys = self._case_keys_for(cursor, [row[0] for row in rows])
                    counts[sha] = {keys[case_id]: (runs, failures)
                                   for case_id, runs, failures in rows}
        return counts

    def _case_keys_for(self, cursor: sqlite3.Cursor,
                       case_ids: list[int]) -> dict[int, tuple[str, str]]:
        """The id -> (task, name) cache, made to hold `case_ids`.

        Every commit's aggregates share the same key tuples, which keeps a long line's history
        small in memory and makes comparing two commits' keys an identity check.
        """
        keys = self._case_keys
        missing = list(set(case_ids).difference(keys))
        for start in range(0, len(missing), IDS_PER_QUERY):
            chunk = missing[start:start + IDS_PER_QUERY]
            keys.update((case_id, (task, name)) for case_id, task, name in cursor.execute(
                f"SELECT id, task, name FROM case_keys WHERE id IN ({','.join('?' * len(chunk))})",
                chunk))
        return keys

    def tested_commits(self, repo: str, commits: Iterable[str]) -> set[str]:
        with self._transaction(write=False) as cursor:
            return {sha for sha, commit_id in self._commit_ids(cursor, repo, commits)
                    if cursor.execute("SELECT 1 FROM case_counts WHERE commit_id = ? LIMIT 1",
                                      (commit_id,)).fetchone()}

    @staticmethod
    def _commit_ids(cursor: sqlite3.Cursor, repo: str,
                    commits: Iterable[str]) -> list[tuple[str, int]]:
        shas = list(dict.fromkeys(commits))
        found = []
        for start in range(0, len(shas), IDS_PER_QUERY):
            chunk = shas[start:start + IDS_PER_QUERY]
            found += cursor.execute(
                f"SELECT sha, id FROM commits WHERE repo = ? AND sha IN ({','.join('?' * len(chunk))})",
                (repo, *chunk)).fetchall()
        return found

    def repos(self) -> list[str]:
        with self._transaction(write=False) as cursor:
            return [repo for (repo,) in cursor.execute(
                "SELECT DISTINCT c.repo FROM commits c"
                " WHERE EXISTS (SELECT 1 FROM runs r WHERE r.commit_id = c.id) ORDER BY c.repo")]

    def record_branch_line(self, repo: str, branch: str, line: list[str]) -> None:
        with self._transaction() as cursor:
            cursor.execute("INSERT INTO branch_lines (repo, branch, line) VALUES (?, ?, ?)"
                           " ON CONFLICT DO UPDATE SET line = excluded.line", (repo, branch, " ".join(line)))

    def branch_line(self, repo: str, branch: str) -> list[str] | None:
        with self._transaction(write=False) as cursor:
            try:
                row = cursor.execute("SELECT line FROM branch_lines WHERE repo = ? AND branch = ?",
                                     (repo, branch)).fetchone()
            except sqlite3.OperationalError:  # an older store opened read-only: no such table yet
                return None
        return row[0].split() if row else None

    def branches(self, repo: str) -> list[str]:
        with self._transaction(write=False) as cursor:
            try:
                return [branch for (branch,) in cursor.execute(
                    "SELECT branch FROM branch_lines WHERE repo = ? ORDER BY branch", (repo,))]
            except sqlite3.OperationalError:
                return []

    def ping(self) -> None:
        with self._transaction(write=False) as cursor:
            cursor.execute("SELECT 1 FROM commits LIMIT 1").fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
