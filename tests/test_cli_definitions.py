import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gitrepo import GitRepo
from testlooper import terminal
from testlooper.definitions import resolve_text

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"

DEFINITIONS = textwrap.dedent("""\
    looper_version: 5
    includes: [./ci/docs.yml]
    environments:
      linux:
        platform: linux
        image: {dockerfile: ci/Dockerfile}
      py311:
        base: linux
        variables: {PY: python3.11}
    builds:
      build/linux:
        command: make
        min_cores: 4
        max_cores: 8
        min_ram_gb: 16
        dependencies: {src: HEAD}
    tests:
      unit/py311:
        command: ${PY} -m pytest
        timeout: 1800
        runs: 5
        dependencies: {src: HEAD, bin: build/linux}
    test_sets:
      python: [unit/*]
    triggers:
      - {name: python, paths: ["HEAD/*.py"], test_sets: [python]}
""")

DOCS_INCLUDE = textwrap.dedent("""\
    tests:
      docs/linux:
        command: make docs
""")


@pytest.fixture
def tree(tmp_path):
    """A plain directory (no git) holding a definitions file and the file it includes."""
    (tmp_path / "ci").mkdir()
    (tmp_path / "testDefinitions.yml").write_text(DEFINITIONS)
    (tmp_path / "ci/docs.yml").write_text(DOCS_INCLUDE)
    return tmp_path


@pytest.fixture
def repo(tmp_path):
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"testDefinitions.yml": DEFINITIONS, "ci/docs.yml": DOCS_INCLUDE, "src/a.py": ""})
    return repo


def read_disk(root):
    return lambda path: (root / path).read_text()


def test_table_of_a_working_tree_without_git(cli, tree):
    status, out, err = cli("definitions", str(tree))
    assert (status, err) == (0, "")
    assert out.startswith(f"Definitions file testDefinitions.yml (working tree {tree})\n")
    assert out.splitlines()[3:7] == [
        "NAME         KIND   ENVIRONMENT  PLATFORM  CORES/RAM    TIMEOUT  RUNS  DEPENDENCIES",
        "build/linux  build  linux        linux     4-8 / 16 GB  1h       1     src=HEAD",
        "docs/linux   test   linux        linux     any          1h       1",
        "unit/py311   test   py311        linux     any          30m      5     bin=build/linux, src=HEAD",
    ]
    assert "py311  linux     dockerfile: ci/Dockerfile  linux" in out
    assert "python  HEAD/*.py  python" in out
    assert "\033[" not in out  # captured output is not a terminal


def test_json_is_the_resolved_contract_sorted_and_indented(cli, tree):
    status, out, _ = cli("definitions", str(tree), "--json")
    expected = resolve_text(DEFINITIONS, "testDefinitions.yml", read_disk(tree))
    assert status == 0
    assert out == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert sorted(json.loads(out)["tests"]) == ["docs/linux", "unit/py311"]


def test_the_walk_skips_git_and_picks_the_first_file_alphabetically(cli, tree):
    (tree / ".git").mkdir()
    (tree / ".git/aaa.testlooper.yml").write_text("not: [valid")
    (tree / "zzz").mkdir()
    (tree / "zzz/testlooper.yml").write_text("not: [valid")
    status, out, _ = cli("definitions", str(tree), "--json")
    assert status == 0
    assert json.loads(out)["definitions_file"] == "testDefinitions.yml"
    (tree / "a").mkdir()
    (tree / "a/x.testlooper.yml").write_text("looper_version: 5\n")
    assert json.loads(cli("definitions", str(tree), "--json")[1])["definitions_file"] == "a/x.testlooper.yml"


def test_a_tree_without_a_definitions_file_has_no_tests(cli, tmp_path):
    status, out, err = cli("definitions", str(tmp_path))
    assert (status, err) == (0, "")
    assert out == (
        f"No definitions file in working tree {tmp_path}, so it has no tests "
        "(looked for testDefinitions.yml, testDefinitions.json, testlooper.yml, *.testlooper.yml).\n"
    )
    status, out, _ = cli("definitions", str(tmp_path), "--json")
    assert status == 0
    assert json.loads(out) == {
        "looper_version": 5,
        "definitions_file": "",
        "repos": {},
        "environments": {},
        "builds": {},
        "tests": {},
        "deployments": {},
        "external_builds": {},
        "test_sets": {"all": []},
        "triggers": [],
    }


def test_rev_reads_the_commit_not_the_edited_working_tree(cli, repo):
    (repo.path / "testDefinitions.yml").write_text(DEFINITIONS.replace("runs: 5", "runs: 9"))
    (repo.path / "ci/docs.yml").write_text(DOCS_INCLUDE.replace("make docs", "make edited"))

    _, on_disk, _ = cli("definitions", str(repo.path), "--json")
    assert json.loads(on_disk)["tests"]["unit/py311"]["runs"] == 9
    assert json.loads(on_disk)["tests"]["docs/linux"]["stages"][0]["command"] == "make edited"

    status, committed, err = cli("definitions", str(repo.path), "--rev", "HEAD", "--json")
    assert (status, err) == (0, "")
    assert json.loads(committed) == resolve_text(DEFINITIONS, "testDefinitions.yml", {"ci/docs.yml": DOCS_INCLUDE}.get)
    assert json.loads(committed)["tests"]["unit/py311"]["runs"] == 5
    assert json.loads(committed)["tests"]["docs/linux"]["stages"][0]["command"] == "make docs"
    assert (repo.path / "testDefinitions.yml").read_text().count("runs: 9") == 1


