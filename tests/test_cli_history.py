"""`testlooper history` and `testlooper flaky` on real git repositories and real stores.

The history is recorded with the store API directly (no task runs), on this line of `main`:

    c1 -- c2 -- c3 (untested) -- c4 -- c5 (untested, the tip)
           \\
            f1 (branch feature)

c2 makes unit/linux::test_net and integration/linux flaky; c4 breaks docs/linux (which c2 did
not run), lint/linux and test_parse, fixes test_fix, removes test_gone and adds test_new
(failing) and test_added (passing).
"""

import json
import textwrap

import pytest

from gitrepo import GitRepo
from redis_server import RedisServer, free_port
from testlooper import terminal
from testlooper.gitio import open_repo
from testlooper.local.target import repo_identity
from testlooper.store import CaseResult, RunRecord, open_store

P, F = True, False


def identity(repo: GitRepo) -> str:
    """The repository's name in the history, as the commands compute it."""
    return repo_identity(open_repo(repo.path))


def task_runs(repo_id: str, sha: str, task: str, *runs) -> list[RunRecord]:
    """One RunRecord per run: True/False for a task reporting no cases, or `{case: passed}`
    (the run passed when all its cases did)."""
    records = []
    for index, run in enumerate(runs):
        cases = {} if isinstance(run, bool) else run
        passed = run if isinstance(run, bool) else all(cases.values())
        records.append(RunRecord(
            repo=repo_id, commit=sha, task=task, kind="build" if task.startswith("build/") else "test",
            run_index=index, attempt=1, result="passed" if passed else "failed", duration_seconds=1.0,
            exit_code=0 if passed else 1, started_at=0.0,
            cases=[CaseResult(name, success) for name, success in cases.items()]))
    return records


def unit(parse=P, net=P, fix=P, **others):
    return {"test_parse": parse, "test_net": net, "test_fix": fix, **others}


