import time

import pytest

from testlooper.planning import match_glob, plan


def task(name, kind, builds=(), runs=1, other_repo_builds=()):
    """A resolved task, reduced to the fields the planner reads."""
    dependencies = {"src": {"kind": "source", "repo": "HEAD", "path": ""}}
    for build in builds:
        dependencies[f"in-{build}"] = {"kind": "build", "repo": "HEAD", "build": build, "artifact": ""}
    for build in other_repo_builds:
        dependencies[f"lib-{build}"] = {"kind": "build", "repo": "lib", "build": build, "artifact": ""}
    return {"name": name, "kind": kind, "dependencies": dependencies, "runs": runs, "hash": f"hash-{name}"}


def definitions(builds=(), tests=(), deployments=(), test_sets=None, triggers=()):
    """A definitions dict in the resolved-definitions contract shape, from lists of tasks."""
    tests_by_name = {t["name"]: t for t in tests}
    return {
        "looper_version": 5,
        "environments": {},
        "builds": {b["name"]: b for b in builds},
        "tests": tests_by_name,
        "deployments": {d["name"]: d for d in deployments},
        "test_sets": {"all": sorted(tests_by_name), **(test_sets or {})},
        "triggers": list(triggers),
        "repos": {},
        "definitions_file": "testDefinitions.yml",
    }


def names(result):
    return [t["name"] for t in result["tasks"]]


PYTHON_AND_DOCS = definitions(
    builds=[task("build/linux", "build")],
    tests=[
        task("unit/py311", "test", builds=["build/linux"]),
        task("lint/py311", "test"),
        task("docs/linkcheck", "test"),
    ],
    test_sets={"python": ["lint/py311", "unit/py311"], "docs": ["docs/linkcheck"]},
    triggers=[
        {"name": "python", "paths": ["HEAD/*.py", "HEAD/pyproject.toml"], "test_sets": ["python"]},
        {"name": "docs", "paths": ["HEAD/docs/*"], "test_sets": ["d*"]},
    ],
)


def test_match_glob_star_crosses_slashes_and_is_case_sensitive():
    assert match_glob("HEAD/*.py", "HEAD/src/deep/a.py")
    assert match_glob("unit/*", "unit/py311")
    assert match_glob("unit/py3?[01]", "unit/py311")
    assert not match_glob("HEAD/*.py", "HEAD/A.PY")
    assert not match_glob("HEAD/src/*", "HEAD/docs/x")


def test_without_triggers_every_commit_runs_all():
    defs = definitions(tests=[task("a", "test"), task("b", "test")], test_sets={"fast": ["a"]})
    result = plan(defs, ["anything.txt"])
    assert result["test_sets"] == ["all"]
    assert result["triggers_fired"] == []
    assert result["reason"] == "no triggers defined: running all"
    assert names(result) == ["a", "b"]
    assert plan(defs, None)["reason"] == "no triggers defined: running all"


def test_a_trigger_fires_when_a_glob_matches_head_slash_path():
    result = plan(PYTHON_AND_DOCS, ["src/a.py", "README.md"])
    assert result["triggers_fired"] == [
        {"name": "python", "paths_matched": ["HEAD/src/a.py"], "test_sets": ["python"]}
    ]
    assert result["test_sets"] == ["python"]
    assert result["reason"] == "trigger 'python' fired on HEAD/src/a.py"
    assert names(result) == ["build/linux", "lint/py311", "unit/py311"]


def test_no_trigger_fires_when_no_glob_matches():
    result = plan(PYTHON_AND_DOCS, ["README.md", "src/a.pyc"])
    assert result == {
        "test_sets": [],
        "triggers_fired": [],
        "reason": "no trigger matched the 2 changed files",
        "tasks": [],
    }
    assert plan(PYTHON_AND_DOCS, [])["reason"] == "no files changed: no trigger fired"


def test_several_triggers_fire_together_and_their_sets_are_merged():
    result = plan(PYTHON_AND_DOCS, ["docs/index.md", "pyproject.toml", "tools/x.py"])
    assert result["triggers_fired"] == [
        {"name": "python", "paths_matched": ["HEAD/pyproject.toml", "HEAD/tools/x.py"], "test_sets": ["python"]},
        {"name": "docs", "paths_matched": ["HEAD/docs/index.md"], "test_sets": ["docs"]},
    ]
    assert result["test_sets"] == ["docs", "python"]
    assert result["reason"] == (
        "trigger 'python' fired on HEAD/pyproject.toml and 1 more path; "
        "trigger 'docs' fired on HEAD/docs/index.md"
    )
    assert names(result) == ["build/linux", "docs/linkcheck", "lint/py311", "unit/py311"]


