"""The stores when things go wrong: Redis dying mid-run, two processes on one SQLite file."""

import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from redis_server import RedisServer, free_port
from testlooper.store import (
    CaseResult, RunRecord, StoreError, StoreUnavailable, open_store, read_spool, replay_spool,
    write_spool,
)

REPO = "org/app"
OPERATOR_DIR = os.path.join(os.path.dirname(__file__), "..", "operator")


def make_run(commit, run_index=0, cases=5):
    return RunRecord(REPO, commit, "unit", "test", run_index, 0, "passed", 1.0, 0, 1.7e9, "main",
                     [CaseResult(f"case{i}", True, 0.1) for i in range(cases)])


def counted_runs(store, commits):
    """How many runs of the task each commit has counted."""
    return {sha: counts[("unit", "")][0] for sha, counts in store.case_counts(REPO, commits).items()}


def test_redis_down_mid_run_spool_and_replay_lose_nothing(tmp_path):
    spool = str(tmp_path / "unrecorded.jsonl")
    runs = [make_run(f"c{i}", run_index) for i in range(4) for run_index in range(3)]
    with RedisServer(persistent=True) as server:
        store = open_store(server.url)
        store.record_runs(runs[:5])
        server.kill()

        # As the local runner does: the first failure spools that run and all later ones.
        unrecorded = runs[5:]
        with pytest.raises(StoreUnavailable) as raised:
            store.record_run(unrecorded[0])
        assert str(raised.value).startswith(f"history store {server.url} is unreachable: ")
        assert "Connection refused" in str(raised.value)
        write_spool(spool, unrecorded[:3])
        write_spool(spool, unrecorded[3:])
        with pytest.raises(StoreUnavailable):
            replay_spool(store, spool)
        assert read_spool(spool) == unrecorded

        server.start()  # same port and directory: the append-only file brings back runs[:5]
        assert replay_spool(store, spool) == len(unrecorded)
        assert not os.path.exists(spool)
        assert replay_spool(store, spool) == 0
        assert counted_runs(store, [f"c{i}" for i in range(4)]) == {f"c{i}": 3 for i in range(4)}
        assert len(store.runs(REPO, "c3", with_cases=True)[2].cases) == 5
        store.close()


class FailsAfter:
    """A store that records a number of runs and then goes down."""

    def __init__(self, store, runs_before_failing):
        self.store = store
        self.left = runs_before_failing

    def record_runs(self, runs):
        runs = list(runs)
        if len(runs) > self.left:
            raise StoreUnavailable("history store test://down is unreachable: test")
        self.left -= len(runs)
        self.store.record_runs(runs)

    def __getattr__(self, name):  # reading goes to the real store
        return getattr(self.store, name)


def test_a_replay_cut_short_keeps_only_the_unrecorded_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("testlooper.store.REPLAY_BATCH", 2)
    spool = str(tmp_path / "unrecorded.jsonl")
    runs = [make_run(f"c{i}") for i in range(5)]
    write_spool(spool, runs)
    with open_store(str(tmp_path / "history.db")) as store:
        with pytest.raises(StoreUnavailable):
            replay_spool(FailsAfter(store, 2), spool)
        assert read_spool(spool) == runs[2:]
        assert replay_spool(store, spool) == 3
        assert counted_runs(store, [run.commit for run in runs]) == {run.commit: 1 for run in runs}


def test_a_spool_line_cut_off_by_a_crash_is_skipped(tmp_path):
    spool = tmp_path / "unrecorded.jsonl"
    write_spool(str(spool), [make_run("c1")])
    with open(spool, "a") as file:
        file.write('{"repo": "org/app", "comm')
    assert read_spool(str(spool)) == [make_run("c1")]
    assert read_spool(str(tmp_path / "missing.jsonl")) == []


def test_unreachable_redis_url_fails_at_open_with_a_clear_message():
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url)
    assert str(raised.value).startswith(f"history store {url} is unreachable: ")
    assert "Connection refused" in str(raised.value)
    assert time.monotonic() - started < 5


def test_redis_url_passwords_stay_out_of_messages():
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/2"
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url)
    assert "s3cret" not in str(raised.value)
    assert "/2 is unreachable" in str(raised.value)


