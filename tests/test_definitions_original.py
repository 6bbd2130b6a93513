"""Files written for the original TestLooper resolve unchanged, as the original resolved them.

Every fixture comes from ufora/test-looper (tests/fixtures/original/README.md says where); the
expectations are the original's own tests', cited by name. Repositories are real git
repositories (original_fixtures.SourceControl), pins are followed through GitRepositories.
"""

from __future__ import annotations

import textwrap

import pytest

from original_fixtures import SourceControl, fixture
from testlooper.definitions import DefinitionsError, resolve_text


@pytest.fixture
def sc(tmp_path):
    return SourceControl(tmp_path / "repos")


def stage_commands(task):
    return [stage["command"] for stage in task["stages"]]


def dedent(text):
    return textwrap.dedent(text).lstrip("\n")


# -- versions --------------------------------------------------------------------------------


@pytest.mark.parametrize("branch, version", [("master", 4), ("dev", 5)])
def test_project_with_stages(sc, branch, version):
    sc.add_project(branch, "project_with_stages")
    d = sc.resolve(f"project_with_stages/{branch}")
    assert d["looper_version"] == version
    staged = d["builds"]["build_with_stages"]
    assert [[a["name"] for a in s["artifacts"]] for s in staged["stages"]] == [["first_stage"], ["second_stage"]]
    assert staged["stages"][0]["artifacts"][0]["include_patterns"] == ["*.txt"]
    assert d["builds"]["build_consuming_stage_1"]["dependencies"]["in"] == {
        "kind": "build", "repo": "HEAD", "build": "build_with_stages", "artifact": "first_stage"}
    assert d["builds"]["build_consuming_stage_2"]["dependencies"]["in"]["artifact"] == "second_stage"
    assert stage_commands(d["builds"]["build_consuming_stage_2"]) == ["cat $TEST_INPUTS/in/file2.log"]
    assert d["environments"]["linux"]["image"]["dockerfile_contents"].startswith("FROM ubuntu:16.04")


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_simple_project(sc, branch):
    sc.add_project(branch, "simple_project")
    d = sc.resolve(f"simple_project/{branch}")
    assert sorted(d["builds"]) == ["build/linux"]
    groups = [f"test_with_individual_failures{suffix}/{env}" for env in ("linux", "linux2")
              for suffix in ("_1", "_2", "_nogroup")]
    assert sorted(d["tests"]) == sorted(["good/linux", "bad/linux", "check_build_output/linux", "docker/linux", *groups])
    good = d["tests"]["good/linux"]
    assert good["dependencies"] == {
        "build": {"kind": "build", "repo": "HEAD", "build": "build/linux", "artifact": ""},
        "src": {"kind": "source", "repo": "HEAD", "path": ""}}
    assert stage_commands(good) == ["src/script.py 0"]
    grouped = d["tests"]["test_with_individual_failures_2/linux2"]
    assert grouped["environment"] == "linux2" and grouped["configuration"] == "linux2"
    assert grouped["project"] == "test_with_individual_failures_2"
    assert grouped["dependencies"] == {"util": {"kind": "source", "repo": "HEAD", "path": "util"}}
    assert stage_commands(grouped) == [
        "$TEST_INPUTS/util/produce_test_failures.py Group2WithAVeryLongGroupName > $TEST_OUTPUT_DIR/testSummary.json\n"]
    assert d["environments"]["linux"]["image"] == {"dockerfile": "Dockerfile.txt"}
    assert d["environments"]["linux"]["inheritance"] == [] and d["environments"]["linux"]["variables"] == {}
    build = d["builds"]["build/linux"]
    assert [a["name"] for s in build["stages"] for a in s["artifacts"]] == [""]  # `command`: the whole output
    assert stage_commands(build) == ["cp $TEST_INPUTS/src/build_file $TEST_BUILD_OUTPUT_DIR/build_file\n"]


def test_version_3_has_no_implicit_source_and_version_2_has(sc):
    """The v3-era projects: 386c907 'Expose src-dir explicitly if looper version is 3 or higher'."""
    simple = sc.add_project("v3-era", "simple_project")  # looper_version 3
    sc.add_project("v3-era", "simple_project_2", pinned=simple)  # looper_version 2
    v3 = sc.resolve("simple_project/v3-era")
    assert v3["looper_version"] == 3
    assert set(v3["tests"]["test_with_individual_failures_1/linux"]["dependencies"]) == {"util"}
    v2 = sc.resolve("simple_project_2/v3-era")
    assert v2["looper_version"] == 2
    for section in ("builds", "tests"):
        for task in v2[section].values():
            assert task["dependencies"]["src"] == {"kind": "source", "repo": "HEAD", "path": ""}, task["name"]
    assert stage_commands(v2["tests"]["sleeper/linux"]) == ["./sleeper.py"]
    sc.add_project("v3-era", "simple_project_3", pinned=sc.shas["simple_project_2/v3-era"])  # looper_version 2
    v2_mixins = sc.resolve("simple_project_3/v3-era")
    assert v2_mixins["tests"]["test/env_21"]["variables"]["OVERRIDE_OUTPUT"] == "MIXIN_1"
    assert v2_mixins["tests"]["test/env_12"]["dependencies"]["build"]["build"] == "build/k2"
    # ... which version 2 ran in the source checkout
    assert v2["tests"]["sleeper/linux"]["working_directory"] == "source"
    assert v3["tests"]["good/linux"]["working_directory"] == "inputs"