def history_records(repo_id: str, shas: dict) -> list[RunRecord]:
    c1, c2, c4, f1 = shas["c1"], shas["c2"], shas["c4"], shas["f1"]
    return [
        *task_runs(repo_id, c1, "build/linux", P),
        *task_runs(repo_id, c1, "unit/linux", *[unit(fix=F, test_gone=P)] * 3),
        *task_runs(repo_id, c1, "integration/linux", P, P, P, P),
        *task_runs(repo_id, c1, "lint/linux", P),
        *task_runs(repo_id, c1, "docs/linux", P),

        *task_runs(repo_id, c2, "build/linux", P),
        *task_runs(repo_id, c2, "unit/linux", unit(net=F, fix=F, test_gone=P), *[unit(fix=F, test_gone=P)] * 2),
        *task_runs(repo_id, c2, "integration/linux", P, F, P, P),
        *task_runs(repo_id, c2, "lint/linux", P),

        *task_runs(repo_id, c4, "build/linux", P),
        *task_runs(repo_id, c4, "unit/linux", *[unit(parse=F, net=(run != 1), test_new=F, test_added=P)
                                                for run in range(3)]),
        *task_runs(repo_id, c4, "integration/linux", P, P, P, P),
        *task_runs(repo_id, c4, "lint/linux", F),
        *task_runs(repo_id, c4, "docs/linux", F),

        *task_runs(repo_id, f1, "build/linux", P),
        *task_runs(repo_id, f1, "unit/linux", *[unit()] * 3),
        *task_runs(repo_id, f1, "lint/linux", P),
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(repo, {name: sha}, store URL) with the history above in a SQLite store."""
    base = tmp_path_factory.mktemp("history")
    repo = GitRepo(base / "repo")
    shas = {"c1": repo.commit({"parser.py": "1"}, "Add the parser"),
            "c2": repo.commit({"net.py": "1"}, "Speed up the network layer")}
    repo.git("branch", "feature")
    shas["c3"] = repo.commit({"README": "typo"}, "Fix a typo")
    shas["c4"] = repo.commit({"parser.py": "2"}, "Rewrite the parser from scratch, keeping only the tests\n\nBody.")
    shas["c5"] = repo.commit({"net.py": "2"}, "Not run yet")
    repo.git("checkout", "--quiet", "feature")
    shas["f1"] = repo.commit({"feature.py": "1"}, "Feature work")
    repo.git("checkout", "--quiet", "main")
    url = str(base / "history.db")
    with open_store(url) as store:
        store.record_runs(history_records(identity(repo), shas))
    return repo, shas, url


def test_history_grid_and_the_cases_to_look_at_on_the_newest_tested_commit(project, cli):
    repo, shas, url = project
    status, out, err = cli("history", str(repo.path), "--store", url)
    assert (status, err) == (0, "")
    c1, c2, c4 = shas["c1"][:12], shas["c2"][:12], shas["c4"][:12]
    assert out == textwrap.dedent(f"""\
        main of {identity(repo)}: 3 tested commits, newest first (2 untested commits left out)

        COMMIT        MESSAGE                                   build/linux  docs/linux  integration/linux  lint/linux  unit/linux
        {c4}  Rewrite the parser from scratch, keep...  passed 1/1   failed 0/1  passed 4/4         failed 0/1  failed 0/3
        {c2}  Speed up the network layer                passed 1/1   -           flaky 3/4          passed 1/1  failed 0/3
        {c1}  Add the parser                            passed 1/1   passed 1/1  passed 4/4         passed 1/1  failed 0/3

        On {c4}, the newest tested commit, against each task's previous results:
        CLASS    CASE                      RESULT
        broken   docs/linux                failed 0/1
        broken   lint/linux                failed 0/1
        broken   unit/linux :: test_parse  failed 0/3
        bad      unit/linux                failed 0/3
        flaky    unit/linux :: test_net    flaky 2/3
        new      unit/linux :: test_new    failed 0/3
        fixed    unit/linux :: test_fix    passed 3/3
        removed  unit/linux :: test_gone   -
        """)


def test_history_colours_results_and_classes_on_a_terminal(project, cli, monkeypatch):
    repo, _, url = project
    monkeypatch.setattr(terminal, "colour_wanted", lambda stream=None: True)
    _, out, _ = cli("history", str(repo.path), "--store", url)
    assert "\033[32mpassed 1/1\033[0m" in out
    assert "\033[31mfailed 0/3\033[0m" in out
    assert "\033[33mflaky 3/4\033[0m" in out
    assert "\033[31mbroken\033[0m" in out


def test_history_json_lists_every_commit_and_each_case_per_tested_commit(project, cli):
    repo, shas, url = project
    status, out, _ = cli("history", str(repo.path), "--store", url, "--json")
    document = json.loads(out)
    assert status == 0
    assert (document["repo"], document["branch"]) == (identity(repo), "main")
    assert document["commits"] == [
        {"sha": shas["c5"], "message": "Not run yet", "tested": False},
        {"sha": shas["c4"], "message": "Rewrite the parser from scratch, keeping only the tests", "tested": True},
        {"sha": shas["c3"], "message": "Fix a typo", "tested": False},
        {"sha": shas["c2"], "message": "Speed up the network layer", "tested": True},
        {"sha": shas["c1"], "message": "Add the parser", "tested": True},
    ]
    tasks = document["tasks"]
    assert sorted(tasks) == ["build/linux", "docs/linux", "integration/linux", "lint/linux", "unit/linux"]
    assert sorted(tasks["unit/linux"]) == ["", "test_added", "test_fix", "test_gone", "test_net", "test_new",
                                           "test_parse"]
    assert tasks["unit/linux"]["test_net"] == [
        {"commit": shas["c4"], "runs": 3, "failures": 1, "class": "flaky"},
        {"commit": shas["c2"], "runs": 3, "failures": 1, "class": "flaky"},
        {"commit": shas["c1"], "runs": 3, "failures": 0, "class": "new"},
    ]
    assert tasks["docs/linux"][""] == [
        {"commit": shas["c4"], "runs": 1, "failures": 1, "class": "broken"},
        {"commit": shas["c1"], "runs": 1, "failures": 0, "class": "new"},
    ]
    assert [entry["class"] for entry in tasks["unit/linux"]["test_fix"]] == ["fixed", "bad", "new"]


def test_history_test_globs_choose_the_columns_and_the_cases(project, cli):
    repo, _, url = project
    _, out, _ = cli("history", str(repo.path), "--store", url, "--test", "unit/*", "--test", "lint*")
    header = out.splitlines()[2].split()
    assert header == ["COMMIT", "MESSAGE", "lint/linux", "unit/linux"]
    assert "; tasks matching unit/*, lint*" in out.splitlines()[0]
    assert "docs/linux" not in out and "integration" not in out
    assert "broken   unit/linux :: test_parse" in out


def test_history_test_glob_counts_only_commits_that_ran_a_matching_task(project, cli):
    repo, shas, url = project
    _, out, _ = cli("history", str(repo.path), "--store", url, "--test", "docs/*", "--json")
    document = json.loads(out)
    assert list(document["tasks"]) == ["docs/linux"]
    assert [c["sha"] for c in document["commits"] if c["tested"]] == [shas["c4"], shas["c1"]]


def test_history_limit_shows_fewer_commits_still_classified_against_older_runs(project, cli):
    repo, shas, url = project
    _, out, _ = cli("history", str(repo.path), "--store", url, "--limit", "1", "--json")
    document = json.loads(out)
    assert [c["sha"] for c in document["commits"]] == [shas["c5"], shas["c4"]]
    # docs/linux last ran on c1, beyond c2: it is still compared with that run.
    assert document["tasks"]["docs/linux"][""] == [{"commit": shas["c4"], "runs": 1, "failures": 1,
                                                     "class": "broken"}]
    _, out, _ = cli("history", str(repo.path), "--store", url, "--limit", "2")
    assert "2 tested commits" in out and shas["c2"][:12] in out and shas["c1"][:12] not in out


def test_history_of_another_branch(project, cli):
    repo, shas, url = project
    _, out, _ = cli("history", str(repo.path), "--store", url, "--branch", "feature")
    lines = out.splitlines()
    assert lines[0] == f"feature of {identity(repo)}: 3 tested commits, newest first"
    assert [line.split()[0] for line in lines[3:6]] == [shas["f1"][:12], shas["c2"][:12], shas["c1"][:12]]
    assert f"{shas['f1'][:12]}  Feature work" in out
    assert "fixed    unit/linux :: test_fix" in out
    assert "removed  unit/linux :: test_gone" in out


def test_history_wraps_many_tasks_into_blocks_of_eight_columns(tmp_path, cli):
    repo = GitRepo(tmp_path / "repo")
    sha = repo.commit({"a": "1"}, "One commit")
    url = str(tmp_path / "history.db")
    tasks = [f"test/{number:02}" for number in range(10)]
    with open_store(url) as store:
        store.record_runs([run for task in tasks for run in task_runs(identity(repo), sha, task, P)])
    _, out, _ = cli("history", str(repo.path), "--store", url)
    headers = [line.split() for line in out.splitlines() if line.startswith("COMMIT")]
    assert headers == [["COMMIT", "MESSAGE", *tasks[:8]], ["COMMIT", "MESSAGE", *tasks[8:]]]
    # Every case is new on a first tested commit; passing new cases need no look.
    assert f"Every case passed on {sha[:12]}, the newest tested commit." in out


def test_history_without_results_says_so_and_succeeds(tmp_path, cli, monkeypatch):
    # Without --store, the default SQLite file under XDG_DATA_HOME.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"a": "1"}, "One")
    repo.commit({"a": "2"}, "Two")
    status, out, err = cli("history", str(repo.path))
    assert (status, err) == (0, "")
    assert out == (f"No results for main of {identity(repo)} in the history store "
                   f"sqlite://{tmp_path}/data/testlooper/history.db: none of its last 2 commits was tested.\n")
    status, out, _ = cli("history", str(repo.path), "--json")
    assert json.loads(out) == {"repo": identity(repo), "branch": "main", "commits": [], "tasks": {}}
    status, out, _ = cli("flaky", str(repo.path))
    assert status == 0 and out.startswith("No results for main")


@pytest.mark.parametrize("args, message", [
    (["--branch", "nope"], "testlooper: error: unknown revision 'nope'"),
    (["--limit", "0"], "testlooper: error: --limit must be at least 1"),
    (["--store", "sqlite://relative.db"], "testlooper: error: history store URL 'sqlite://relative.db': "),
])
def test_history_user_errors_are_one_line(project, cli, args, message):
    repo, _, url = project
    status, out, err = cli("history", str(repo.path), "--store", url, *args)
    assert (status, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1


def test_history_outside_a_git_repository_is_a_user_error(tmp_path, cli):
    status, _, err = cli("history", str(tmp_path), "--store", str(tmp_path / "history.db"))
    assert (status, err) == (2, f"testlooper: error: {tmp_path} is not a git repository\n")


def test_flaky_ranks_cases_by_flake_rate(project, cli):
    repo, _, url = project
    status, out, err = cli("flaky", str(repo.path), "--store", url)
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(f"""\
        Flaky cases of main of {identity(repo)}, over its last 3 tested commits:

        #  TASK               CASE      FLAKE RATE  FLAKY COMMITS  FAILED RUNS
        1  unit/linux         test_net  66.7%       2/3            2/9
        2  integration/linux  (task)    33.3%       1/3            1/12
        """)


def test_flaky_json_and_last(project, cli):
    repo, _, url = project
    _, out, _ = cli("flaky", str(repo.path), "--store", url, "--json", "--last", "1")
    assert json.loads(out) == [{"task": "unit/linux", "case": "test_net", "commits_tested": 1,
                                "flaky_commits": 1, "runs": 3, "failures": 1, "flake_rate": 1.0}]


def test_flaky_with_no_flaky_case_says_so(project, cli):
    repo, _, url = project
    status, out, _ = cli("flaky", str(repo.path), "--store", url, "--branch", "feature", "--last", "1")
    assert (status, out) == (0, "no flaky cases in the last tested commit of feature\n")
    _, out, _ = cli("flaky", str(repo.path), "--store", url, "--branch", "feature", "--json", "--last", "1")
    assert json.loads(out) == []


def test_history_reads_redis_as_it_reads_sqlite(project, cli):
    repo, shas, url = project
    _, from_sqlite, _ = cli("history", str(repo.path), "--store", url, "--json")
    with RedisServer() as server:
        with open_store(server.url) as store:
            store.record_runs(history_records(identity(repo), shas))
        status, from_redis, err = cli("history", str(repo.path), "--store", server.url, "--json")
        _, flaky, _ = cli("flaky", str(repo.path), "--store", server.url)
    assert (status, err) == (0, "")
    assert json.loads(from_redis) == json.loads(from_sqlite)
    assert "1  unit/linux         test_net  66.7%" in flaky


def test_redis_down_is_one_line_and_exit_2(project, cli):
    repo, _, _ = project
    url = f"redis://127.0.0.1:{free_port()}/0"
    status, out, err = cli("history", str(repo.path), "--store", url)
    assert (status, out) == (2, "")
    assert err.startswith(f"testlooper: error: history store {url} is unreachable: ")
    assert err.count("\n") == 1


def test_history_first_records_what_an_earlier_run_could_not(tmp_path, cli, monkeypatch):
    """Results spooled while the store was down are replayed before the history is read."""
    from testlooper.local.recording import spool_path_for
    from testlooper.store import write_spool

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    repo = GitRepo(tmp_path / "repo")
    sha = repo.commit({"a.py": "1"}, "Only commit")
    url = str(tmp_path / "history.db")
    spool = spool_path_for(url)
    (tmp_path / "data" / "testlooper").mkdir(parents=True)
    write_spool(spool, task_runs(identity(repo), sha, "unit/linux", P, F))
    status, out, err = cli("history", str(repo.path), "--store", url)
    assert status == 0
    assert f"recorded 2 results that an earlier run kept in {spool}" in err
    assert "flaky 1/2" in out
    assert not (tmp_path / "data" / "testlooper" / spool.rsplit("/", 1)[-1]).exists()
