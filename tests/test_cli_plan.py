import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gitrepo import GitRepo

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"

DEFINITIONS = textwrap.dedent("""\
    looper_version: 5
    environments:
      linux:
        platform: linux
        image: {name: "python:3.11"}
    builds:
      toolchain/linux: {command: make toolchain}
      build/linux:
        command: make
        dependencies: {tools: toolchain/linux}
    tests:
      unit/linux:
        command: pytest
        runs: 3
        dependencies: {bin: build/linux}
      lint/linux: {command: ruff check}
      docs/linux: {command: make docs}
    deployments:
      publish/linux:
        command: twine upload
        dependencies: {bin: build/linux}
    test_sets:
      python: [unit/*, lint/*]
      docs: [docs/*]
    triggers:
      - {name: python, paths: ["HEAD/*.py", "HEAD/pyproject.toml"], test_sets: [python]}
      - {name: docs, paths: ["HEAD/docs/*"], test_sets: [docs]}
""")


@pytest.fixture
def repo(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"testDefinitions.yml": DEFINITIONS, "src/a.py": "", "docs/index.md": ""}, message="root")
    return repo


def plan_json(cli, *args):
    status, out, err = cli("plan", *args, "--json")
    assert (status, err) == (0, ""), err
    return json.loads(out)


def task_names(plan):
    return [task["name"] for task in plan["tasks"]]


def test_a_commit_changing_python_fires_the_python_trigger(cli, repo):
    sha = repo.commit({"src/a.py": "print(1)\n"})
    plan = plan_json(cli, str(repo.path), "--rev", "HEAD")
    assert plan["commit"] == sha
    assert plan["reason"] == "trigger 'python' fired on HEAD/src/a.py"
    assert plan["triggers_fired"] == [{"name": "python", "paths_matched": ["HEAD/src/a.py"], "test_sets": ["python"]}]
    assert plan["test_sets"] == ["python"]
    assert task_names(plan) == ["toolchain/linux", "build/linux", "lint/linux", "unit/linux"]
    unit = plan["tasks"][-1]
    assert (unit["kind"], unit["runs"], unit["depends_on"]) == ("test", 3, ["build/linux"])
    assert plan["tasks"][1]["needed_by"] == ["unit/linux"]
    assert len(unit["hash"]) == 64


def test_text_output_says_why_and_lists_tasks_in_order(cli, repo):
    repo.commit({"src/a.py": "print(1)\n", "pyproject.toml": ""})
    status, out, err = cli("plan", str(repo.path), "--rev", "HEAD")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"Planning   commit {repo.head()[:12]}"
    assert lines[1] == "Changed    2 files"
    assert lines[2] == "Reason     trigger 'python' fired on HEAD/pyproject.toml and 1 more path"
    assert lines[3] == "Test sets  python"
    assert [line.split() for line in lines[5:10]] == [
        ["#", "NAME", "KIND", "RUNS", "DEPENDS", "ON"],
        ["1", "toolchain/linux", "build", "1"],
        ["2", "build/linux", "build", "1", "toolchain/linux"],
        ["3", "lint/linux", "test", "1"],
        ["4", "unit/linux", "test", "3", "build/linux"],
    ]
    assert lines[-1] == "2 builds and 2 tests: 6 runs in all"


def test_an_older_revision_and_a_base(cli, repo):
    docs_change = repo.commit({"docs/index.md": "# hello\n"})
    repo.commit({"README.md": "readme\n"})
    assert task_names(plan_json(cli, str(repo.path), "--rev", docs_change)) == ["docs/linux"]

    readme_only = plan_json(cli, str(repo.path), "--rev", "HEAD")
    assert readme_only["reason"] == "no trigger matched the 1 changed file"
    assert readme_only["tasks"] == []

    since_root = plan_json(cli, str(repo.path), "--rev", "HEAD", "--base", "HEAD~2")
    assert task_names(since_root) == ["docs/linux"]
    assert since_root["triggers_fired"][0]["paths_matched"] == ["HEAD/docs/index.md"]


def test_the_root_commit_runs_all(cli, repo):
    plan = plan_json(cli, str(repo.path), "--rev", "HEAD")
    assert plan["triggers_fired"] == []
    assert plan["test_sets"] == ["all"]
    assert task_names(plan) == ["toolchain/linux", "build/linux", "docs/linux", "lint/linux", "unit/linux"]
    _, out, _ = cli("plan", str(repo.path), "--rev", "HEAD")
    assert "Changed    unknown (a commit with no parent): the test set all runs" in out


def test_deployments_are_never_planned(cli, repo):
    plan = plan_json(cli, str(repo.path), "--rev", "HEAD", "--test-set", "all")
    assert "publish/linux" not in task_names(plan)