def test_version_3_precommands_prefix_commands_root_first():
    d = resolve_text(dedent("""
        looper_version: 3
        environments:
          root: {platform: linux, image: {dockerfile_contents: hi}, test_preCommand: "echo root",
                 test_preCleanupCommand: "echo root-cleanup"}
          linux: {base: root, test_preCommand: "echo linux"}
        tests:
          t/linux: {command: "run", cleanup: "tidy", disabled: true}
    """), "testDefinitions.yml")
    stage = d["tests"]["t/linux"]["stages"][0]
    assert stage["command"] == "echo root\necho linux\nrun"
    assert stage["cleanup"] == "echo root-cleanup\ntidy"
    assert d["tests"]["t/linux"]["disabled"] is True


def test_version_4_prioritize_disables_what_no_glob_matches():
    """master: test_manager_include_semantics.py::test_prioritization_filters."""
    d = resolve_text(dedent("""
        looper_version: 4
        environments:
          e:
            platform: linux
            image:
              dockerfile_contents: hi
        tests:
          foreach:
            name: [t1, t2]
            env: [e1, e2]
          repeat:
            ${name}/${env}:
              environment: e
              command: cmd
        prioritize:
          - 't1/*'
          - '*/e2'
    """), "testDefinitions.yml")
    assert {name for name, t in d["tests"].items() if not t["disabled"]} == {"t1/e1", "t1/e2", "t2/e2"}


def test_version_4_disabled_builds_needed_by_enabled_tasks_are_enabled():
    """master TestYamlFiles.repo2 disables build_without_deps/linux; a test needing it enables it."""
    text = fixture("master", "TestYamlFiles", "repo0.yml") + dedent("""
        builds:
          needed/repo0_env: {command: x, disabled: true}
          unneeded/repo0_env: {command: x, disabled: true}
        tests:
          t/repo0_env: {command: x, dependencies: {b: needed/repo0_env}}
    """)
    d = resolve_text(text, "testDefinitions.yml")
    assert d["builds"]["needed/repo0_env"]["disabled"] is False
    assert d["builds"]["unneeded/repo0_env"]["disabled"] is True


def test_versions_keep_their_own_keys():
    err = _error("looper_version: 5\ntests: {t/linux: {disabled: true}}\n")
    assert "unknown key 'disabled' in a test of looper_version 5" in err.message
    err = _error("looper_version: 4\ntest_sets: {}\n")
    assert "unknown key 'test_sets' in the top level of looper_version 4" in err.message
    err = _error("looper_version: 3\ntests: {t/linux: {stages: []}}\n")
    assert "unknown key 'stages' in a test of looper_version 3" in err.message
    err = _error("looper_version: 1\n")
    assert err.message == "looper_version 1 is not supported (supported: 2, 3, 4, 5)"


def test_an_included_file_may_be_older_but_not_newer():
    files = {"old.yml": "looper_version: 4\ntests: {old/e: {command: x, disabled: true}}\n",
             "new.yml": "looper_version: 5\n"}
    root = "looper_version: 5\nenvironments: {e: {platform: linux, image: {dockerfile_contents: hi}}}\n"
    d = resolve_text(root + "includes: [./old.yml]\n", "testDefinitions.yml", files.__getitem__)
    assert d["tests"]["old/e"]["disabled"] is True
    with pytest.raises(DefinitionsError, match="may not be newer than the file including it"):
        resolve_text("looper_version: 4\nincludes: [./new.yml]\n", "testDefinitions.yml", files.__getitem__)


def _error(text, files=None):
    with pytest.raises(DefinitionsError) as info:
        resolve_text(text, "testDefinitions.yml", (files or {}).__getitem__)
    return info.value


