"""`testlooper run` under a hostile user (issue 7): absurd run counts, runaway logs, bare
repositories, names with newlines, runs that test nothing, a SIGTERM while the tree is copied.

Every test runs the real command as a subprocess (tests/run_helpers.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from run_helpers import (
    cli_env, explain, json_document, make_repo, run_args, runs_of, start_tl, stop_process, stored_runs, tl,
)

DEFINITIONS = r"""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}, test_timeout: 60}
builds:
  base/linux:
    command: "true"
tests:
  pass/linux:
    command: "true"
  chatty/linux:
    max_log_mb: 1
    command: seq 1 3000000; sleep 30
  loud/linux:
    command: seq 1 3000000; sleep 30
  newline/linux:
    command: |
      printf '{"bad\\nname": false, "fine": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
  nameless/linux:
    command: |
      printf '{"": true, "named": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
      exit 1
  missing-input/linux:
    dependencies: {src: HEAD/source/no-such-folder, base: base/linux}
    command: "true"
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("hostile") / "project", DEFINITIONS)


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path)


@pytest.mark.parametrize("runs, shown", [("30000000", "30000000"), ("0", "0"), ("-3", "-3")])
def test_a_runs_option_out_of_bounds_fails_at_once_before_any_snapshot(repo, tmp_path, env, runs, shown):
    completed = tl(run_args(repo, tmp_path, "--runs", runs), env)
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr == f"testlooper: error: --runs must be a whole number from 1 to 100000, not {shown}\n"
    assert not (tmp_path / "out").exists(), "nothing may be copied or allocated for an impossible plan"


def test_watch_refuses_an_impossible_runs_option_at_once(repo, tmp_path, env):
    completed = tl(["watch", repo.path, "--store", tmp_path / "h.db", "--runs", "100001", "--max-polls", "1"], env)
    assert (completed.returncode, completed.stderr) == (
        2, "testlooper: error: --runs must be a whole number from 1 to 100000, not 100001\n"), explain(completed)


def test_a_plan_of_more_than_100000_runs_is_refused_in_one_line(tmp_path, env):
    many = make_repo(tmp_path / "many", "looper_version: 5\nenvironments:\n  linux: {platform: linux, image: {name: x}}\n"
                                        "tests:\n  a/linux: {command: 'true', runs: 60000}\n"
                                        "  b/linux: {command: 'true', runs: 60000}\n")
    completed = tl(run_args(many, tmp_path), env)
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr.startswith("testlooper: error: this plan has 120000 runs, more than the 100000 one "
                                       "command may run"), completed.stderr
    assert completed.stderr.count("\n") == 1


@pytest.mark.parametrize("task, option", [("chatty/linux", []), ("loud/linux", ["--max-log-mb", "1"])],
                         ids=["definitions-field", "option"])
def test_a_runaway_log_is_cut_to_its_limit_and_fails_the_run(repo, tmp_path, env, task, option):
    repo_args = run_args(repo, tmp_path, "--test", task, "--json", *option)
    started = time.monotonic()
    completed = tl(repo_args, env)
    assert time.monotonic() - started < 60
    assert completed.returncode == 1, explain(completed)
    (run,) = runs_of(json_document(completed), task)
    assert run["result"] == "failed"
    assert run["message"].startswith("the log passed its limit of 1 MiB (max_log_mb), so the task was stopped")
    log = Path(run["log"]).read_bytes()
    assert len(log) <= 1024 * 1024 + 4096
    assert b"bytes of output cut here" in log and log.count(b"\n1\n2\n3\n") == 1


def test_a_bare_repository_runs_its_head(repo, tmp_path, env):
    bare = tmp_path / "project.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(bare)], check=True)
    completed = tl(run_args(bare, tmp_path, "--test", "pass/linux"), env)
    assert completed.returncode == 0, explain(completed)
    assert f"running commit {repo.head()[:12]}: 1 task, 1 run" in completed.stderr
    assert "1 run: 1 passed" in completed.stdout


