"""Environments, variables, tasks, dependencies, test sets, triggers, repos and includes."""

import json

from definitions_helpers import resolve, resolve_error

DIAMOND = """
looper_version: 5
environments:
  env_root:
    platform: linux
    image: {dockerfile: docker/Dockerfile}
    setup_script_contents: "echo root"
    variables: {WHO: root, ROOT_ONLY: r, OVERRIDE: root, OVERRIDE_OUTPUT: "${OVERRIDE}"}
  env_dep:
    base: env_root
    setup_script_contents: "echo dep"
    variables: {WHO: dep}
  child1: {base: env_dep, setup_script_contents: "echo c1", variables: {WHO: child1, C1: "1"}}
  child2: {base: env_dep, setup_script_contents: "echo c2", variables: {WHO: child2, C2: "2"}}
  diamond: {base: [child1, child2], variables: {OVERRIDE: diamond}}
"""


def test_diamond_inheritance_order_and_precedence():
    d = resolve(DIAMOND, header=False)
    env = d["environments"]["diamond"]
    assert env["inheritance"] == ["child2", "child1", "env_dep", "env_root"]
    assert d["environments"]["env_root"]["inheritance"] == []
    assert env["variables"]["WHO"] == "child2"  # a later base wins over an earlier one
    assert env["variables"]["C1"] == "1" and env["variables"]["ROOT_ONLY"] == "r"
    assert env["variables"]["OVERRIDE_OUTPUT"] == "diamond"  # late binding
    assert env["platform"] == "linux" and env["image"] == {"dockerfile": "docker/Dockerfile"}
    assert env["setup_script"] == "echo root\necho dep\necho c1\necho c2"  # root down


def test_string_base_means_one_item_list():
    d = resolve(
        "looper_version: 5\nenvironments:\n  linux: {platform: linux, image: {name: x}, variables: {A: a}}\n"
        "  derived: {base: linux, variables: {B: b}}\n", header=False)
    assert d["environments"]["derived"]["variables"] == {"A": "a", "B": "b"}
    assert d["environments"]["derived"]["inheritance"] == ["linux"]


def test_task_variables_win_and_resolve_late():
    d = resolve(DIAMOND + """
tests:
  t/diamond:
    command: "echo ${OVERRIDE_OUTPUT} ${UNKNOWN} $HOME"
    variables: {OVERRIDE: task, EXTRA: "${WHO}-x"}
""", header=False)
    task = d["tests"]["t/diamond"]
    assert task["variables"]["OVERRIDE_OUTPUT"] == "task"
    assert task["variables"]["EXTRA"] == "child2-x"
    assert task["stages"][0]["command"] == "echo task ${UNKNOWN} $HOME"  # unknown stays as written
    assert task["environment"] == "diamond"
    assert task["setup_script"] == "echo root\necho dep\necho c1\necho c2"


def test_nested_variable_lookup_and_repeated_resolution():
    d = resolve("""
        tests:
          t/linux:
            command: "${${KIND}_${ARCH}}"
            variables: {KIND: cmd, ARCH: x86, cmd_x86: "run-${ARCH}", CHAIN1: "${CHAIN2}", CHAIN2: "${CHAIN3}", CHAIN3: end}
    """)
    task = d["tests"]["t/linux"]
    assert task["stages"][0]["command"] == "run-x86"
    assert task["variables"]["CHAIN1"] == "end"


def test_variable_cycle_names_members():
    err = resolve_error("""
        tests:
          t/linux:
            command: "x"
            variables: {A: "${B}", B: "${C}", C: "${A}"}
    """)
    assert "cycle" in err.message and "A -> B -> C -> A" in err.message
    assert err.key_path == "tests.t/linux.variables"
    assert err.line is not None


def test_environment_variable_cycle_is_an_error():
    err = resolve_error(
        "looper_version: 5\nenvironments:\n  linux: {platform: linux, image: {name: x}, variables: {A: 'x${A}'}}\n",
        header=False)
    assert "cycle" in err.message and "A -> A" in err.message


