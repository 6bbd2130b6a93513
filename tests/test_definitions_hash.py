"""Content hashes: equal for identical resolved tasks, different whenever what runs changes."""

from definitions_helpers import resolve

BASE = """
builds:
  build/linux: {command: "make ${FLAGS}", variables: {FLAGS: -O2}}
tests:
  unit/linux: {command: "pytest", dependencies: {b: build/linux, src: HEAD}, runs: 2, project: p}
  other/linux: {command: "true"}
"""


def hashes(text: str) -> dict:
    d = resolve(text)
    return {name: task["hash"] for section in ("builds", "tests") for name, task in d[section].items()}


def test_hash_is_stable_across_runs_and_formatting():
    first = hashes(BASE)
    assert first == hashes(BASE)
    reformatted = BASE.replace('{command: "true"}', '\n    command: "true"')
    assert hashes(reformatted) == first


def test_labels_and_run_count_do_not_change_the_hash():
    changed = BASE.replace("runs: 2, project: p", "runs: 7, project: q")
    assert hashes(changed) == hashes(BASE)


def test_changes_to_what_runs_change_the_hash():
    base = hashes(BASE)
    for old, new in [
        ('"pytest"', '"pytest -x"'),                       # command
        ("src: HEAD}", "src: HEAD/source/lib}"),            # input
        ("runs: 2", "runs: 2, timeout: 60"),                # timeout
        ("runs: 2", "runs: 2, variables: {X: y}"),          # variables
    ]:
        changed = hashes(BASE.replace(old, new))
        assert changed["unit/linux"] != base["unit/linux"], (old, new)
        assert changed["other/linux"] == base["other/linux"]


def test_a_changed_build_changes_its_consumers():
    changed = hashes(BASE.replace("-O2", "-O3"))
    base = hashes(BASE)
    assert changed["build/linux"] != base["build/linux"]
    assert changed["unit/linux"] != base["unit/linux"]  # consumes the build
    assert changed["other/linux"] == base["other/linux"]


def test_environment_changes_change_the_hash():
    from definitions_helpers import HEADER
    from testlooper.definitions import resolve_text

    def other_hash(header: str) -> str:
        return resolve_text(header + BASE, "testlooper.yml")["tests"]["other/linux"]["hash"]

    base = other_hash(HEADER)
    assert other_hash(HEADER.replace("debian:12", "debian:13")) != base  # image
    assert other_hash(HEADER + "    variables: {E: '1'}\n") != base     # environment variables
    assert other_hash(HEADER + "    setup_script_contents: 'apt-get install x'\n") != base
    assert other_hash(HEADER + "    test_timeout: 10\n") != base