# -- semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_simple_project_3_mixins_without_base(sc, branch):
    """worker_state_test.py::test_variable_expansions: what each test echoes."""
    simple_2 = sc.add_commit("simple_project_2/any", "looper_version: 5\n")
    sc.add_project(branch, "simple_project_3", pinned=simple_2)
    d = sc.resolve(f"simple_project_3/{branch}")
    expected = {"env": ("ENV", "k0"), "env_1": ("MIXIN_1", "k1"), "env_21": ("MIXIN_1", "k1"),
                "env_2": ("MIXIN_2", "k2"), "env_12": ("MIXIN_2", "k2")}
    for env, (output, kind) in expected.items():
        test = d["tests"][f"test/{env}"]
        assert test["variables"]["OVERRIDE_OUTPUT"] == output, env
        assert test["dependencies"]["build"] == {"kind": "build", "repo": "HEAD", "build": f"build/{kind}",
                                                 "artifact": ""}
        assert stage_commands(test)[0].startswith(f'echo "{output}" >> $TEST_OUTPUT_DIR/results.txt')
        # `directory: ${TEST_OUTPUT_DIR}` is the whole output directory
        assert test["stages"][0]["artifacts"] == [{"name": "", "directory": "", "include_patterns": [],
                                                   "exclude_patterns": [], "format": "Files"}]
    assert d["environments"]["mixin1"]["platform"] == "" and d["environments"]["mixin1"]["inheritance"] == []
    assert d["environments"]["env_12"]["inheritance"] == ["mixin2", "env_1", "mixin1", "env", "linux"]
    assert d["builds"]["build/k2"]["variables"]["K"] == "k2"
    assert d["repos"]["simple_2"]["commit"] == simple_2 and d["repos"]["simple_2"]["auto"] is True
    if branch == "dev":
        assert d["tests"]["test/project_a"]["stages"] == []  # neither command nor stages
        assert d["tests"]["test/project_a"]["project"] == "a"
        listed = d["tests"]["test/test_with_repeating"]["stages"][0]
        assert listed["list_tests_command"].startswith("python $TEST_INPUTS/src/testRunner.py --list")
        assert d["test_sets"]["a"] == ["test/project_a"]
        assert [t["name"] for t in d["triggers"]] == ["A", "B"]


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_environment_inheritance_diamond(branch):
    """test_definitions_test.py::test_environment_inheritance, on environment_yaml_file, which
    writes `environments:` twice (the first, empty one is replaced, as PyYAML did)."""
    heard = []
    d = resolve_text(fixture(branch, "test_definitions_test", "environment_yaml_file.yml"), "testDefinitions.yml",
                     warn=heard.append)
    env = d["environments"]["diamond"]
    assert env["inheritance"] == ["child2", "child1", "env_dep", "env_root"]
    assert env["setup_script"] == "\nTestFileContents\n\nChildContents\n"
    assert [(w.line, "'environments'" in w.message) for w in heard] == [(3, True)]


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_basic_yaml_variables_become_strings(sc, branch):
    """test_definitions_test.py::test_basic (its pin made real)."""
    # The original test only parsed the file; resolving it needs the child it pins to define
    # what it refers to.
    sc.add_commit("child-repo-name/repo_hash", dedent("""
        looper_version: 5
        environments:
          linux: {platform: linux, image: {dockerfile_contents: hi}}
          windows: {platform: windows, image: {base_ami: ami-1}}
          test_linux: {base: linux}
        builds:
          build/linux: {command: make}
          build/test_linux: {command: make}
    """))
    sc.add_commit("repo/hash", fixture(branch, "test_definitions_test", "basic_yaml_file.yml"))
    d = sc.resolve("repo/hash")
    assert sorted([*d["builds"], *d["tests"]]) == ["build/linux", "build/test_linux", "test/linux", "test/test_linux"]
    assert d["environments"]["test_linux"]["variables"] == {"ENV_VAR": "ENV_VAL", "AN_INT_VAR": "10",
                                                            "A_BOOL_VAR": "true"}


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_circular_builds_are_an_error(branch):
    """test_definitions_test.py circular_yaml_file."""
    err = _error(fixture(branch, "test_definitions_test", "circular_yaml_file.yml"))
    assert "builds depend on each other in a cycle" in err.message


def test_squash_and_foreach_as_the_original():
    """test_definitions_test.py::test_squashing and foreach_2_yml."""
    from testlooper.definitions.macros import expand_macros
    from testlooper.definitions.yamlload import load_yaml_text

    squashed = expand_macros(load_yaml_text(fixture("dev", "test_definitions_test", "foreach_and_squash_yaml.yml"), "x"))
    assert squashed == {"test/G1/T1": "P1 T1.test", "test/G1/T2": "P1 T2.test", "test/G2/T3": "P2 T3.test",
                        "test/G2/T4": "P2 T4.test"}
    foreach = expand_macros(load_yaml_text(fixture("dev", "test_definitions_test", "foreach_2_yml.yml"), "x"))
    assert foreach["tests"]["test/all/platform-2"]["command"] == "cmd in platform-2\n"


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_includes_carry_the_macro_variables_active_where_written(branch):
    """test_definitions_test.py::test_includes_and_variables: 8 includes, each with its variables."""
    seen = []

    def read(path):
        seen.append(path)
        return "looper_version: 4\ntests: {'${v1}/${v2}/${v3}/${v4}/e': {command: x}}\n"

    text = fixture(branch, "test_definitions_test", "includes_yaml_file.yml").replace("repo1/path", "./repo1.yml") \
        .replace("repo2/path", "./repo2.yml")
    d = resolve_text(text + "environments: {e: {platform: linux, image: {dockerfile_contents: hi}}}\n",
                     "testDefinitions.yml", read)
    expected = set()
    for v1 in ("v1_val1", "v1_val2"):
        for v2 in ("v2_val1", "v2_val2"):
            expected.add(f"{v1}/{v2}/${{v3}}/${{v4}}/e")
            expected.add(f"{v1}/{v2}/v3_val1/v4_val1/e")
    assert set(d["tests"]) == expected
    assert len(seen) == 8


def test_include_includes_and_recursive_includes(sc):
    """test_manager_include_semantics.py::test_include_includes, ::test_recursive_includes."""
    envdef2 = "looper_version: 5\nrepos:\n  r: repo0/base\n"
    envdef = "looper_version: 5\nincludes:\n  - ./envdef2.yml\n"
    sc.add_commit("repo0/base")
    sc.add_commit("repo0/c0", "looper_version: 5\nincludes:\n  - ./envdef.yml\n",
                  {"envdef.yml": envdef, "envdef2.yml": envdef2})
    assert sorted(sc.resolve("repo0/c0")["repos"]) == ["r"]
    sc.add_commit("repo0/c1", "looper_version: 5\nincludes:\n  - ./envdef.yml\n",
                  {"envdef.yml": envdef, "envdef2.yml": "looper_version: 5\nincludes:\n  - ./envdef.yml\n"})
    assert sc.resolve("repo0/c1")["repos"] == {}