def test_the_working_tree_adds_uncommitted_changes_to_heads(cli, repo):
    repo.commit({"docs/index.md": "committed docs change\n"})
    assert task_names(plan_json(cli, str(repo.path))) == ["docs/linux"]

    (repo.path / "src/new.py").write_text("untracked\n")
    plan = plan_json(cli, str(repo.path))
    assert plan["commit"] == repo.head()
    assert plan["triggers_fired"] == [
        {"name": "python", "paths_matched": ["HEAD/src/new.py"], "test_sets": ["python"]},
        {"name": "docs", "paths_matched": ["HEAD/docs/index.md"], "test_sets": ["docs"]},
    ]


def test_the_working_tree_reads_definitions_from_disk(cli, repo):
    repo.commit({"src/a.py": "changed\n"})
    (repo.path / "testDefinitions.yml").write_text(DEFINITIONS.replace("runs: 3", "runs: 7"))
    on_disk = plan_json(cli, str(repo.path), "--test", "unit/*")
    committed = plan_json(cli, str(repo.path), "--rev", "HEAD", "--test", "unit/*")
    assert on_disk["tasks"][-1]["runs"] == 7
    assert committed["tasks"][-1]["runs"] == 3


def test_a_directory_outside_git_counts_every_path_as_changed(cli, tmp_path):
    (tmp_path / "testDefinitions.yml").write_text(DEFINITIONS)
    plan = plan_json(cli, str(tmp_path))
    assert plan["commit"] is None
    assert plan["reason"].startswith("changed files unknown")
    assert task_names(plan) == ["toolchain/linux", "build/linux", "docs/linux", "lint/linux", "unit/linux"]
    status, _, err = cli("plan", str(tmp_path), "--base", "HEAD")
    assert (status, err) == (2, f"testlooper: error: --base needs a git repository, and {tmp_path} is not one\n")


def test_a_repository_without_commits_counts_every_path_as_changed(cli, tmp_path):
    empty = GitRepo(tmp_path / "empty")
    empty.write({"testDefinitions.yml": DEFINITIONS})
    plan = plan_json(cli, str(empty.path))
    assert plan["commit"] is None
    assert len(plan["tasks"]) == 5


def test_requested_sets_tests_and_runs_override_triggers(cli, repo):
    repo.commit({"src/a.py": "changed\n"})
    plan = plan_json(cli, str(repo.path), "--rev", "HEAD", "--test-set", "docs", "--runs", "4")
    assert plan["reason"] == "requested test sets: docs"
    assert plan["triggers_fired"] == []
    assert [(t["name"], t["runs"]) for t in plan["tasks"]] == [("docs/linux", 4)]

    plan = plan_json(cli, str(repo.path), "--rev", "HEAD", "--test", "unit/*", "--test", "docs/*")
    assert plan["reason"] == "requested tests: unit/*, docs/*"
    assert task_names(plan) == ["toolchain/linux", "build/linux", "docs/linux", "unit/linux"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--test-set", "pyhton"], "testlooper: error: unknown test set 'pyhton'; known test sets: all, docs, python"),
        (["--test", "integration/*"], "testlooper: error: no test name matches 'integration/*'"),
        (["--runs", "0"], "testlooper: error: runs must be a whole number from 1 to 100000, not 0"),
        (["--rev", "nope"], "testlooper: error: unknown revision 'nope'"),
        (["--rev", "HEAD", "--base", "v0"], "testlooper: error: unknown revision 'v0'"),
    ],
)
def test_user_errors_exit_2_with_one_line(cli, repo, arguments, message):
    status, out, err = cli("plan", str(repo.path), *arguments)
    assert (status, out, err) == (2, "", message + "\n")


def test_broken_definitions_at_the_revision_exit_2_with_the_location(cli, repo):
    repo.commit({"testDefinitions.yml": DEFINITIONS.replace("test_sets: [docs]", "test_sets: [nodocs]")})
    status, out, err = cli("plan", str(repo.path), "--rev", "HEAD")
    assert (status, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("testDefinitions.yml:")
    assert "nodocs" in err


def test_a_commit_without_definitions_has_nothing_to_run(cli, repo):
    repo.commit({"testDefinitions.yml": None})
    plan = plan_json(cli, str(repo.path), "--rev", "HEAD")
    assert plan["tasks"] == []
    assert plan["reason"].startswith("no definitions file, so nothing to run (looked for testDefinitions.yml")
    status, out, _ = cli("plan", str(repo.path), "--rev", "HEAD")
    assert status == 0
    assert out.rstrip().endswith("Nothing to run.")


def run_testlooper(*args):
    env = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "testlooper", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_subprocess_plan_json(repo):
    sha = repo.commit({"docs/index.md": "changed\n"})
    result = run_testlooper("plan", str(repo.path), "--rev", "main", "--json")
    assert (result.returncode, result.stderr) == (0, "")
    plan = json.loads(result.stdout)
    assert (plan["commit"], task_names(plan)) == (sha, ["docs/linux"])


def test_subprocess_unknown_test_set_is_one_line_and_status_2(repo):
    result = run_testlooper("plan", str(repo.path), "--test-set", "nope")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "testlooper: error: unknown test set 'nope'; known test sets: all, docs, python\n"
