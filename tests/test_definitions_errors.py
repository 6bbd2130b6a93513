"""Every mistake a user can make in a definitions file gets one clear, located message."""

import pytest

from definitions_helpers import HEADER, resolve, resolve_error
from testlooper.definitions import DefinitionsError, resolve_text
from testlooper.definitions.yamlload import MAX_FILE_BYTES


def test_invalid_yaml_names_line_and_column():
    err = resolve_error("looper_version: 5\ntests:\n  t/linux: {command: x\n", header=False)
    assert err.message.startswith("invalid YAML")
    assert err.filename == "testlooper.yml" and err.line == 4 and err.column is not None
    assert str(err).startswith("testlooper.yml:4:")


def test_alias_bomb_is_refused_quickly():
    bomb = ["looper_version: 5", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        bomb.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    err = resolve_error("\n".join(bomb) + "\n", header=False)
    assert "expands past" in err.message


def test_oversized_file_is_refused():
    text = "looper_version: 5\n# " + "x" * MAX_FILE_BYTES + "\n"
    with pytest.raises(DefinitionsError, match="larger than"):
        resolve_text(text, "testlooper.yml")


def test_empty_and_non_mapping_files():
    with pytest.raises(DefinitionsError, match="empty"):
        resolve_text("", "testlooper.yml")
    with pytest.raises(DefinitionsError, match="mapping of sections"):
        resolve_text("- a\n- b\n", "testlooper.yml")


def test_duplicate_yaml_key_keeps_the_last_value_with_a_warning():
    """PyYAML kept the last value, and the original's own fixtures rely on it."""
    from testlooper.definitions import DefinitionsWarning

    heard = []
    d = resolve_text(HEADER + "tests:\n  t/linux: {command: x}\n  t/linux: {command: y}\n", "testlooper.yml",
                     warn=heard.append)
    assert d["tests"]["t/linux"]["stages"][0]["command"] == "y"
    assert [str(w) for w in heard] == ["testlooper.yml:8:3: key 't/linux' is written twice in one mapping; "
                                       "the last value is kept"]
    with pytest.warns(DefinitionsWarning, match="key 't/linux' is written twice"):
        resolve_text(HEADER + "tests:\n  t/linux: {command: x}\n  t/linux: {command: y}\n", "testlooper.yml")


@pytest.mark.parametrize("text, key_path, words", [
    ("bogus: 1\n", "bogus", "unknown key 'bogus' in the top level"),
    ("tests:\n  t/linux: {command: x, comand: y}\n", "tests.t/linux.comand", "unknown key 'comand' in a test"),
    ("tests:\n  t/linux: {stages: [{command: x, artefacts: []}]}\n", "tests.t/linux.stages.0.artefacts", "in a stage"),
    ("tests:\n  t/linux: {stages: [{command: x, artifacts: [{nme: a}]}]}\n",
     "tests.t/linux.stages.0.artifacts.0.nme", "in an artifact"),
    ("triggers: [{name: a, paths: [x], test_sets: [all], when: now}]\n", "triggers.0.when", "in a trigger"),
    ("environments:\n  linux: {platform: linux, image: {name: x}, bases: [y]}\n", "environments.linux.bases",
     "in a root environment"),
    ("environments:\n  linux: {platform: linux, image: {name: x}}\n  d: {base: linux, platform: linux}\n",
     "environments.d.platform", "in a derived environment"),
    ("environments:\n  linux: {platform: linux, image: {nam: x}}\n", "environments.linux.image.nam", "in an image"),
    ("repos: {o: {reference: 'o/0123456789abcdef0123456789abcdef01234567', brnch: x}}\n", "repos.o.brnch",
     "in a repo pin"),
])
def test_unknown_keys_anywhere(text, key_path, words):
    header = not text.startswith("environments")
    if not header:
        text = "looper_version: 5\n" + text
    err = resolve_error(text, header=header)
    assert err.key_path == key_path
    assert words in err.message
    assert err.line is not None


@pytest.mark.parametrize("text, key_path, words", [
    ("tests:\n  t/linux: {command: [a, b]}\n", "tests.t/linux.command", "must be a string, not a list"),
    ("tests:\n  t/linux: {command: x, timeout: soon}\n", "tests.t/linux.timeout", "must be a whole number"),
    ("tests:\n  t/linux: {command: x, timeout: -5}\n", "tests.t/linux.timeout", "must not be negative"),
    ("tests:\n  t/linux: {command: x, min_ram_gb: true}\n", "tests.t/linux.min_ram_gb", "must be a number"),
    ("tests:\n  t/linux: {stages: [{command: x, always_run: maybe}]}\n", "tests.t/linux.stages.0.always_run",
     "true or false"),
    ("tests:\n  t/linux: {command: x, variables: {A: [1]}}\n", "tests.t/linux.variables.A", "must be a string"),
    ("tests:\n  t/linux: {command: x, runs: 0}\n", "tests.t/linux.runs", "from 1 to 100000"),
    ("builds:\n  b/linux: {command: x, runs: 2}\n", "builds.b/linux.runs", "tests only"),
    ("tests: [1, 2]\n", "tests.0", "must be a mapping"),
    ("tests:\n  t/linux: {stages: [{command: x, artifacts: [{format: Rar}]}]}\n",
     "tests.t/linux.stages.0.artifacts.0.format", "not one of: Tar, Zip, Files"),
    ("tests:\n  t/linux: {stages: [{command: x, artifacts: [{name: a}]}, {command: y, artifacts: [{name: a}]}]}\n",
     "tests.t/linux", "artifact 'a' is defined twice"),
])
def test_wrong_types(text, key_path, words):
    err = resolve_error(text)
    assert err.key_path == key_path
    assert words in err.message


@pytest.mark.parametrize("written, shown", [
    ("-3", "-3"), ("0", "0"), ("1.5", "the float 1.5"), ("true", "the boolean true"), ("100001", "100001"),
    ("'many'", "the string 'many'"), ("'${N}'", "the string '${N}'"),
])
def test_every_wrong_runs_gets_one_message_naming_the_type_and_the_bounds(written, shown):
    err = resolve_error(f"tests:\n  t/linux: {{command: x, runs: {written}}}\n")
    assert err.key_path == "tests.t/linux.runs"
    assert err.message == f"'runs' must be a whole number from 1 to 100000, not {shown}"


def test_runs_may_come_from_a_variable():
    resolved = resolve("tests:\n  t/linux: {command: x, variables: {N: '7'}, runs: '${N}'}\n")
    assert resolved["tests"]["t/linux"]["runs"] == 7


def test_a_timeout_of_0_means_not_set_as_in_the_original_and_shows_what_applies():
    """Old files write `timeout: 0` for "the default": the environment's test_timeout applies,
    else the default hour, and the resolved timeout says so. There is no "no timeout"."""
    inherited = resolve("looper_version: 5\nenvironments:\n  linux: {platform: linux, image: {name: x}, test_timeout: 90}\n"
                        "tests:\n  t/linux: {command: x, timeout: 0}\n", header=False)
    assert inherited["tests"]["t/linux"]["timeout_seconds"] == 90
    default = resolve("looper_version: 5\nenvironments:\n  zero: {platform: linux, image: {name: x}, test_timeout: 0}\n"
                      "tests:\n  t/zero: {command: x, timeout: 0}\n", header=False)
    assert default["tests"]["t/zero"]["timeout_seconds"] == 3600
    err = resolve_error("tests:\n  t/linux: {command: x, timeout: -5}\n")
    assert err.key_path == "tests.t/linux.timeout" and err.message == "'timeout' must not be negative"


def test_max_log_mb_defaults_to_1_gib_and_is_bounded():
    resolved = resolve("tests:\n  a/linux: {command: x}\n  b/linux: {command: x, max_log_mb: 5}\n")
    assert resolved["tests"]["a/linux"]["max_log_mb"] == 1024
    assert resolved["tests"]["b/linux"]["max_log_mb"] == 5
    err = resolve_error("tests:\n  t/linux: {command: x, max_log_mb: 0}\n")
    assert err.message == "'max_log_mb' must be a whole number from 1 to 1048576, not 0"


def test_looper_version_missing_or_unsupported():
    err = resolve_error("tests: {}\n", header=False)
    assert "'looper_version' is missing" in err.message
    err = resolve_error("looper_version: 6\n", header=False)
    assert err.message == "looper_version 6 is not supported (supported: 2, 3, 4, 5)"
    assert err.key_path == "looper_version" and err.line == 1


def test_undefined_environment_mixin_and_build():
    err = resolve_error("tests:\n  t/nowhere: {command: x}\n")
    assert "environment (the last segment of the name 't/nowhere') 'nowhere' is not defined" in err.message
    assert "environments: linux" in err.message
    err = resolve_error("tests:\n  t/linux: {command: x, environment: nope}\n")
    assert err.key_path == "tests.t/linux.environment" and "'nope' is not defined" in err.message
    err = resolve_error("tests:\n  t/linux: {command: x, mixins: [ghost]}\n")
    assert err.key_path == "tests.t/linux.mixins" and "mixin 'ghost'" in err.message
    err = resolve_error("looper_version: 5\nenvironments:\n  d: {base: ghost}\n", header=False)
    assert "base environment 'ghost' is not defined" in err.message
    err = resolve_error("tests:\n  unit/linux:\n    command: x\n    dependencies: {build: build/missing}\n")
    assert err.key_path == "tests.unit/linux.dependencies.build"
    assert "build 'build/missing', which is not defined" in err.message
    assert err.line == 9


def test_missing_artifact_of_a_build():
    err = resolve_error("""builds:
  b/linux: {stages: [{command: x, artifacts: [{name: wheel}]}]}
tests:
  t/linux: {command: x, dependencies: {w: b/linux/docs}}
""")
    assert "build 'b/linux' has no artifact 'docs' (its named artifacts: wheel)" in err.message


def test_environment_cycle_names_members():
    err = resolve_error("""looper_version: 5
environments:
  linux: {platform: linux, image: {name: x}}
  a: {base: [linux, b]}
  b: {base: c}
  c: {base: a}
""", header=False)
    assert "cycle" in err.message
    for member in ("a", "b", "c"):
        assert f"{member} ->" in err.message or f"-> {member}" in err.message


def test_build_cycle_names_members():
    err = resolve_error("""builds:
  one/linux: {command: x, dependencies: {d: two/linux}}
  two/linux: {command: x, dependencies: {d: three/linux}}
  three/linux: {command: x, dependencies: {d: one/linux}}
""")
    assert "builds depend on each other in a cycle" in err.message
    assert "one/linux -> two/linux -> three/linux -> one/linux" in err.message


def test_reserved_and_repo_names_as_task_prefix():
    for reserved in ("data", "source", "HEAD"):
        err = resolve_error(f"tests:\n  {reserved}/x/linux: {{command: x, environment: linux}}\n")
        assert f"reserved name {reserved!r}" in err.message
    err = resolve_error("repos: {lib: 'lib/0123456789abcdef0123456789abcdef01234567'}\n"
                        "builds:\n  lib/linux: {command: x}\n")
    assert "name of a repo under 'repos'" in err.message and err.key_path == "builds.lib/linux"
    err = resolve_error("repos: {HEAD: 'x/0123456789abcdef0123456789abcdef01234567'}\n")
    assert "reserved" in err.message


def test_dependency_first_segment_with_variable():
    err = resolve_error("tests:\n  t/linux: {command: x, variables: {R: HEAD}, dependencies: {src: '${R}/source'}}\n")
    assert "first segment may not use a variable" in err.message
    assert err.key_path == "tests.t/linux.dependencies.src"


def test_bad_repo_pins_and_includes():
    err = resolve_error("repos: {o: 'no-slash'}\n")
    assert "must be 'repository/<commit>'" in err.message and err.key_path == "repos.o"
    err = resolve_error("repos: {o: 'o/'}\n")
    assert "must be 'repository/<commit>'" in err.message
    err = resolve_error("includes: [ci/x.yml]\n", files={})
    assert "must start with './'" in err.message


def test_test_sets_and_triggers_mistakes():
    err = resolve_error("tests:\n  t/linux: {command: x}\ntest_sets: {unit: ['unit/*']}\n")
    assert "'unit/*' matches no test" in err.message
    err = resolve_error("tests:\n  t/linux: {command: x}\ntest_sets: {all: ['*']}\n")
    assert "built in" in err.message
    err = resolve_error("tests:\n  t/linux: {command: x}\ntriggers: [{name: a, paths: ['HEAD/*'], test_sets: [nope]}]\n")
    assert "'nope' matches no test set" in err.message


def test_platform_must_be_known_and_image_required():
    err = resolve_error("looper_version: 5\nenvironments:\n  mac: {platform: macos, image: {name: x}}\n", header=False)
    assert "platform 'macos' is not one of: linux, windows" in err.message
    err = resolve_error("looper_version: 5\nenvironments:\n  l: {platform: linux}\n", header=False)
    assert "needs an 'image'" in err.message
    err = resolve_error("looper_version: 5\nenvironments:\n  l: {platform: linux, image: {name: x, base_ami: y}}\n",
                        header=False)
    assert "exactly one of" in err.message


def test_error_string_format():
    err = DefinitionsError("boom", ("tests", "unit/linux", "dependencies", "build"), "f.yml", 3, 7)
    assert str(err) == "f.yml:3:7: tests.unit/linux.dependencies.build: boom"
    assert str(DefinitionsError("boom")) == "boom"


def test_a_name_used_by_a_build_and_a_test():
    err = resolve_error("builds:\n  x/linux: {command: a}\ntests:\n  x/linux: {command: b}\n")
    assert "'x/linux' names both a build and a test" in err.message


def test_deep_nesting_is_refused_with_one_line():
    err = resolve_error("looper_version: 5\nx: " + "[" * 500 + "]" * 500 + "\n", header=False)
    assert "nests deeper than 100 levels" in err.message


def test_too_many_tasks_from_a_small_file_are_refused():
    """Three nested foreach of 40 items: 64,000 tests from a few lines."""
    items = "[" + ", ".join(f"{{i: {i}}}" for i in range(40)) + "]"
    err = resolve_error(f"""tests:
  foreach: {items.replace('i:', 'a:')}
  repeat:
    foreach: {items.replace('i:', 'b:')}
    repeat:
      foreach: {items.replace('i:', 'c:')}
      repeat:
        t/${{a}}/${{b}}/${{c}}/linux: {{command: x}}
""")
    assert "refusing" in err.message or "at most 50,000" in err.message


def test_shared_static_subtrees_count_toward_the_expansion_cap():
    from testlooper.definitions import macros

    big = "[" + ", ".join(["x"] * 2000) + "]"
    items = "[" + ", ".join(f"{{i: {i}}}" for i in range(600)) + "]"
    err = resolve_error(f"""tests:
  foreach: {items}
  repeat:
    t/${{i}}/linux: {{command: x, variables: {{V: '1'}}, stages_unused: {big}}}
""")
    assert f"{macros.MAX_PRODUCED_VALUES:,} values" in err.message


def test_deep_nesting_through_aliases_is_refused():
    """An anchor defined shallow and used deep nests as deep as where it is used."""
    lines = ["looper_version: 5", "a0: &a0 [[[[[x]]]]]"]
    for i in range(1, 30):
        lines.append(f"a{i}: &a{i} [[[[[*a{i - 1}]]]]]")
    err = resolve_error("\n".join(lines) + "\n", header=False)
    assert "nests deeper than 100 levels" in err.message