def test_test_defaults_flow_into_tasks():
    d = resolve("""
        looper_version: 5
        environments:
          base_env:
            platform: linux
            image: {name: x}
            test_timeout: 100
            test_min_cores: 2
            test_min_ram_gb: 1.5
            test_configuration: cfg
            test_stages: [{command: "default stage"}]
          linux: {base: base_env, test_timeout: 200, test_max_retries: 2, test_retry_wait_seconds: 5}
        builds:
          b/linux: {command: "make", timeout: 50}
        tests:
          t/linux: {}
    """, header=False)
    test = d["tests"]["t/linux"]
    assert test["timeout_seconds"] == 200 and test["min_cores"] == 2 and test["min_ram_gb"] == 1.5
    assert test["configuration"] == "cfg" and test["max_retries"] == 2 and test["retry_wait_seconds"] == 5
    assert [s["command"] for s in test["stages"]] == ["default stage"]
    assert d["builds"]["b/linux"]["timeout_seconds"] == 50


def test_defaults_when_nothing_given():
    task = resolve("tests:\n  t/linux: {command: x}\n")["tests"]["t/linux"]
    assert task["timeout_seconds"] == 3600 and task["runs"] == 1 and task["min_cores"] == 0
    # As the original: the project is the name's first segment, the configuration the environment.
    assert task["max_retries"] == 0 and task["project"] == "t" and task["configuration"] == "linux"
    assert task["disabled"] is False
    assert task["stages"] == [{  # `command` is the last stage, whatever the others' order
        "command": "x", "cleanup": "", "always_run": False, "order": 1_000_000_000, "list_tests_command": "",
        "run_tests_command": "",
        "artifacts": [{"name": "", "directory": "", "include_patterns": [], "exclude_patterns": [], "format": "Tar"}],
    }]


def test_contract_keys():
    d = resolve("tests:\n  t/linux: {command: x}\nbuilds:\n  b/linux: {command: y}\n")
    assert set(d) >= {"looper_version", "environments", "builds", "tests", "deployments", "test_sets", "triggers"}
    assert set(d["environments"]["linux"]) == {"platform", "image", "variables", "inheritance", "setup_script"}
    assert set(d["tests"]["t/linux"]) >= {
        "name", "kind", "environment", "platform", "image", "variables", "dependencies", "stages",
        "timeout_seconds", "min_cores", "max_cores", "min_ram_gb", "min_disk_gb", "max_retries",
        "retry_wait_seconds", "runs", "project", "configuration", "hash"}
    json.dumps(d)  # plain data throughout


def test_mixins_merge_on_top_in_order():
    d = resolve("""
        looper_version: 5
        environments:
          linux: {platform: linux, image: {name: x}, variables: {A: base, B: base, C: base}}
          m1: {base: linux, variables: {A: m1, B: m1}, setup_script_contents: "s1"}
          m2: {base: linux, variables: {A: m2}, setup_script_contents: "s2"}
        tests:
          t/linux: {command: x, mixins: [m1, m2]}
    """, header=False)
    task = d["tests"]["t/linux"]
    assert task["variables"] == {"A": "m2", "B": "m1", "C": "base"}
    # The root's setup (none here), a newline, then the others': the original's own formula.
    assert task["setup_script"] == "\ns1\ns2"
    assert task["environment"] == "linux"


def test_stages_ordered_with_artifacts_and_cleanup():
    d = resolve("""
        builds:
          b/linux:
            variables: {OUT: dist}
            stages:
              - {command: "second", order: 2, artifacts: [{name: wheel, directory: "${OUT}", include_patterns: ["*.whl"], format: Zip}]}
              - {command: "first", order: 1, cleanup: "rm -rf tmp", always_run: true}
              - {command: "also second", order: 2}
        tests:
          t/linux:
            command: "pytest"
            cleanup: "echo bye"
          listed/linux:
            stages: [{list_tests_command: "list", run_tests_command: "run"}]
    """)
    stages = d["builds"]["b/linux"]["stages"]
    assert [s["command"] for s in stages] == ["first", "second", "also second"]
    assert stages[0]["cleanup"] == "rm -rf tmp" and stages[0]["always_run"] is True
    assert stages[1]["artifacts"] == [{"name": "wheel", "directory": "dist", "include_patterns": ["*.whl"],
                                       "exclude_patterns": [], "format": "Zip"}]
    assert d["tests"]["t/linux"]["stages"][0]["cleanup"] == "echo bye"
    listed = d["tests"]["listed/linux"]["stages"][0]
    assert listed["list_tests_command"] == "list" and listed["run_tests_command"] == "run"