def test_includes_with_variables_that_expand_forever_are_refused():
    """test_manager_include_semantics.py::test_recursive_includes_with_variables_that_expand_forever."""
    files = {
        "envdef2.yml": "looper_version: 5\nincludes:\n  - path: ./envdef.yml\n    variables:\n      var: v_${var}\n",
        "envdef.yml": "looper_version: 5\nincludes:\n  - path: ./envdef2.yml\n    variables:\n      var: v_${var}\n",
    }
    err = _error("looper_version: 5\nincludes:\n  - path: ./envdef.yml\n    variables:\n      var: v_0\n", files)
    assert "more than 128 files are included" in err.message


@pytest.mark.parametrize("second, words", [
    ("looper_version: 5\nrepos:\n  r: repo0/base2\n", "repo 'r' is defined both"),
    ("looper_version: 5\nenvironments:\n  e: {platform: linux, image: {dockerfile_contents: hi}}\n",
     "environments entry 'e' is defined both"),
])
def test_includes_cant_redefine(second, words):
    """test_manager_include_semantics.py::test_includes_cant_redefine_repos / _environments."""
    first = second.replace("base2", "base")
    err = _error("looper_version: 5\nincludes:\n  - ./envdef.yml\n  - ./envdef2.yml\n",
                 {"envdef.yml": first, "envdef2.yml": second})
    assert words in err.message


def test_includes_can_share_environments():
    """test_manager_include_semantics.py::test_includes_can_share_environments."""
    files = {"envdef.yml": "looper_version: 5\nenvironments:\n  e: {platform: linux, image: {dockerfile_contents: hi}}\n"
                           "tests:\n  t1/e: {command: './script.py 1'}\n",
             "envdef2.yml": "looper_version: 5\ntests:\n  t2/e: {command: './script.py 1'}\n"}
    d = resolve_text("looper_version: 5\nincludes:\n  - ./envdef.yml\n  - ./envdef2.yml\n", "testDefinitions.yml",
                     files.__getitem__)
    assert sorted(d["tests"]) == ["t1/e", "t2/e"]


def test_environment_test_stages_come_first_root_first():
    """test_manager_include_semantics.py::test_environment_overrides."""
    d = resolve_text(dedent("""
        looper_version: 5
        environments:
          e:
            platform: linux
            image:
              dockerfile_contents: hi
            test_stages:
              - command: preCommand
          e2:
            base: e
            test_stages:
              - command: preCommand2
        tests:
          t1/e2:
            command: actualCommand
    """), "testDefinitions.yml")
    assert stage_commands(d["tests"]["t1/e2"]) == ["preCommand", "preCommand2", "actualCommand"]


def test_configuration_overrides():
    """test_manager_include_semantics.py::test_configuration_override."""
    d = resolve_text(dedent("""
        looper_version: 5
        environments:
          e:
            platform: linux
            image:
              dockerfile_contents: hi
            test_stages:
              - command: preCommand
            test_configuration: override_at_root
          e2:
            base: []
            test_configuration: override_at_mixin
        tests:
          t1:
            environment: e
            command: actualCommand
          t2:
            environment: e
            mixins: [e2]
            command: actualCommand
          t3:
            environment: e
            mixins: [e2]
            configuration: override_at_test_level
            command: actualCommand
    """), "testDefinitions.yml")
    assert [d["tests"][t]["configuration"] for t in ("t1", "t2", "t3")] == [
        "override_at_root", "override_at_mixin", "override_at_test_level"]


def test_environment_mixins():
    """test_manager_include_semantics.py::test_environment_mixins."""
    d = resolve_text(dedent("""
        looper_version: 5
        environments:
          e:
            platform: linux
            image:
              dockerfile_contents: hi
            variables:
              v: e
            test_stages:
              - command: preCommand
          e2:
            base: []
            test_stages:
              - command: preCommand2
            variables:
              v: e2
        tests:
          t1/e:
            mixins: [e2]
            command: actualCommand - v=${v}
    """), "testDefinitions.yml")
    assert stage_commands(d["tests"]["t1/e"]) == ["preCommand", "preCommand2", "actualCommand - v=e2"]


def test_prioritization_filters_triggers_and_the_root_commit(sc):
    """test_manager_include_semantics.py::test_prioritization_filters (dev): triggers per commit;
    and, as the original's _computeAllDiffs, a commit with no parent runs `all`."""
    from testlooper.planning import plan

    envdef = dedent("""
        looper_version: 5
        environments:
          e:
            platform: linux
            image:
              dockerfile_contents: hi
        tests:
          foreach:
            name: [t1, t2]
            env: [e1, e2]
          repeat:
            ${name}/${env}:
              environment: e
              command: cmd
        test_sets:
          ts:
            - t*
          ones:
            - "*1"
        triggers:
          - name: a_files
            paths:
              - HEAD/a/*
            test_sets:
              - ts
          - name: b_files
            paths:
              - HEAD/b/*
            test_sets:
              - ones
    """)
    d = resolve_text(envdef, "testDefinitions.yml")
    assert set(d["tests"]) == {"t1/e1", "t1/e2", "t2/e2", "t2/e1"}
    a = plan(d, ["a/file"])
    assert ([t["name"] for t in a["triggers_fired"]], a["test_sets"]) == (["a_files"], ["ts"])
    b = plan(d, ["b/file"])
    assert ([t["name"] for t in b["triggers_fired"]], b["test_sets"]) == (["b_files"], ["ones"])
    assert {t["name"] for t in plan(d, ["b/file"])["tasks"]} == {"t1/e1", "t2/e1"}
    root = plan(d, None)
    assert (root["test_sets"], len(root["tasks"])) == (["all"], 4)