def test_unknown_changed_files_run_the_test_set_all():
    """A commit with no parent runs `all` rather than firing every trigger, as the original
    did (its _computeAllDiffs returned EVERYTHING, which meant the set `all`)."""
    defs = dict(PYTHON_AND_DOCS, triggers=PYTHON_AND_DOCS["triggers"] + [
        {"name": "never", "paths": [], "test_sets": ["all"]},
    ])
    result = plan(defs, None)
    assert result["triggers_fired"] == []
    assert result["test_sets"] == ["all"]
    assert result["reason"] == "changed files unknown (a commit with no parent): running all"
    assert names(result) == ["build/linux", "docs/linkcheck", "lint/py311", "unit/py311"]


def test_disabled_tests_run_only_when_asked_for_by_name():
    disabled = dict(task("slow/linux", "test", builds=["build/linux"]), disabled=True)
    defs = definitions(builds=[task("build/linux", "build")], tests=[task("fast/linux", "test"), disabled])
    assert names(plan(defs, None)) == ["fast/linux"]
    assert names(plan(defs, ["x"], test_sets=["all"])) == ["fast/linux"]
    assert names(plan(defs, None, tests=["slow/*"])) == ["build/linux", "slow/linux"]


def test_requested_test_sets_override_triggers():
    result = plan(PYTHON_AND_DOCS, ["docs/index.md"], test_sets=["python"])
    assert result["triggers_fired"] == []
    assert result["test_sets"] == ["python"]
    assert result["reason"] == "requested test sets: python"
    assert names(result) == ["build/linux", "lint/py311", "unit/py311"]
    assert plan(PYTHON_AND_DOCS, None, test_sets=["docs", "all", "docs"])["test_sets"] == ["docs", "all"]


def test_an_unknown_test_set_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown test set 'pyton'; known test sets: all, docs, python$"):
        plan(PYTHON_AND_DOCS, [], test_sets=["pyton"])
    with pytest.raises(ValueError, match=r"^unknown test sets 'a', 'b';"):
        plan(PYTHON_AND_DOCS, [], test_sets=["a", "python", "b"])


def test_requested_test_globs_override_triggers_and_add_to_sets():
    result = plan(PYTHON_AND_DOCS, ["src/a.py"], tests=["unit/*"])
    assert result["reason"] == "requested tests: unit/*"
    assert result["test_sets"] == []
    assert names(result) == ["build/linux", "unit/py311"]
    both = plan(PYTHON_AND_DOCS, [], test_sets=["docs"], tests=["lint/*"])
    assert both["reason"] == "requested test sets: docs; requested tests: lint/*"
    assert names(both) == ["docs/linkcheck", "lint/py311"]


def test_a_test_glob_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"^no test name matches 'integration/\*'$"):
        plan(PYTHON_AND_DOCS, [], tests=["unit/*", "integration/*"])


def test_runs_come_from_the_test_or_the_override_and_builds_run_once():
    defs = definitions(
        builds=[task("build", "build")],
        tests=[task("flaky", "test", builds=["build"], runs=5), task("plain", "test")],
    )
    assert {t["name"]: t["runs"] for t in plan(defs, [])["tasks"]} == {"build": 1, "flaky": 5, "plain": 1}
    assert {t["name"]: t["runs"] for t in plan(defs, [], runs=3)["tasks"]} == {"build": 1, "flaky": 3, "plain": 3}
    with pytest.raises(ValueError, match="runs must be a whole number from 1 to 100000, not 0"):
        plan(defs, [], runs=0)


def test_one_plan_runs_at_most_100000_runs_in_all():
    defs = definitions(tests=[task(f"t{i}", "test", runs=40_000) for i in range(3)])
    with pytest.raises(ValueError, match="this plan has 120000 runs, more than the 100000 one command may run"):
        plan(defs, [])
    assert sum(t["runs"] for t in plan(defs, [], runs=33_333)["tasks"]) == 99_999
    for wrong in (100_001, 30_000_000, True, 1.5):
        with pytest.raises(ValueError, match=f"runs must be a whole number from 1 to 100000, not {wrong!r}"):
            plan(defs, [], runs=wrong)