def test_every_dependency_form():
    d = resolve("""
        repos:
          other: "otherrepo/0123456789abcdef0123456789abcdef01234567"
          follow: {reference: "lib/89abcdef0123456789abcdef0123456789abcdef", branch: main, auto: true}
        builds:
          build/linux: {command: "make"}
          staged/linux:
            stages: [{command: "make", artifacts: [{name: wheel}, {name: docs}]}]
        tests:
          t/linux:
            command: x
            variables: {SUB: lib}
            dependencies:
              src: HEAD
              sub: HEAD/source/${SUB}/python
              b1: build/linux
              b2: HEAD/build/linux
              art: staged/linux/wheel
              osrc: other
              osub: other/source/pkg
    """)
    deps = d["tests"]["t/linux"]["dependencies"]
    assert deps["src"] == {"kind": "source", "repo": "HEAD", "path": ""}
    assert deps["sub"] == {"kind": "source", "repo": "HEAD", "path": "lib/python"}
    assert deps["b1"] == {"kind": "build", "repo": "HEAD", "build": "build/linux", "artifact": ""}
    assert deps["b2"] == deps["b1"]
    assert deps["art"] == {"kind": "build", "repo": "HEAD", "build": "staged/linux", "artifact": "wheel"}
    assert deps["osrc"] == {"kind": "source", "repo": "other", "path": ""}
    assert deps["osub"] == {"kind": "source", "repo": "other", "path": "pkg"}
    assert d["repos"]["follow"] == {"reference": "lib/89abcdef0123456789abcdef0123456789abcdef",
                                    "repository": "lib", "commit": "89abcdef0123456789abcdef0123456789abcdef",
                                    "path": "", "branch": "main", "auto": True, "prioritize": False, "import": ""}


def test_environment_dependencies_are_inherited_and_overridable():
    d = resolve("""
        looper_version: 5
        environments:
          linux: {platform: linux, image: {name: x}, dependencies: {src: HEAD, tools: HEAD/source/tools}}
        tests:
          t/linux: {command: x, dependencies: {tools: HEAD/source/other}}
    """, header=False)
    deps = d["tests"]["t/linux"]["dependencies"]
    assert deps["src"]["path"] == "" and deps["tools"]["path"] == "other"


def test_test_sets_and_triggers():
    d = resolve("""
        tests:
          unit/a/linux: {command: x}
          unit/b/linux: {command: x}
          integration/linux: {command: x}
        test_sets:
          unit: ["unit/*"]
          mixed: ["integration/*", "unit/a/*"]
        triggers:
          - {name: python, paths: ["HEAD/src/*.py"], test_sets: [unit]}
          - {name: everything, paths: "HEAD/setup.cfg", test_sets: ["*"]}
    """)
    assert d["test_sets"]["all"] == ["unit/a/linux", "unit/b/linux", "integration/linux"]
    assert d["test_sets"]["unit"] == ["unit/a/linux", "unit/b/linux"]
    assert d["test_sets"]["mixed"] == ["integration/linux", "unit/a/linux"]
    assert d["triggers"][1] == {"name": "everything", "paths": ["HEAD/setup.cfg"], "test_sets": ["*"]}


def test_runs_extension_and_image_name():
    d = resolve("tests:\n  t/linux: {command: x, runs: 5}\n")
    assert d["tests"]["t/linux"]["runs"] == 5
    assert d["tests"]["t/linux"]["image"] == {"name": "debian:12"}


def test_windows_environment_with_ami():
    d = resolve("""
        looper_version: 5
        environments:
          win:
            platform: windows
            image: {base_ami: ami-0123, setup_script_contents: "Install-Thing"}
          win2: {base: win, setup_script_contents: "More-Setup"}
        tests:
          t/win2: {command: "dir"}
    """, header=False)
    task = d["tests"]["t/win2"]
    assert task["platform"] == "windows"
    assert task["setup_script"] == "Install-Thing\nMore-Setup"