def _stage_repo(extra):
    """test_manager_stage_dependencies.py: basic_repo_text plus one more build."""
    basic = dedent("""
        looper_version: 5
        environments:
          linux:
            platform: linux
            image:
              dockerfile_contents: ""
        builds:
          build_with_stages:
            environment: linux
            stages:
            - command: "hi"
              artifacts:
              - name: first_A
                directory: whatever
              - name: first_B
                directory: whatever2
            - command: "hi"
              artifacts:
              - name: second_A
                directory: whatever
          build_needing_first_A:
            environment: linux
            dependencies:
              first_A: build_with_stages/first_A
            command: "hi"
          build_needing_first_B:
            environment: linux
            dependencies:
              first_A: build_with_stages/first_A
              first_B: build_with_stages/first_B
            command: "hi"
    """)
    return basic + textwrap.indent(dedent(extra), "  ")


def test_stage_dependencies_resolve():
    """test_manager_stage_dependencies.py::test_basic_dependency (the definitions part)."""
    d = resolve_text(_stage_repo(""), "testDefinitions.yml")
    deps = d["builds"]["build_needing_first_B"]["dependencies"]
    assert {k: v["artifact"] for k, v in deps.items()} == {"first_A": "first_A", "first_B": "first_B"}


@pytest.mark.parametrize("extra, words", [
    # test_recognizes_invalid_dep
    ("""
     build_needing_bad_artifact:
       environment: linux
       dependencies:
         first_A: build_with_stages/doesnt_exist
         first_B: build_with_stages/first_B
       command: "hi"
     """, "build 'build_with_stages' has no artifact 'doesnt_exist'"),
    # test_recognizes_double_dep: stages and a command (one more, last, stage)
    ("""
     build_with_double:
       environment: linux
       stages:
       - command: "hi"
         artifacts:
         - name: second_A
           directory: whatever
       - command: "hi"
         artifacts:
         - name: second_A
           directory: whatever
       command: "hi"
     """, "artifact 'second_A' is defined twice"),
    # test_recognizes_double_dep_of_unnamed
    ("""
     build_with_double:
       environment: linux
       stages:
       - command: "hi"
         artifacts:
         - name: second_A
           directory: whatever
       - command: "hi"
         artifacts:
         - directory: whatever
     """, "the unnamed artifact (the whole output, which 'command' makes) must be the task's only artifact"),
])
def test_stage_dependency_mistakes(extra, words):
    err = _error(_stage_repo(extra))
    assert words in err.message


def test_command_beside_stages_is_one_more_last_stage():
    d = resolve_text(_stage_repo("""
        staged_and_command:
          environment: linux
          stages:
          - {command: first, order: 5}
          command: last
        """), "testDefinitions.yml")
    assert stage_commands(d["builds"]["staged_and_command"]) == ["first", "last"]


def test_environments_may_be_a_list_of_mappings():
    d = resolve_text(dedent("""
        looper_version: 5
        environments:
          - linux: {platform: linux, image: {dockerfile_contents: hi}}
          - foreach: {v: [a, b]}
            repeat:
              env_${v}: {base: linux, variables: {V: "${v}"}}
        tests:
          t/env_b: {command: "echo ${V}"}
    """), "testDefinitions.yml")
    assert sorted(d["environments"]) == ["env_a", "env_b", "linux"]
    assert stage_commands(d["tests"]["t/env_b"]) == ["echo b"]


def test_deployments_accept_port_expose():
    d = resolve_text(dedent("""
        looper_version: 5
        environments: {linux: {platform: linux, image: {dockerfile_contents: hi}}}
        deployments:
          web/linux: {portExpose: {http: 8080}}
    """), "testDefinitions.yml")
    assert d["deployments"]["web/linux"]["port_expose"] == {"http": 8080}


