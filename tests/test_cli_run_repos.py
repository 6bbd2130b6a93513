"""`testlooper run` of a two-repository setup: a test consuming a build pinned from another
repository, which runs first, at its pinned commit, and is recorded under its own repository."""

from __future__ import annotations

import textwrap

import pytest

from run_helpers import cli_env, explain, json_document, make_repo, repo_id, run_args, runs_of, stored_runs, tl

LIB = textwrap.dedent("""\
    looper_version: 5
    environments:
      linux: {platform: linux, image: {name: "debian:12"}}
    builds:
      tool/linux:
        dependencies: {src: HEAD}
        command: cp $TEST_INPUTS/src/version.txt $TEST_BUILD_OUTPUT_DIR/version.txt
      package/linux:
        dependencies: {tool: tool/linux}
        command: |
          cat $TEST_INPUTS/tool/version.txt > $TEST_BUILD_OUTPUT_DIR/package.txt
          cat $TEST_SRC_DIR/.git_commit >> $TEST_BUILD_OUTPUT_DIR/package.txt
""")

APP = textwrap.dedent("""\
    looper_version: 5
    repos:
      lib: {reference: "org/lib/LIB_SHA", branch: main}
    environments:
      linux: {base: lib/linux}
    tests:
      uses-lib/linux:
        dependencies: {package: lib/package/linux, data: lib/source/data}
        command: |
          grep -q "lib version 1" $TEST_INPUTS/package/package.txt
          grep -q "the lib commit" $TEST_INPUTS/package/package.txt
          test -f $TEST_INPUTS/data/table.txt
""")


@pytest.fixture
def repos(tmp_path):
    lib = make_repo(tmp_path / "lib", LIB, {"version.txt": "lib version 1\n", "data/table.txt": "1 2 3\n"})
    lib.commit({"version.txt": "lib version 1\n"}, message="the lib commit")
    app = make_repo(tmp_path / "app", APP.replace("LIB_SHA", lib.head()))
    return app, lib


def test_a_build_of_the_pinned_repository_runs_first_and_is_recorded_there(repos, tmp_path):
    app, lib = repos
    env = cli_env(tmp_path)
    completed = tl(run_args(app, tmp_path, "--rev", "HEAD", "--repo", f"org/lib={lib.path}", "--json"), env)
    assert completed.returncode == 0, explain(completed)
    document = json_document(completed)
    order = [run["task"] for run in document["runs"]]
    assert order == ["lib/tool/linux", "lib/package/linux", "uses-lib/linux"]
    assert all(run["result"] == "passed" for run in document["runs"])
    store = str(tmp_path / "history.db")
    in_lib = stored_runs(store, lib, lib.head())
    assert sorted(run.task for run in in_lib) == ["package/linux", "tool/linux"]
    assert [run.task for run in stored_runs(store, app, app.head())] == ["uses-lib/linux"]

    again = json_document(tl(run_args(app, tmp_path, "--rev", "HEAD", "--repo", f"org/lib={lib.path}", "--json"),
                             env))
    assert [run["run_index"] for run in runs_of(again, "lib/tool/linux")] == [1]
    assert sorted(run.run_index for run in stored_runs(store, lib, lib.head()) if run.task == "tool/linux") == [0, 1]


def test_without_the_mapping_the_run_stops_with_one_line_naming_the_pin(repos, tmp_path):
    app, _ = repos
    completed = tl(run_args(app, tmp_path, "--rev", "HEAD"), cli_env(tmp_path))
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr.count("\n") == 1
    assert "repo pin 'lib' (org/lib/" in completed.stderr
    assert "map it with --repo org/lib=PATH" in completed.stderr
    assert repo_id(app)  # nothing ran, nothing to record


def test_version_2_commands_run_in_the_source_checkout(tmp_path):
    """v3-era simple_project_2 runs `./sleeper.py` and greps `.git_commit`: relative to the checkout."""
    definitions = textwrap.dedent("""\
        looper_version: 2
        environments:
          linux: {platform: linux, image: {name: "debian:12"}}
        tests:
          here/linux:
            command: |
              ./check.sh
              grep -Fq "a message" .git_commit
              test -d $TEST_INPUTS/src
    """)
    repo = make_repo(tmp_path / "v2", definitions, {"check.sh": "#!/bin/sh\ntest -f testlooper.yml\n"})
    (repo.path / "check.sh").chmod(0o755)
    repo.git("update-index", "--chmod=+x", "check.sh")
    repo.commit({}, message="a message")
    completed = tl(run_args(repo, tmp_path, "--rev", "HEAD"), cli_env(tmp_path))
    assert completed.returncode == 0, explain(completed)


def test_watch_builds_the_pinned_build_and_counts_it_as_tested_there(repos, tmp_path):
    """A restarted watch finds the head tested in full, although its lib builds are recorded
    under lib (and so not among the app commit's runs)."""
    app, lib = repos
    watch = ["watch", app.path, "--repo", f"org/lib={lib.path}", "--store", tmp_path / "history.db",
             "--output", tmp_path / "out", "--metrics-port", "0", "--max-polls", "1"]
    first = tl(watch, cli_env(tmp_path), timeout=120)
    assert first.returncode == 0, explain(first)
    assert f"new head of main: {app.head()[:12]}" in first.stderr, explain(first)
    again = tl(watch, cli_env(tmp_path), timeout=120)
    assert again.returncode == 0, explain(again)
    assert "new head of main" not in again.stderr, explain(again)
    store = str(tmp_path / "history.db")
    assert sorted(run.task for run in stored_runs(store, lib, lib.head())) == ["package/linux", "tool/linux"]
    assert [(run.task, run.result) for run in stored_runs(store, app, app.head())] == [("uses-lib/linux", "passed")]