def test_a_run_that_ended_in_error_is_named_not_called_passed(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "missing-input/linux"), env)
    assert completed.returncode == 1, explain(completed)
    assert "running working tree" in completed.stderr and ": 2 tasks, 2 runs" in completed.stderr
    assert "every case passed" not in completed.stdout
    assert "  every counted case passed\n1 run tested nothing, so no case of it is counted:\n" \
           "  error      missing-input/linux #1: input 'src': the source folder 'no-such-folder' does not exist" \
           in completed.stdout


def test_a_case_named_empty_cannot_turn_a_failed_task_green(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "nameless/linux", "--json"), env)
    assert completed.returncode == 1, explain(completed)
    (run,) = runs_of(json_document(completed), "nameless/linux")
    assert run["result"] == "failed" and run["cases"] == {"total": 1, "passed": 1, "failed": 0}
    assert "testSummary.json: a test has an empty name (its value: true)" in Path(run["log"]).read_text()
    (recorded,) = stored_runs(str(tmp_path / "history.db"), repo, repo.head(), with_cases=True)
    assert [case.name for case in recorded.cases] == ["named"]
    history = json.loads(tl(["history", repo.path, "--store", tmp_path / "history.db", "--json"], env).stdout)
    (own,) = history["tasks"]["nameless/linux"][""]
    assert (own["runs"], own["failures"]) == (1, 1)


def test_a_newline_in_a_case_name_stays_on_its_line(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "newline/linux"), env)
    assert completed.returncode == 0, explain(completed)  # the command passed; one case failed
    assert all(line.startswith("[") for line in completed.stderr.splitlines()), completed.stderr
    assert "1/2 cases passed failed: bad\\nname" in completed.stderr
    assert "newline/linux :: bad\\nname" in completed.stdout
    history = tl(["history", repo.path, "--store", tmp_path / "history.db"], env)
    assert history.returncode == 0, explain(history)
    assert "newline/linux :: bad\\nname" in history.stdout
    assert not any(line.startswith("name") for line in history.stdout.splitlines()), history.stdout


def test_sigterm_while_the_working_tree_is_copied_leaves_no_snapshot(repo, tmp_path, env):
    tree = make_repo(tmp_path / "big", DEFINITIONS)
    for index in range(8000):  # untracked files are copied too: no need to commit them
        folder = tree.path / "files" / f"{index // 500:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index}.txt").write_text("x")
    sources = tmp_path / "out" / "sources"
    process = start_tl(run_args(tree, tmp_path, "--test", "pass/linux"), env)
    try:
        deadline = time.monotonic() + 30
        while not (sources.is_dir() and any(sources.glob("*/files"))):  # the copy has begun
            assert process.poll() is None and time.monotonic() < deadline, "no copy was started"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_process(process)
    assert process.returncode == 130, stderr
    assert "copying the working tree" in stderr and "(8001 files)" in stderr, stderr
    assert list(sources.iterdir()) == []


def test_the_copy_of_a_tree_reports_from_its_start_and_every_two_seconds():
    import io

    from testlooper.cli.run_cmd import _snapshot_progress
    from testlooper.local.progress import Progress

    def lines_for(total, steps):
        stream = io.StringIO()
        clock = iter(steps)
        report = _snapshot_progress(Progress(stream=stream), "tree", clock=lambda: next(clock))
        for copied in range(1, len(steps)):
            report(copied, total)
        return [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]

    # A large tree: said before its first file, then every 2 s; 1 s apart per file here.
    assert lines_for(30_000, [0, 0, 1, 2, 3, 4, 5]) == [
        "copying the working tree tree (30000 files)", "copied 3/30000 files", "copied 5/30000 files"]
    # A small one says nothing unless its copy is slow; an unknown total is counted up.
    assert lines_for(10, [0, 0.5, 1.0]) == []
    assert lines_for(None, [0, 1, 2.5, 3, 5]) == ["copying the working tree tree", "copied 4 files"]


@pytest.mark.parametrize("runs", ["1.5", "many", "true"])
def test_a_runs_option_that_is_not_a_whole_number_gets_the_same_words(repo, tmp_path, env, runs):
    completed = tl(run_args(repo, tmp_path, "--runs", runs), env)
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr.splitlines()[-1].endswith(
        f"argument --runs: must be a whole number from 1 to 100000, not '{runs}'"), explain(completed)
    assert "Traceback" not in completed.stderr