# -- other repositories ----------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_simple_project_2_builds_on_simple_project(sc, branch):
    """worker_state_test.py (test_cross_project_dependencies and friends) on simple_project_2."""
    simple = sc.add_project(branch, "simple_project")
    sc.add_project(branch, "simple_project_2", pinned=simple)
    d = sc.resolve(f"simple_project_2/{branch}")
    assert d["repos"]["simple"] == {
        "reference": f"simple_project/{simple}", "repository": "simple_project", "commit": simple, "path": "",
        "branch": "master", "auto": True, "prioritize": False, "import": ""}
    linux = d["environments"]["linux"]
    assert linux["inheritance"] == ["simple/linux"]
    # A Dockerfile named by another repository's environment is read from that repository.
    assert linux["image"] == {"dockerfile_contents": fixture(branch, "simple_project", "Dockerfile.txt")}
    assert d["environments"]["linux2"]["image"] == {"dockerfile": "Dockerfile.txt"}
    assert d["environments"]["linux_dependent"]["inheritance"] == ["linux", "simple/linux"]
    dependent = d["tests"]["test3/linux_dependent"]
    assert dependent["variables"] == {"ENV_VAR": "LINUX_OVERRIDE_SECOND", "ENV_VAR_2": "LINUX_OVERRIDE_2"}
    assert dependent["dependencies"] == {
        "build_import": {"kind": "build", "repo": "simple", "build": "build/linux", "artifact": ""},
        "simplesource": {"kind": "source", "repo": "simple", "path": ""}}
    assert d["tests"]["test2_dep_from_env/linux2"]["dependencies"]["simplesource"] == {
        "kind": "source", "repo": "simple", "path": ""}
    assert d["builds"]["build_flakey/linux"]["max_retries"] == 5
    assert d["builds"]["build_flakey/linux"]["retry_wait_seconds"] == 30
    assert stage_commands(d["builds"]["build2/linux"]) == ["cp $TEST_INPUTS/build_import/* $TEST_BUILD_OUTPUT_DIR\n"]
    assert d["builds"]["build2/linux"]["stages"][0]["artifacts"][0]["name"] == ""
    assert d["tests"]["test2/linux"]["variables"] == {"ENV_VAR": "LINUX_OVERRIDE"}
    assert d["tests"]["test2/linux"]["configuration"] == "linux" and d["tests"]["test2/linux"]["project"] == "test2"
    # The other repository's build, with what it needs, is there for the planner and the runner.
    external = d["external_builds"]["simple/build/linux"]
    assert external["repo"] == "simple" and external["name"] == "build/linux"
    assert external["dependencies"] == {"src": {"kind": "source", "repo": "simple", "path": ""}}
    simple_alone = sc.resolve(f"simple_project/{branch}")
    assert external["hash"] == simple_alone["builds"]["build/linux"]["hash"]


def _test_yaml_files(sc, branch="dev", only=None):
    """The original harness's add_content, plus repo3 and repo9 (test_manager_test.py)."""
    def text(name):
        return fixture(branch, "TestYamlFiles", f"{name}.yml")

    dockerfile = {"test_looper/Dockerfile.txt": "FROM ubuntu:16.04\n"}
    plan = [("repo0/c0", "repo0"), ("repo0/c1", "repo0"), ("repo1/c0", "repo1"), ("repo1/c1", "repo1"),
            ("repo2/c0", "repo2"), ("repo2/c1", "repo2"), ("repo3/c0", "repo3"),
            ("repo9/c0", "repo9_import_child_refs")]
    for commit, name in plan:
        if only is None or commit.split("/")[0] in only:
            sc.add_commit(commit, text(name), dockerfile)


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_repositories_through_each_other(sc, branch):
    """test_manager_test.py::test_manager_env_imports and test_manager_missing_environment_refs."""
    _test_yaml_files(sc, branch)
    repo2 = sc.resolve("repo2/c0")
    assert repo2["environments"]["linux"]["variables"] == {"ENV_VAR": "LINUX", "ENV_VAR_2": "LINUX_2"}
    assert repo2["environments"]["windows_2"]["variables"] == {
        "ENV_VAR": "OVERRIDDEN", "ENV_VAR2": "WINDOWS_2", "ENV_VAR_2": "WINDOWS_3"}
    assert repo2["environments"]["windows_2"]["setup_script"] == "echo 'ami-contents'\n\necho 'more ami contents'\n"
    build = repo2["builds"]["build/linux"]
    assert build["dependencies"]["child"] == {"kind": "build", "repo": "child", "build": "build/linux", "artifact": ""}
    assert repo2["builds"]["build_without_deps/linux"]["disabled"] is (branch == "master")
    repo3 = sc.resolve("repo3/c0")
    assert sorted(repo3["builds"]) == ["build/linux", "build_without_deps/linux"]
    assert repo3["environments"]["linux"]["inheritance"] == ["child/linux"]
    assert repo3["environments"]["linux"]["variables"] == {"ENV_VAR": "LINUX", "ENV_VAR_2": "LINUX_2"}
    # repo3 -> repo2 -> repo1: builds two hops away come with their own inputs, rebased.
    assert sorted(repo3["external_builds"]) == ["child/build/linux", "child/child/build/linux"]
    assert repo3["external_builds"]["child/build/linux"]["dependencies"]["child"] == {
        "kind": "build", "repo": "child/child", "build": "build/linux", "artifact": ""}
    assert repo3["repos"]["child/child"]["repository"] == "repo1"
    assert repo3["repos"]["child/child"]["commit"] == sc.shas["repo1/c0"]
    # An environment dependency of another repository's environment keeps naming its repository.
    linux_env_deps = repo2["tests"]["test/linux"]["dependencies"]
    assert linux_env_deps["dep1"] == {"kind": "source", "repo": "repo0c1", "path": ""}


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_imports_follow_pins_over_several_hops(sc, branch):
    """test_manager_test.py::test_child_repo_refs on TestYamlFiles.repo9_import_child_refs."""
    _test_yaml_files(sc, branch)
    d = sc.resolve("repo9/c0")
    assert d["repos"]["repo0c0_ref"]["import"] == "repo2_ref/child/repo0c0"
    assert d["repos"]["repo0c0_ref"]["repository"] == "repo0"
    assert d["repos"]["repo0c0_ref"]["commit"] == sc.shas["repo0/c0"]
    assert d["repos"]["repo1c0_ref"]["commit"] == sc.shas["repo1/c0"]
    assert d["builds"]["build/repo0_env"]["variables"]["ENV"] == "repo0"
    assert d["builds"]["build/repo1_env"]["variables"]["ENV_VAR"] == "LINUX"
    assert d["builds"]["build/repo2_env"]["variables"]["ENV_VAR_2"] == "LINUX_2"
    assert d["builds"]["build/repo2_env"]["dependencies"]["input"] == {
        "kind": "build", "repo": "repo2_ref", "build": "build_without_deps/linux", "artifact": ""}


