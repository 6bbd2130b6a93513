"""One suite run against every history store: they must be interchangeable."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import redis

from redis_server import RedisServer
from testlooper import stats
from testlooper.store import (
    CaseResult, RunRecord, default_store_path, open_store,
)
from testlooper.store.sqlite import SqliteHistoryStore

REPO = "org/app"
OPERATOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator")


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/history.db"
    else:
        url = request.getfixturevalue("redis_server").url
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    with open_store(url) as opened:
        yield opened


def make_run(commit="c1", task="unit", run_index=0, attempt=0, result="passed", cases=(),
             repo=REPO, kind="test"):
    return RunRecord(repo=repo, commit=commit, task=task, kind=kind, run_index=run_index,
                     attempt=attempt, result=result, duration_seconds=1.5,
                     exit_code=0 if result == "passed" else 1, started_at=1_700_000_000.25,
                     branch="main", cases=[CaseResult(name, ok, 0.5) for name, ok in cases])


# -- recording and listing ---------------------------------------------------------------


def test_runs_lists_every_attempt_without_cases_unless_asked(store):
    store.record_runs([
        make_run(task="unit", run_index=1, cases=[("b", True), ("a", False)], result="failed"),
        make_run(task="unit", run_index=0, attempt=1),
        make_run(task="unit", run_index=0, attempt=0, result="error"),
        make_run(task="build", kind="build"),
    ])
    listed = store.runs(REPO, "c1")
    assert [(r.task, r.run_index, r.attempt, r.result) for r in listed] == [
        ("build", 0, 0, "passed"), ("unit", 0, 0, "error"), ("unit", 0, 1, "passed"),
        ("unit", 1, 0, "failed")]
    assert all(r.cases == [] for r in listed)
    assert listed[3] == make_run(task="unit", run_index=1, result="failed")
    with_cases = store.runs(REPO, "c1", with_cases=True)
    assert with_cases[3].cases == [CaseResult("a", False, 0.5), CaseResult("b", True, 0.5)]
    assert store.runs(REPO, "unknown") == []


def test_rerecording_a_run_replaces_it_and_never_double_counts(store):
    store.record_run(make_run(cases=[("a", True), ("b", False)], result="failed"))
    store.record_run(make_run(cases=[("a", True), ("b", False)], result="failed"))
    assert store.case_counts(REPO, ["c1"])["c1"] == {
        ("unit", ""): (1, 1), ("unit", "a"): (1, 0), ("unit", "b"): (1, 1)}
    store.record_run(make_run(cases=[("a", False), ("c", True)], result="failed"))
    assert store.case_counts(REPO, ["c1"])["c1"] == {
        ("unit", ""): (1, 1), ("unit", "a"): (1, 1), ("unit", "c"): (1, 0)}
    assert len(store.runs(REPO, "c1")) == 1
    assert [c.name for c in store.runs(REPO, "c1", with_cases=True)[0].cases] == ["a", "c"]


def test_only_the_final_attempt_of_each_run_index_counts(store):
    store.record_run(make_run(attempt=0, result="error"))
    store.record_run(make_run(attempt=1, result="failed", cases=[("a", False)]))
    store.record_run(make_run(attempt=2, result="passed", cases=[("a", True)]))
    expected = {("unit", ""): (1, 0), ("unit", "a"): (1, 0)}
    assert store.case_counts(REPO, ["c1"])["c1"] == expected
    # An earlier attempt arriving late changes nothing.
    store.record_run(make_run(attempt=1, result="failed", cases=[("a", False), ("z", False)]))
    assert store.case_counts(REPO, ["c1"])["c1"] == expected
    assert [r.attempt for r in store.runs(REPO, "c1")] == [0, 1, 2]


def test_run_indexes_add_up_to_runs_and_failures(store):
    store.record_runs(make_run(run_index=i, result="passed" if i % 2 else "failed",
                               cases=[("steady", True), ("flaky", bool(i % 2))])
                      for i in range(4))
    assert store.case_counts(REPO, ["c1"])["c1"] == {
        ("unit", ""): (4, 2), ("unit", "steady"): (4, 0), ("unit", "flaky"): (4, 2)}


def test_blocked_and_cancelled_runs_do_not_count(store):
    store.record_runs([make_run(commit="c1", result="blocked"),
                       make_run(commit="c1", task="lint", result="cancelled")])
    assert store.case_counts(REPO, ["c1"]) == {}
    assert store.tested_commits(REPO, ["c1"]) == set()
    assert len(store.runs(REPO, "c1")) == 2
    # A cancelled final attempt takes back what the attempt before it counted.
    store.record_run(make_run(commit="c2", attempt=0, result="failed", cases=[("a", False)]))
    store.record_run(make_run(commit="c2", run_index=1, cases=[("a", True)]))
    store.record_run(make_run(commit="c2", attempt=1, result="cancelled", cases=[("a", True)]))
    assert store.case_counts(REPO, ["c2"])["c2"] == {("unit", ""): (1, 0), ("unit", "a"): (1, 0)}


def test_error_runs_do_not_count(store):
    """`error` is the infrastructure failing (the worker died, inputs could not be fetched),
    not the test: it counts for nothing, like blocked and cancelled."""
    store.record_run(make_run(commit="c1", result="error", cases=[("a", False)]))
    assert store.case_counts(REPO, ["c1"]) == {}
    assert store.tested_commits(REPO, ["c1"]) == set()
    # A retry that passes after an error counts once, as passed.
    store.record_run(make_run(commit="c1", attempt=1, cases=[("a", True)]))
    assert store.case_counts(REPO, ["c1"])["c1"] == {("unit", ""): (1, 0), ("unit", "a"): (1, 0)}
    # An error final attempt takes back what the attempt before it counted.
    store.record_run(make_run(commit="c2", result="failed", cases=[("a", False)]))
    store.record_run(make_run(commit="c2", run_index=1, cases=[("a", True)]))
    store.record_run(make_run(commit="c2", attempt=1, result="error", cases=[("a", False)]))
    assert store.case_counts(REPO, ["c2"])["c2"] == {("unit", ""): (1, 0), ("unit", "a"): (1, 0)}
    assert len(store.runs(REPO, "c2")) == 3


def test_a_store_that_counted_errors_stops_counting_them_when_opened(store, monkeypatch):
    """Schema 1 counted `error` as a failure; opening such a store takes those counts back."""
    with monkeypatch.context() as old_rules:
        old_rules.setattr("testlooper.store.base.UNCOUNTED_RESULTS",
                          frozenset({"blocked", "cancelled"}))
        store.record_runs([
            make_run(commit="c1", attempt=0, result="failed", cases=[("a", False)]),
            make_run(commit="c1", attempt=1, result="error", cases=[("a", False), ("b", True)]),
            make_run(commit="c1", run_index=1, cases=[("a", True)]),
            make_run(commit="c2", result="error"),
            make_run(commit="c3", result="error", task="lint"),
            make_run(commit="c3", result="failed", cases=[("a", False)]),
            make_run(commit="c4", attempt=0, result="error"),
            make_run(commit="c4", attempt=1, result="passed"),
        ])
        assert store.case_counts(REPO, ["c1"])["c1"][("unit", "")] == (2, 1)
        assert store.tested_commits(REPO, ["c2"]) == {"c2"}
    set_schema_version(store, 1)
    with open_store(store.url) as reopened:
        assert reopened.case_counts(REPO, ["c1", "c2", "c3", "c4"]) == {
            "c1": {("unit", ""): (1, 0), ("unit", "a"): (1, 0)},
            "c3": {("unit", ""): (1, 1), ("unit", "a"): (1, 1)},
            "c4": {("unit", ""): (1, 0)}}
        # And from then on the store counts by the new rules.
        reopened.record_run(make_run(commit="c1", attempt=2, cases=[("a", True)]))
        assert reopened.case_counts(REPO, ["c1"])["c1"] == {
            ("unit", ""): (2, 0), ("unit", "a"): (2, 0)}
        assert len(reopened.runs(REPO, "c1")) == 4
    with open_store(store.url) as again:  # migrated once: opening again changes nothing
        assert again.case_counts(REPO, ["c1"])["c1"] == {
            ("unit", ""): (2, 0), ("unit", "a"): (2, 0)}


def test_a_schema_2_sqlite_store_gains_run_index_allocations_when_opened(tmp_path):
    path = tmp_path / "history.db"
    with open_store(str(path)) as store:
        store.record_run(make_run(run_index=2))
    with sqlite3.connect(path) as db:  # as TestLooper wrote it before allocations existed
        db.execute("DROP TABLE run_index_allocations")
        db.execute("PRAGMA user_version = 2")
    with open_store(str(path)) as reopened:
        assert reopened.allocate_run_indexes(REPO, "c1", "unit", 1) == 3
        assert len(reopened.runs(REPO, "c1")) == 1


def test_branch_lines_are_kept_per_repo_and_branch_and_replaced(store):
    assert store.branch_line(REPO, "main") is None and store.branches(REPO) == []
    store.record_branch_line(REPO, "main", ["c3", "c2", "c1"])
    store.record_branch_line(REPO, "release/1.0", ["r1"])
    store.record_branch_line("team/other:repo", "main", ["x"])
    assert store.branch_line(REPO, "main") == ["c3", "c2", "c1"]
    store.record_branch_line(REPO, "main", ["c4", "c3"])  # a force push rewrites it
    assert store.branch_line(REPO, "main") == ["c4", "c3"]
    assert store.branches(REPO) == ["main", "release/1.0"]
    assert store.branch_line("team/other:repo", "main") == ["x"]


def test_a_schema_3_sqlite_store_gains_branch_lines_when_opened_and_reads_without_them(tmp_path):
    path = tmp_path / "history.db"
    with open_store(str(path)) as store:
        store.record_run(make_run(run_index=0))
    with sqlite3.connect(path) as db:  # as TestLooper wrote it before branch lines existed
        db.execute("DROP TABLE branch_lines")
        db.execute("PRAGMA user_version = 3")
    path.chmod(0o444)
    try:
        from testlooper.store.sqlite import SqliteHistoryStore as Sqlite
        with Sqlite(str(path), read_only=True) as reader:  # history on a store it may not change
            assert reader.branch_line(REPO, "main") is None and reader.branches(REPO) == []
    finally:
        path.chmod(0o644)
    with open_store(str(path)) as reopened:
        reopened.record_branch_line(REPO, "main", ["c1"])
        assert reopened.branch_line(REPO, "main") == ["c1"]


def set_schema_version(store, version):
    if isinstance(store, SqliteHistoryStore):
        with sqlite3.connect(store.path) as db:
            db.execute(f"PRAGMA user_version = {version}")
    else:
        with redis.Redis.from_url(store.url) as client:
            client.set("tl:schema", version)


def test_a_task_without_cases_has_history_through_its_own_result(store):
    store.record_run(make_run(task="build", kind="build", result="timeout"))
    assert store.case_counts(REPO, ["c1"]) == {"c1": {("build", ""): (1, 1)}}


def test_a_case_reported_twice_in_a_run_counts_once_and_fails_if_either_failed(store):
    store.record_run(make_run(cases=[("a", True), ("a", False), ("b", True), ("b", True)]))
    assert store.case_counts(REPO, ["c1"])["c1"] == {
        ("unit", ""): (1, 0), ("unit", "a"): (1, 1), ("unit", "b"): (1, 0)}
    assert store.runs(REPO, "c1", with_cases=True)[0].cases == [
        CaseResult("a", False, 1.0), CaseResult("b", True, 1.0)]


def test_batches_apply_like_runs_recorded_one_by_one(store):
    batch = [
        make_run(commit="c1", attempt=0, result="failed", cases=[("a", False)]),
        make_run(commit="c2", cases=[("a", True)]),
        make_run(commit="c1", attempt=1, cases=[("a", True)]),
        make_run(commit="c1", attempt=1, cases=[("a", True), ("b", True)]),
        make_run(commit="c1", run_index=1, result="failed", cases=[("b", False)]),
    ]
    store.record_runs(batch)
    assert store.case_counts(REPO, ["c1", "c2"]) == {
        "c1": {("unit", ""): (2, 1), ("unit", "a"): (1, 0), ("unit", "b"): (2, 1)},
        "c2": {("unit", ""): (1, 0), ("unit", "a"): (1, 0)}}
    assert len(store.runs(REPO, "c1")) == 3


# -- allocating run indexes ------------------------------------------------------------------


def test_allocated_run_indexes_follow_the_recorded_and_the_allocated_ones(store):
    assert store.allocate_run_indexes(REPO, "c1", "unit", 3) == 0
    assert store.allocate_run_indexes(REPO, "c1", "unit", 2) == 3
    # Other tasks, commits and repos have their own numbering.
    assert store.allocate_run_indexes(REPO, "c1", "lint", 1) == 0
    assert store.allocate_run_indexes(REPO, "c2", "unit", 1) == 0
    assert store.allocate_run_indexes("org/other", "c1", "unit", 1) == 0
    # Runs recorded without allocating (a spool replay) move the next range past them.
    store.record_run(make_run(commit="c1", run_index=9))
    assert store.allocate_run_indexes(REPO, "c1", "unit", 1) == 10
    store.record_run(make_run(commit="c3", run_index=4))
    assert store.allocate_run_indexes(REPO, "c3", "unit", 2) == 5
    assert store.allocate_run_indexes(REPO, "c3", "unit", 1) == 7
    # Allocating records no run: nothing is counted, the commit is not tested.
    assert store.runs(REPO, "c2") == []
    assert store.tested_commits(REPO, ["c2"]) == set()


def test_run_indexes_allocated_by_many_processes_at_once_never_overlap(store, tmp_path):
    """Eight processes, each with its own connection, allocate at once: every range is given out
    once."""
    script = textwrap.dedent(f"""
        import json, sys
        from testlooper.store import open_store
        with open_store(sys.argv[1]) as store:
            print(json.dumps([store.allocate_run_indexes({REPO!r}, "c1", "unit", 3)
                              for _ in range(25)]))
    """)
    env = {**os.environ, "PYTHONPATH": OPERATOR_DIR}
    processes = [subprocess.Popen([sys.executable, "-c", script, store.url], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(8)]
    firsts = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        firsts += json.loads(out)
    assert sorted(firsts) == list(range(0, 8 * 25 * 3, 3))


# -- reading -----------------------------------------------------------------------------


def test_tested_commits_and_case_counts_cover_only_tested_commits_of_the_repo(store):
    store.record_runs([make_run(commit="c1"), make_run(commit="c3"),
                       make_run(commit="c2", repo="org/other"),
                       make_run(commit="c4", result="blocked")])
    asked = ["c4", "c3", "c2", "c1", "never-seen"]
    assert store.tested_commits(REPO, asked) == {"c1", "c3"}
    assert set(store.case_counts(REPO, asked)) == {"c1", "c3"}
    assert store.tested_commits("org/other", asked) == {"c2"}
    assert store.case_counts(REPO, []) == {}
    assert store.repos() == ["org/app", "org/other"]


def test_names_with_unicode_slashes_and_colons_round_trip(store):
    repo, task = "org:team/app ü", "tests/ünït:fast"
    names = ["tests/test_ä.py::test_ß[x/y]", "naïve::日本語", "a:b:c"]
    store.record_run(make_run(repo=repo, commit="c1", task=task,
                              cases=[(name, True) for name in names]))
    store.record_run(make_run(repo=repo.replace(":", "/"), commit="c1", task=task))
    assert store.case_counts(repo, ["c1"])["c1"] == {
        (task, ""): (1, 0), **{(task, name): (1, 0) for name in names}}
    assert sorted(c.name for c in store.runs(repo, "c1", with_cases=True)[0].cases) == sorted(names)
    assert repo in store.repos()


def test_ping_answers_when_the_store_is_up(store):
    store.ping()


# -- end to end with the statistics ----------------------------------------------------------


def test_a_line_classified_from_the_store(store):
    history = {  # commit -> (task, case outcomes per run index)
        "c1": {"a": [True], "b": [True], "c": [False]},
        "c3": {"a": [False], "b": [True, False], "c": [True], "d": [True]},
        "c4": {"a": [False], "b": [True], "d": [False]},
    }
    for commit, cases in history.items():
        runs = max(len(outcomes) for outcomes in cases.values())
        store.record_runs(make_run(commit=commit, run_index=i, result="passed",
                                   cases=[(name, outcomes[i]) for name, outcomes in cases.items()
                                          if i < len(outcomes)])
                          for i in range(runs))
    line = ["c5", "c4", "c3", "c2", "c1"]  # c2 and c5 untested
    classes = stats.classify_line(line, store.case_counts(REPO, line))
    assert set(classes) == {"c1", "c3", "c4"}
    assert classes["c3"] == {("unit", ""): stats.GOOD, ("unit", "a"): stats.BROKEN,
                             ("unit", "b"): stats.FLAKY, ("unit", "c"): stats.FIXED,
                             ("unit", "d"): stats.NEW}
    assert classes["c4"] == {("unit", ""): stats.GOOD, ("unit", "a"): stats.BAD,
                             ("unit", "b"): stats.GOOD, ("unit", "c"): stats.REMOVED,
                             ("unit", "d"): stats.BROKEN}
    rates = stats.flake_rates(line, store.case_counts(REPO, line), last_n=2)
    assert rates[0] == stats.FlakeRate("unit", "b", 2, 1, 3, 1, 0.5)


# -- opening ---------------------------------------------------------------------------------


def test_open_store_understands_paths_and_urls(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_store_path() == str(tmp_path / "data" / "testlooper" / "history.db")
    with open_store(None) as store:
        assert isinstance(store, SqliteHistoryStore)
        assert store.path == default_store_path()
    assert os.path.exists(default_store_path())
    with open_store(str(tmp_path / "plain.db")) as store:
        assert store.url == f"sqlite://{tmp_path}/plain.db"
    with open_store(redis_server.url) as store:
        assert store.url == redis_server.url
    with pytest.raises(ValueError, match="three slashes"):
        open_store("sqlite://relative.db")
    with pytest.raises(ValueError, match="expected a path"):
        open_store("postgres://db/history")


def test_task_runs_are_that_tasks_runs_alone_whatever_its_name(store):
    # Names a prefix match could confuse: glob characters, quotes, backslashes, one the prefix of another.
    tasks = ["unit", "unit2", "un*t", "u[n]it?", 'say "hi"\\now', "ünï/cødé"]
    store.record_runs([make_run(task=task, run_index=index, attempt=attempt, cases=[(f"{task}-case", True)])
                       for task in tasks for index in (0, 1) for attempt in (0, 1)])
    store.record_run(make_run(commit="c2", task="unit"))
    for task in tasks:
        expected = [run for run in store.runs(REPO, "c1", with_cases=True) if run.task == task]
        assert store.task_runs(REPO, "c1", task, with_cases=True) == expected and len(expected) == 4
        assert [run.cases for run in store.task_runs(REPO, "c1", task)] == [[]] * 4
    assert store.task_runs(REPO, "c1", "u*") == [] and store.task_runs(REPO, "c3", "unit") == []


def test_final_attempts_are_told_apart_across_run_indexes_sharing_digits_and_tasks_sharing_a_prefix(store):
    # Recording one run reads only that run index's attempts (Redis): 1 must not see 10's, nor "unit" "unit2"'s.
    store.record_run(make_run(task="unit", run_index=10, attempt=5, result="passed", cases=[("a", True)]))
    store.record_run(make_run(task="unit2", run_index=1, attempt=7, result="failed", cases=[("a", False)]))
    store.record_run(make_run(task="unit", run_index=1, attempt=0, result="failed", cases=[("a", False)]))
    store.record_run(make_run(task="unit", run_index=1, attempt=1, result="passed", cases=[("a", True)]))
    store.record_run(make_run(task="unit", run_index=1, attempt=0, result="failed", cases=[("a", False)]))
    counts = store.case_counts(REPO, ["c1"])["c1"]
    assert counts[("unit", "a")] == (2, 0) and counts[("unit", "")] == (2, 0)
    assert counts[("unit2", "a")] == (1, 1)