def test_local_includes_with_variables():
    d = resolve("""
        includes:
          - ./ci/more.yml
          - {path: ./ci/param.yml, variables: {SUFFIX: fast}}
        tests:
          main/linux: {command: x}
    """, files={
        "ci/more.yml": """
            tests:
              more/linux: {command: "more"}
            includes: [./nested.yml]
        """,
        "ci/nested.yml": """
            builds:
              nested/linux: {command: "n"}
        """,
        "ci/param.yml": """
            tests:
              param/${SUFFIX}/linux: {command: "p"}
        """,
    })
    assert sorted(d["tests"]) == ["main/linux", "more/linux", "param/fast/linux"]
    assert list(d["builds"]) == ["nested/linux"]


def test_an_include_cycle_includes_each_file_once():
    """As the original (test_recursive_includes): a cycle is no error; each file comes in once."""
    d = resolve("includes: [./a.yml]\n", files={
        "a.yml": "includes: [./b.yml]\ntests: {a/linux: {command: a}}\n",
        "b.yml": "includes: [./a.yml, ./testlooper.yml]\ntests: {b/linux: {command: b}}\n",
        "testlooper.yml": "looper_version: 5\n"})
    assert sorted(d["tests"]) == ["a/linux", "b/linux"]


def test_include_of_missing_file_and_outside_repo():
    err = resolve_error("includes: [./missing.yml]\n", files={})
    assert "missing.yml" in err.message and err.key_path == "includes.0"
    err = resolve_error("includes: [../../etc/passwd]\n", files={})
    assert "outside the repository" in err.message


def test_include_from_a_pinned_repo_needs_a_lookup():
    err = resolve_error("""
        repos: {other: "other/0123456789abcdef0123456789abcdef01234567"}
        includes: [other/defs.yml]
    """, files={})
    assert "repo pin 'other' (other/0123456789abcdef0123456789abcdef01234567)" in err.message
    assert "no repository lookup" in err.message


def test_json_definitions_file():
    d = resolve('{"looper_version": 5, "environments": {"linux": {"platform": "linux", "image": {"name": "x"}}},'
                ' "tests": {"t/linux": {"command": "x"}}}', header=False, filename="testDefinitions.json")
    assert list(d["tests"]) == ["t/linux"]


def test_yaml_merge_keys_and_anchors_work():
    d = resolve("""
        tests:
          a/linux: &common {command: x, timeout: 10}
          b/linux: {<<: *common, timeout: 20}
    """)
    assert d["tests"]["b/linux"]["timeout_seconds"] == 20 and d["tests"]["b/linux"]["stages"][0]["command"] == "x"


def test_inheritance_order_is_c3_over_the_bases_reversed():
    """e4 derives from e2 and e3; e3 from e1 and e2. Both of e4's bases see X from e2, so e4
    must too: the order is Python's MRO for `class e4(e3, e2)`, not a simple walk."""
    d = resolve("""
        looper_version: 5
        environments:
          e0: {platform: linux, image: {name: x}, variables: {X: from-e0}}
          e1: {base: e0, variables: {X: from-e1}}
          e2: {base: e0, variables: {X: from-e2}}
          e3: {base: [e1, e2]}
          e4: {base: [e2, e3]}
    """, header=False)
    assert d["environments"]["e3"]["inheritance"] == ["e2", "e1", "e0"]
    assert d["environments"]["e4"]["inheritance"] == ["e3", "e2", "e1", "e0"]
    assert d["environments"]["e3"]["variables"]["X"] == "from-e2"
    assert d["environments"]["e4"]["variables"]["X"] == "from-e2"


def test_inheritance_c3_cannot_order_still_resolves():
    """Python refuses `class z(y, x)` with y(x): this format does not; shared ancestors go last."""
    d = resolve("""
        looper_version: 5
        environments:
          r: {platform: linux, image: {name: x}}
          x: {base: r}
          y: {base: x}
          z: {base: [y, x]}
    """, header=False)
    assert d["environments"]["z"]["inheritance"] == ["y", "x", "r"]  # y refines x, so it comes first