@pytest.mark.parametrize("branch", ["master", "dev"])
def test_circular_environments_and_builds(sc, branch):
    """test_manager_test.py::test_circular_environment_refs and ::test_circular_test_refs."""
    sc.add_commit("repo7/c0", fixture(branch, "TestYamlFiles", "repo7_circular.yml"))
    sc.add_commit("repo8/c0", fixture(branch, "TestYamlFiles", "repo8_circular_builds.yml"))
    with pytest.raises(DefinitionsError, match="environments inherit in a cycle: e1 -> e2 -> e1"):
        sc.resolve("repo7/c0")
    with pytest.raises(DefinitionsError, match="builds depend on each other in a cycle"):
        sc.resolve("repo8/c0")


def test_a_repository_not_yet_there_is_one_error_naming_the_pin(sc):
    """test_manager_env_imports: repo3 cannot resolve until repo1 exists."""
    _test_yaml_files(sc, only={"repo2", "repo3"})
    with pytest.raises(DefinitionsError) as info:
        sc.resolve("repo3/c0")
    message = str(info.value)
    assert "repo pin 'child' (repo1/c0)" in message
    assert "no repository named 'repo1' is available" in message


def test_unknown_commit_and_undefined_build_name_the_pin(sc):
    sc.add_commit("lib/v1", "looper_version: 5\nenvironments: {e: {platform: linux, image: {dockerfile_contents: x}}}\n"
                            "builds: {make/e: {command: make}}\n")
    sc.add_commit("app/c0", "looper_version: 5\nrepos: {lib: lib/nope}\nenvironments: {e: {base: lib/e}}\n")
    with pytest.raises(DefinitionsError, match=r"environments.e.base: repo pin 'lib' \(lib/nope\): repository 'lib' "
                                               r"has no commit 'nope'$"):
        sc.resolve("app/c0")
    sc.add_commit("app/c1", "looper_version: 5\nrepos: {lib: lib/v1}\nenvironments: {e: {base: lib/e}}\n"
                            "tests: {t/e: {command: x, dependencies: {b: lib/make/linux}}}\n")
    with pytest.raises(DefinitionsError) as info:
        sc.resolve("app/c1")
    assert info.value.key_path == "tests.t/e.dependencies.b"
    assert f"repo pin 'lib' (lib/v1) at {sc.shas['lib/v1'][:12]}: build 'make/linux', which is not defined " \
           "(builds: make/e)" in info.value.message


def test_includes_from_pinned_repositories(sc):
    """test_manager_include_semantics.py::test_basic_includes and
    ::test_env_inheritance_in_included_files."""
    envdef = dedent("""
        looper_version: 5
        environments:
          ${env_name}:
            platform: linux
            image:
              dockerfile_contents: hi
            variables:
              ${vname}: ${vdef}
    """)
    sc.add_commit("repo0/base", None, {"envdef.yml": envdef})
    sc.add_commit("repo0/c0", dedent("""
        looper_version: 5
        repos:
          include_from:
            reference: repo0/base
        includes:
          foreach:
            env_name:
              - e1
              - e2
            vname:
              - v1
            vdef:
              - v2
          repeat:
            - include_from/envdef.yml
    """))
    d = sc.resolve("repo0/c0")
    assert sorted(d["environments"]) == ["e1", "e2"]
    assert d["environments"]["e2"]["variables"] == {"v1": "v2"}

    lowest = "looper_version: 5\nenvironments:\n  root_env: {platform: linux, image: {dockerfile_contents: hi}}\n" \
             "  derived: {base: [root_env]}\n"
    sc.add_commit("repo1/c0", "looper_version: 5", {"lowest.yml": lowest})
    sc.add_commit("repo1/c1", "looper_version: 5\nrepos:\n  r: repo1/c0\nincludes:\n  - r/lowest.yml\n"
                              "environments:\n  really_derived:\n    base: [ derived ]\n")
    assert sorted(sc.resolve("repo1/c1")["environments"]) == ["derived", "really_derived", "root_env"]


def test_pins_of_this_commit_with_paths():
    """test_manager_include_semantics.py::test_repos_with_paths: both ways name the same input."""
    d = resolve_text(dedent("""
        looper_version: 5
        repos:
          self_with_path:
            reference: HEAD
            path: dir1/dir2
          self_without_path:
            reference: HEAD
        environments:
          test_linux:
            platform: linux
            image:
              dockerfile: "test_looper/Dockerfile.txt"
        builds:
          way_1:
            environment: test_linux
            command: "src/build.sh $TEST_INPUTS/child"
            dependencies:
              src: self_with_path
          way_2:
            environment: test_linux
            command: "src/build.sh $TEST_INPUTS/child"
            dependencies:
              src: self_without_path/source/dir1/dir2
    """), "testDefinitions.yml")
    assert d["builds"]["way_1"]["dependencies"]["src"] == d["builds"]["way_2"]["dependencies"]["src"] == {
        "kind": "source", "repo": "HEAD", "path": "dir1/dir2"}


