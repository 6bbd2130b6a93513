"""`--repo NAME=PATH`: definitions and plan of files that pin other repositories."""

import json

import pytest

from original_fixtures import SourceControl


@pytest.fixture
def projects(tmp_path):
    """The original's simple_project_2 (dev) pinning simple_project, in real repositories."""
    sc = SourceControl(tmp_path / "repos")
    simple = sc.add_project("dev", "simple_project")
    sc.add_project("dev", "simple_project_2", pinned=simple)
    return sc


def test_definitions_with_repo_reads_the_pinned_repository(cli, projects):
    simple_2 = str(projects.repo("simple_project_2").path)
    simple = str(projects.repo("simple_project").path)
    status, out, err = cli("definitions", simple_2, "--rev", "HEAD", "--repo", f"simple_project={simple}", "--json")
    assert (status, err) == (0, "")
    d = json.loads(out)
    assert d["environments"]["linux"]["inheritance"] == ["simple/linux"]
    assert "simple/build/linux" in d["external_builds"]
    status, out, err = cli("definitions", simple_2, "--repo", f"simple_project={simple}")  # the working tree
    assert status == 0 and "test3/linux_dependent" in out
    pins = out.split("Other repositories\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert pins[0].split() == ["PIN", "REPOSITORY", "COMMIT", "PATH", "HOW"]
    assert pins[1].split() == ["simple", "simple_project", projects.shas["simple_project/dev"][:12]]


def test_definitions_without_the_mapping_is_one_line_naming_the_pin(cli, projects):
    simple_2 = str(projects.repo("simple_project_2").path)
    status, out, err = cli("definitions", simple_2)
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert "repo pin 'simple' (simple_project/" in err
    assert "no repository named 'simple_project' is available (mapped: none); map it with --repo simple_project=PATH" in err


@pytest.mark.parametrize("value, words", [
    ("simple_project", "must be NAME=PATH"),
    ("=x", "must be NAME=PATH"),
])
def test_a_malformed_repo_option(cli, projects, value, words):
    status, _, err = cli("definitions", str(projects.repo("simple_project_2").path), "--repo", value)
    assert status == 2 and words in err


def test_a_repo_option_that_is_no_repository(cli, projects, tmp_path):
    status, _, err = cli("definitions", str(projects.repo("simple_project_2").path),
                         "--repo", f"simple_project={tmp_path / 'nowhere'}")
    assert status == 2
    assert "repository 'simple_project':" in err and "does not exist" in err


def test_plan_puts_the_other_repositorys_build_first(cli, projects):
    simple_2 = str(projects.repo("simple_project_2").path)
    simple = str(projects.repo("simple_project").path)
    status, out, err = cli("plan", simple_2, "--rev", "HEAD", "--repo", f"simple_project={simple}",
                           "--test", "test3/*", "--json")
    assert (status, err) == (0, "")
    tasks = json.loads(out)["tasks"]
    assert [(t["name"], t["repo"]) for t in tasks] == [("simple/build/linux", "simple"),
                                                      ("test3/linux_dependent", "HEAD")]
    assert tasks[1]["depends_on"] == ["simple/build/linux"]


def test_repeated_keys_warn_on_stderr(cli, tmp_path):
    (tmp_path / "testlooper.yml").write_text(
        "looper_version: 5\nenvironments: {}\nenvironments:\n  linux: {platform: linux, image: {name: x}}\n")
    status, out, err = cli("definitions", str(tmp_path), "--json")
    assert status == 0 and json.loads(out)["environments"]["linux"]["platform"] == "linux"
    assert err == ("warning: testlooper.yml:3:1: key 'environments' is written twice in one mapping; "
                   "the last value is kept\n")


def test_git_repositories_from_a_lookup_function(projects):
    """The operator hands in a function (Repo resources found as pins ask for them)."""
    from testlooper import gitio
    from testlooper.repos.lookup import GitRepositories, RepositoryLookupError

    asked = []

    def find(name):
        asked.append(name)
        return gitio.open_repo(projects.repo(name).path) if name == "simple_project" else None

    lookup = GitRepositories(find)
    sha = projects.shas["simple_project/dev"]
    assert lookup.resolve_commit("simple_project", "dev") == sha
    assert "testDefinitions.yml" in lookup.list_files("simple_project", sha)
    assert lookup.read_file("simple_project", sha, "Dockerfile.txt").startswith("FROM ")
    with pytest.raises(RepositoryLookupError, match=r"^no repository named 'other' is available$"):
        lookup.resolve_commit("other", "x")
    with pytest.raises(RepositoryLookupError, match="has no commit 'nope'"):
        lookup.resolve_commit("simple_project", "nope")
    with pytest.raises(RepositoryLookupError, match="ghost.txt does not exist"):
        lookup.read_file("simple_project", sha, "ghost.txt")
    assert asked == ["simple_project", "other"]  # each name asked for once, then kept


def test_triggers_match_what_changed_in_a_pinned_repository_whose_pin_moved(cli, tmp_path):
    """`reponame/<path>` for each file a moved pin changed, as `HEAD/<path>` for this commit's."""
    from gitrepo import GitRepo

    lib = GitRepo(tmp_path / "lib")
    first = lib.commit({"api/a.h": "1", "docs/x.md": "1", "testlooper.yml": "looper_version: 5\n"})
    second = lib.commit({"api/a.h": "2"})
    app = GitRepo(tmp_path / "app")
    definitions = """looper_version: 5
repos:
  lib: lib/{sha}
environments: {{linux: {{platform: linux, image: {{name: x}}}}}}
tests:
  api/linux: {{command: x}}
  own/linux: {{command: x}}
test_sets: {{api: [api/*], own: [own/*]}}
triggers:
  - {{name: lib-api, paths: ["lib/api/*"], test_sets: [api]}}
  - {{name: own, paths: ["HEAD/src/*"], test_sets: [own]}}
"""
    app.commit({"testlooper.yml": definitions.format(sha=first), "src/a.py": ""})
    app.commit({"testlooper.yml": definitions.format(sha=second)})
    repo_option = ("--repo", f"lib={lib.path}")
    status, out, err = cli("plan", str(app.path), "--rev", "HEAD", *repo_option, "--json")
    assert (status, err) == (0, "")
    plan = json.loads(out)
    assert plan["triggers_fired"] == [{"name": "lib-api", "paths_matched": ["lib/api/a.h"], "test_sets": ["api"]}]
    assert [t["name"] for t in plan["tasks"]] == ["api/linux"]
    app.commit({"src/b.py": ""})  # the pin stays: only this commit's own paths
    plan = json.loads(cli("plan", str(app.path), "--rev", "HEAD", *repo_option, "--json")[1])
    assert [t["name"] for t in plan["triggers_fired"]] == ["own"]
    # Without --repo the pin's changes cannot be read: only this commit's own paths count.
    plan = json.loads(cli("plan", str(app.path), "--rev", "HEAD~1", "--json")[1])
    assert plan["triggers_fired"] == [] and plan["reason"] == "no trigger matched the 1 changed file"