def test_rev_reads_an_older_commit_and_a_commit_without_definitions(cli, repo):
    first = repo.head()
    repo.commit({"testDefinitions.yml": DEFINITIONS.replace("runs: 5", "runs: 2")})

    def runs_at(rev):
        return json.loads(cli("definitions", str(repo.path), "--rev", rev, "--json")[1])["tests"]["unit/py311"]["runs"]

    assert (runs_at(first), runs_at("HEAD")) == (5, 2)

    repo.commit({"testDefinitions.yml": None, "ci/docs.yml": None})
    status, out, _ = cli("definitions", str(repo.path), "--rev", "main")
    assert status == 0
    assert out.startswith(f"No definitions file in commit {repo.head()[:12]}, so it has no tests")


def test_a_definitions_error_is_one_line_with_its_location(cli, tree):
    (tree / "testDefinitions.yml").write_text(DEFINITIONS.replace("    runs: 5", "    runs: 5\n    color: red"))
    status, out, err = cli("definitions", str(tree))
    assert (status, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("testDefinitions.yml:")
    assert "tests.unit/py311.color" in err
    assert "Traceback" not in err


def test_a_missing_include_at_a_revision_is_a_definitions_error(cli, repo):
    repo.commit({"ci/docs.yml": None})
    (repo.path / "ci/docs.yml").write_text(DOCS_INCLUDE)  # on disk only: --rev must not see it
    status, _, err = cli("definitions", str(repo.path), "--rev", "HEAD")
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("testDefinitions.yml:")
    assert "ci/docs.yml" in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{tmp}/missing"], "testlooper: error: {tmp}/missing does not exist"),
        (["{tmp}/file.txt"], "testlooper: error: {tmp}/file.txt is not a directory"),
        (["{tmp}", "--rev", "HEAD"], "testlooper: error: {tmp} is not a git repository"),
        (["{tmp}/repo", "--rev", "nope"], "testlooper: error: unknown revision 'nope'"),
    ],
)
def test_user_errors_exit_2_with_one_line(cli, tmp_path, arguments, message):
    GitRepo(tmp_path / "repo").commit({"a.txt": ""})
    (tmp_path / "file.txt").write_text("")
    status, out, err = cli("definitions", *(a.format(tmp=tmp_path) for a in arguments))
    assert (status, out, err) == (2, "", message.format(tmp=tmp_path) + "\n")


def test_verbose_shows_the_traceback_too(cli, tmp_path):
    status, _, err = cli("-v", "definitions", str(tmp_path), "--rev", "HEAD")
    assert status == 2
    assert "Traceback" in err
    assert err.endswith(f"testlooper: error: {tmp_path} is not a git repository\n")


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert terminal.colour_wanted(Terminal())
    assert not terminal.colour_wanted(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not terminal.colour_wanted(Terminal())


def test_tables_align_by_plain_text_even_in_colour():
    rows = [["build/linux", terminal.kind_cell("build")], ["t", terminal.kind_cell("test")]]
    plain = terminal.table(["NAME", "KIND"], rows, terminal.Styler(False))
    assert plain == "NAME         KIND\nbuild/linux  build\nt            test"
    coloured = terminal.table(["NAME", "KIND"], rows, terminal.Styler(True))
    assert coloured.splitlines()[2] == "t            \033[32mtest\033[0m"
    assert coloured.splitlines()[0] == "\033[1mNAME\033[0m         \033[1mKIND\033[0m"


def test_durations_read_like_people_write_them():
    seconds = (0, 45, 90, 3600, 5400, 86461)
    assert [terminal.duration(s) for s in seconds] == ["0s", "45s", "1m30s", "1h", "1h30m", "24h1m1s"]


def run_testlooper(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "testlooper", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_subprocess_definitions_json_from_the_current_directory(tree):
    result = run_testlooper("definitions", "--json", cwd=tree)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["definitions_file"] == "testDefinitions.yml"


def test_subprocess_definitions_error_has_no_traceback(tree):
    (tree / "testDefinitions.yml").write_text("looper_version: 5\nbuilds: [oops\n")
    result = run_testlooper("definitions", str(tree))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("testDefinitions.yml:")


def test_help_does_not_import_git_or_yaml():
    probe = (
        "import sys\n"
        "from testlooper.cli.main import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('git', 'yaml', 'testlooper.gitio', 'testlooper.definitions') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
    help_result = run_testlooper("--help")
    assert help_result.returncode == 0
    assert "definitions" in help_result.stdout and "plan" in help_result.stdout