def test_repository_names_may_hold_slashes_and_pins_paths(sc):
    lib = sc.add_commit("org/lib/v2", "looper_version: 5\n", {"pkg/a.txt": "a"})
    d = resolve_text(dedent(f"""
        looper_version: 5
        repos:
          lib: org/lib/v2
          pkg: {{reference: "org/lib/{lib}", path: pkg}}
        environments: {{e: {{platform: linux, image: {{dockerfile_contents: hi}}}}}}
        tests:
          t/e: {{command: x, dependencies: {{a: lib/source/pkg, b: pkg}}}}
    """), "testDefinitions.yml", repositories=sc.lookup())
    deps = d["tests"]["t/e"]["dependencies"]
    assert deps["a"] == {"kind": "source", "repo": "lib", "path": "pkg"}
    assert deps["b"] == {"kind": "source", "repo": "pkg", "path": "pkg"}
    assert d["repos"]["lib"]["repository"] == "org/lib" and d["repos"]["pkg"]["path"] == "pkg"


def test_a_pinned_commit_whose_definitions_do_not_resolve_names_the_pin(sc):
    """test_manager_include_semantics.py::test_bad_include_preserves_pins: a bad pinned file is an
    error of this commit, naming the pin (the commit stays untestable until the pin moves)."""
    sc.add_commit("lib/c0", "looper_version: 5\nenvironments: {e: {platform: not_valid, image: {dockerfile_contents: hi}}}\n")
    sc.add_commit("app/c0", "looper_version: 5\nrepos: {r: {reference: lib/c0, branch: master, auto: true}}\n"
                            "environments: {e: {base: r/e}}\n")
    with pytest.raises(DefinitionsError) as info:
        sc.resolve("app/c0")
    assert "repo pin 'r' (lib/c0): the definitions of lib at" in info.value.message
    assert "platform 'not_valid' is not one of: linux, windows" in info.value.message


def test_includes_cant_redefine_tests():
    """test_manager_include_semantics.py::test_includes_cant_redefine_tests."""
    files = {name: f"looper_version: 5\nenvironments:\n  {env}: {{platform: linux, image: {{dockerfile_contents: hi}}}}\n"
                   f"tests:\n  t: {{environment: {env}, command: './script.py 1'}}\n"
             for name, env in (("envdef.yml", "e2"), ("envdef2.yml", "e1"))}
    err = _error("looper_version: 5\nincludes:\n  - ./envdef.yml\n  - ./envdef2.yml\n", files)
    assert "tests entry 't' is defined both" in err.message


def test_includes_of_pinned_files_must_exist(sc):
    sc.add_commit("lib/c0", "looper_version: 5\n")
    sc.add_commit("app/c0", "looper_version: 5\nrepos: {r: lib/c0}\nincludes: [r/missing.yml]\n")
    with pytest.raises(DefinitionsError) as info:
        sc.resolve("app/c0")
    assert info.value.key_path == "includes.0"
    assert "included file 'r/missing.yml': repository 'lib': missing.yml does not exist at commit" in info.value.message


@pytest.mark.parametrize("branch", ["master", "dev"])
@pytest.mark.parametrize("name, builds", [
    ("repo4", ["build/windows_bad", "build/windows_good"]),
    ("repo5", []), ("repo5_nopin", []), ("repo6", []), ("repo6_nopin", []), ("repo6_twopins", []),
    ("repo6_headpin", []),
])
def test_test_yaml_files_made_of_pins_and_windows_images(sc, branch, name, builds):
    """The rest of TestYamlFiles: pins nothing uses need no lookup (repo6 even pins itself, and
    repo6_headpin and _twopins pin commits that do not exist yet, for the branch-pinning tests)."""
    sc.add_commit(f"{name}/c0", fixture(branch, "TestYamlFiles", f"{name}.yml"))
    d = sc.resolve(f"{name}/c0")
    assert sorted(d["builds"]) == builds
    if name == "repo4":
        assert d["builds"]["build/windows_bad"]["image"] == {"base_ami": "not_an_ami"}
        assert d["builds"]["build/windows_good"]["platform"] == "windows"
    else:
        assert d["repos"]["child"]["auto"] is ("nopin" not in name)
    if name == "repo6_twopins":  # master's version pins `prioritize: true` on one of them
        assert d["repos"]["child2"]["prioritize"] is (branch == "master")
        assert d["repos"]["child2"]["branch"] == "__branch2__"


def test_import_mistakes_name_the_pin(sc):
    _test_yaml_files(sc, only={"repo0", "repo1", "repo2"})
    lookup = sc.lookup()
    header = "looper_version: 5\nrepos:\n  r2: repo2/c0\n"
    cases = [
        ("  x: {import: nowhere/child}\n", "'nowhere' is not a pin of this file"),
        ("  x: {import: r2/ghost}\n", f"repo2 at {sc.shas['repo2/c0'][:12]} has no pin 'ghost' (its pins: child, "
                                      "repo0c0, repo0c1)"),
        ("  x: {import: y/a}\n  y: {import: x/b}\n", "imports form a cycle: x -> y -> x"),
    ]
    for extra, words in cases:
        text = header + extra + "environments: {e: {base: x/linux}}\n"
        with pytest.raises(DefinitionsError) as info:
            resolve_text(text, "testDefinitions.yml", repositories=lookup)
        assert words in info.value.message, info.value.message