def test_sqlite_whose_folder_is_a_file_or_missing_is_refused_and_nothing_is_made(tmp_path):
    """A path typed wrong must not start a new, empty history: a fault to fix, not an outage
    to spool through."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match="a-file is not a folder") as raised:
        open_store(str(tmp_path / "a-file" / "history.db"))
    assert not isinstance(raised.value, StoreUnavailable)
    with pytest.raises(StoreError, match="typo does not exist"):
        open_store(str(tmp_path / "typo" / "history.db"))
    assert not (tmp_path / "typo").exists()


def test_the_default_sqlite_store_makes_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "fresh" / "data"))
    with open_store("") as store:
        assert store.path == str(tmp_path / "fresh" / "data" / "testlooper" / "history.db")
    assert os.path.isfile(tmp_path / "fresh" / "data" / "testlooper" / "history.db")


def test_a_sqlite_database_of_another_program_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    with pytest.raises(StoreError, match="database of another program"):
        open_store(str(path))
    with sqlite3.connect(path) as db:
        assert [name for (name,) in db.execute("SELECT name FROM sqlite_master")] == ["recipes"]


def test_a_read_only_sqlite_store_opens_for_reading_only(tmp_path):
    from fs_helpers import read_only
    from testlooper.store import StoreReadOnly

    folder = tmp_path / "store"
    folder.mkdir()
    path = str(folder / "history.db")
    with open_store(path) as store:
        store.record_run(make_run("c1"))
    with read_only(folder):
        with pytest.raises(StoreReadOnly, match="is read-only"):
            open_store(path)
        with open_store(path, read_only=True) as reader:
            assert counted_runs(reader, ["c1"]) == {"c1": 1}
            with pytest.raises(StoreUnavailable):
                reader.record_run(make_run("c2"))


def test_sqlite_written_by_a_newer_testlooper_is_refused(tmp_path):
    path = str(tmp_path / "history.db")
    open_store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(path)


WRITER = textwrap.dedent("""
    import sys, time
    from testlooper.store import CaseResult, RunRecord, open_store
    store = open_store(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.record_run(RunRecord("org/app", f"c{i}", "unit", "test", 0, 0, "passed", 1.0, 0,
                                   1.7e9, "main", [CaseResult(f"case{n}", True, 0.1)
                                                   for n in range(200)]))
        # A pause between commits, as real runs have: on a loaded machine a writer that never
        # pauses can finish before the reader's first turn, and the test would see no progress.
        time.sleep(0.003)
    store.close()
""")


def test_sqlite_serves_a_writer_and_a_reader_in_two_processes(tmp_path):
    path = str(tmp_path / "history.db")
    commits = [f"c{i}" for i in range(300)]
    open_store(path).close()
    env = {**os.environ, "PYTHONPATH": OPERATOR_DIR}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(len(commits))], env=env,
                              stderr=subprocess.PIPE, text=True)
    seen = []
    with open_store(path) as reader:
        while writer.poll() is None:
            # The reader writes too, so both processes contend for the write lock.
            reader.record_run(make_run(f"reader{len(seen)}"))
            tested = reader.tested_commits(REPO, commits)
            counts = reader.case_counts(REPO, commits)
            # Each commit is written in one transaction: a reader sees all of it or none.
            assert all(len(cases) == 201 for cases in counts.values())
            assert set(counts) >= tested
            seen.append(len(counts))
        assert writer.wait() == 0, writer.stderr.read()
        assert reader.tested_commits(REPO, commits) == set(commits)
        assert len(reader.tested_commits(REPO, [f"reader{n}" for n in range(len(seen))])) == len(seen)
    assert seen == sorted(seen)
    assert len(set(seen)) > 2, "the reader should have seen the writer's progress"


APPENDER = textwrap.dedent("""
    import sys
    from testlooper.store import CaseResult, RunRecord, write_spool
    for i in range(int(sys.argv[2])):
        write_spool(sys.argv[1], [RunRecord("org/app", f"c{i}", "unit", "test", 0, 0, "passed",
                                            1.0, 0, 1.7e9, "main", [CaseResult("case0", True, 0.1)])])
""")


class CountingStore:
    """A store that counts how many times each run reaches it."""

    def __init__(self, store):
        self.store = store
        self.recorded: dict[str, int] = {}

    def record_runs(self, runs):
        runs = list(runs)
        for run in runs:
            self.recorded[run.commit] = self.recorded.get(run.commit, 0) + 1
        self.store.record_runs(runs)

    def __getattr__(self, name):  # reading goes to the real store
        return getattr(self.store, name)


def test_a_replay_racing_an_append_loses_no_line(tmp_path):
    """One process appends to the spool (a `watch` with the store down) while another replays
    it (a `history`): every appended run reaches the store, and exactly once."""
    spool = str(tmp_path / "unrecorded.jsonl")
    appended = 400
    env = {**os.environ, "PYTHONPATH": OPERATOR_DIR}
    appender = subprocess.Popen([sys.executable, "-c", APPENDER, spool, str(appended)], env=env,
                                stderr=subprocess.PIPE, text=True)
    with open_store(str(tmp_path / "history.db")) as store:
        counting = CountingStore(store)
        replays = 0
        while appender.poll() is None:
            replay_spool(counting, spool)
            replays += 1
        assert appender.wait() == 0, appender.stderr.read()
        replay_spool(counting, spool)
        commits = [f"c{i}" for i in range(appended)]
        missing = sorted(set(commits) - set(counting.recorded), key=lambda c: int(c[1:]))
        assert missing == [], f"{len(missing)} of {appended} appended runs were lost"
        assert all(times == 1 for times in counting.recorded.values())
        assert counted_runs(store, commits) == {sha: 1 for sha in commits}
    assert replays > 2, "the replays should have overlapped the appends"
    assert not os.path.exists(spool)


def test_spool_works_without_file_locks(tmp_path, monkeypatch):
    """Where fcntl does not exist, spooling and replaying go on without locking."""
    monkeypatch.setattr("testlooper.store.fcntl", None)
    spool = str(tmp_path / "unrecorded.jsonl")
    write_spool(spool, [make_run("c1"), make_run("c2")])
    with open_store(str(tmp_path / "history.db")) as store:
        assert replay_spool(store, spool) == 2
        assert counted_runs(store, ["c1", "c2"]) == {"c1": 1, "c2": 1}
    assert not os.path.exists(spool)


def test_a_spooled_run_never_replaces_another_commands_run(tmp_path):
    """A command that could not reach the store numbered its runs from 0; the store already
    held run 0 (attempts 1 and 2) of the same task from an earlier command. The spooled run
    and its retry move to the next free index; replaying the spool again changes nothing."""
    store = open_store(str(tmp_path / "history.db"))
    earlier = [RunRecord(REPO, "c1", "unit", "test", 0, attempt, result, 1.0, 0, 100.0 + attempt, "main", [])
               for attempt, result in ((1, "failed"), (2, "passed"))]
    store.record_runs(earlier)
    spool = str(tmp_path / "spool.jsonl")
    later = [RunRecord(REPO, "c1", "unit", "test", 0, attempt, "passed", 1.0, 0, 200.0 + attempt, "main", [])
             for attempt in (1, 2)]
    write_spool(spool, later)
    assert replay_spool(store, spool) == 2
    stored = sorted((r.run_index, r.attempt, r.started_at) for r in store.runs(REPO, "c1"))
    assert stored == [(0, 1, 101.0), (0, 2, 102.0), (1, 1, 201.0), (1, 2, 202.0)]
    write_spool(spool, [stored_run for stored_run in store.runs(REPO, "c1") if stored_run.run_index == 1])
    replay_spool(store, spool)  # a replay of what is already there: replaced, not moved
    assert len(store.runs(REPO, "c1")) == 4
    store.close()


def test_a_spooled_run_moves_past_indexes_another_command_allocated_but_not_recorded(tmp_path):
    """The spooling command numbered its run 0 (it could not reach the store); meanwhile
    another command allocated indexes 0 and 1 and is still running. The spooled run takes a
    fresh index, so the other command's runs, recorded later, replace nothing."""
    with open_store(str(tmp_path / "history.db")) as store:
        assert store.allocate_run_indexes(REPO, "c1", "unit", 2) == 0
        spool = str(tmp_path / "spool.jsonl")
        write_spool(spool, [make_run("c1", 0)])
        assert replay_spool(store, spool) == 1
        assert [r.run_index for r in store.runs(REPO, "c1")] == [2]
        store.record_runs([make_run("c1", 0), make_run("c1", 1)])
        assert counted_runs(store, ["c1"]) == {"c1": 3}


OPENER = textwrap.dedent("""
    import sys, time
    from testlooper.store import open_store
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all processes open at once
    with open_store(sys.argv[1]) as store:
        store.ping()
""")


def test_many_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Switching a new file to WAL takes a lock SQLite does not wait for: without asking again,
    some of them failed "database is locked" (and a `testlooper run` then spooled its results)."""
    for trial in range(2):
        path = str(tmp_path / f"new-{trial}.db")
        start_at = time.time() + 1.5
        openers = [subprocess.Popen([sys.executable, "-c", OPENER, path, str(start_at)],
                                    env={**os.environ, "PYTHONPATH": OPERATOR_DIR},
                                    stderr=subprocess.PIPE, text=True) for _ in range(8)]
        errors = [opener.communicate(timeout=60)[1] for opener in openers]
        assert [opener.returncode for opener in openers] == [0] * 8, "\n".join(errors)