def test_builds_are_pulled_in_transitively_once_and_in_dependency_order():
    defs = definitions(
        builds=[
            task("toolchain", "build"),
            task("zlib", "build", builds=["toolchain"]),
            task("app", "build", builds=["zlib", "toolchain"]),
            task("assets", "build"),
            task("unused", "build"),
        ],
        tests=[
            task("t/app", "test", builds=["app"]),
            task("t/both", "test", builds=["app", "assets"]),
            task("t/zlib", "test", builds=["zlib"]),
        ],
    )
    result = plan(defs, None)
    assert [(t["name"], t["kind"]) for t in result["tasks"]] == [
        ("assets", "build"),
        ("toolchain", "build"),
        ("zlib", "build"),
        ("app", "build"),
        ("t/app", "test"),
        ("t/both", "test"),
        ("t/zlib", "test"),
    ]
    by_name = {t["name"]: t for t in result["tasks"]}
    assert by_name["app"]["depends_on"] == ["toolchain", "zlib"]
    assert by_name["app"]["needed_by"] == ["t/app", "t/both"]
    assert by_name["zlib"]["needed_by"] == ["app", "t/zlib"]
    assert by_name["toolchain"]["needed_by"] == ["app", "zlib"]
    assert by_name["t/both"]["depends_on"] == ["app", "assets"]
    assert by_name["t/both"]["needed_by"] == []
    assert by_name["t/both"]["hash"] == "hash-t/both"

    only_zlib = plan(defs, None, tests=["t/zlib"])
    assert names(only_zlib) == ["toolchain", "zlib", "t/zlib"]


def test_every_build_comes_before_anything_consuming_it():
    builds = [task(f"b{i}", "build", builds=[f"b{j}" for j in range(i) if (i + j) % 3 == 0]) for i in range(30)]
    tests = [task(f"t{i}", "test", builds=[f"b{i}"]) for i in range(30)]
    result = plan(definitions(builds=builds, tests=tests), None)
    position = {t["name"]: index for index, t in enumerate(result["tasks"])}
    assert len(position) == len(result["tasks"]) == 60
    for planned in result["tasks"]:
        assert all(position[build] < position[planned["name"]] for build in planned["depends_on"])


def test_builds_of_other_repositories_come_first_and_deployments_are_not_planned():
    lib_build = dict(task("lib-build", "build"), repo="lib")
    lib_build["dependencies"]["tool"] = {"kind": "build", "repo": "lib", "build": "tool", "artifact": ""}
    defs = definitions(
        builds=[task("build", "build")],
        tests=[task("uses-lib", "test", other_repo_builds=["lib-build"])],
        deployments=[task("deploy/staging", "deployment", builds=["build"])],
    )
    defs["external_builds"] = {"lib/lib-build": lib_build, "lib/tool": dict(task("tool", "build"), repo="lib")}
    result = plan(defs, None)
    assert names(result) == ["lib/tool", "lib/lib-build", "uses-lib"]
    assert [t["repo"] for t in result["tasks"]] == ["lib", "lib", "HEAD"]
    assert result["tasks"][2]["depends_on"] == ["lib/lib-build"]
    with pytest.raises(ValueError, match="no test name matches 'deploy/\\*'"):
        plan(defs, None, tests=["deploy/*"])


def test_an_undefined_build_or_a_build_cycle_is_an_error_not_a_hang():
    missing = definitions(tests=[task("t", "test", builds=["ghost"])])
    with pytest.raises(ValueError, match=r"build 'ghost' is not defined \(needed by t\)"):
        plan(missing, None)
    cycle = definitions(
        builds=[task("a", "build", builds=["b"]), task("b", "build", builds=["a"]), task("c", "build")],
        tests=[task("t", "test", builds=["a", "c"])],
    )
    with pytest.raises(ValueError, match="builds depend on each other in a cycle: a, b"):
        plan(cycle, None)


def test_plans_five_thousand_tests_quickly():
    builds = [task(f"build/{i}", "build", builds=[f"build/{i - 1}"] if i else []) for i in range(50)]
    tests = [task(f"suite{i % 20}/test{i}", "test", builds=[f"build/{i % 50}"], runs=2) for i in range(5000)]
    test_sets = {f"suite{s}": [t["name"] for t in tests if t["name"].startswith(f"suite{s}/")] for s in range(20)}
    triggers = [
        {"name": f"t{s}", "paths": [f"HEAD/src/suite{s}/*", "HEAD/*.toml"], "test_sets": [f"suite{s}"]}
        for s in range(20)
    ]
    defs = definitions(builds=builds, tests=tests, test_sets=test_sets, triggers=triggers)
    changed = [f"src/suite{i % 20}/file{i}.py" for i in range(2000)] + ["pyproject.toml"]

    started = time.perf_counter()
    result = plan(defs, changed)
    elapsed = time.perf_counter() - started

    assert len(result["tasks"]) == 5050
    assert elapsed < 0.3, f"planning 5,000 tests took {elapsed:.3f}s"


def test_pinned_changes_are_matched_as_pin_paths():
    defs = dict(PYTHON_AND_DOCS, triggers=[{"name": "lib", "paths": ["lib/include/*"], "test_sets": ["docs"]}])
    result = plan(defs, ["README"], pinned_changes={"lib": ["include/a.h", "src/b.c"]})
    assert result["triggers_fired"] == [{"name": "lib", "paths_matched": ["lib/include/a.h"], "test_sets": ["docs"]}]
    assert names(result) == ["docs/linkcheck"]
    assert plan(defs, ["README"])["triggers_fired"] == []
