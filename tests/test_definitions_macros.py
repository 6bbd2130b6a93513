"""Every macro of the pre-processor: define/in, foreach/repeat, squash/over, case/in, merge."""

from definitions_helpers import resolve, resolve_error


def test_define_in_substitutes_keys_and_values():
    d = resolve("""
        tests:
          define: {PY: py311, SUITE: unit}
          in:
            ${SUITE}/${PY}/linux: {command: "run ${PY}"}
    """)
    assert list(d["tests"]) == ["unit/py311/linux"]
    assert d["tests"]["unit/py311/linux"]["stages"][0]["command"] == "run py311"


def test_whole_file_wrapped_in_define():
    d = resolve("""
        define: {V: 5}
        in:
          looper_version: ${V}
          environments:
            linux: {platform: linux, image: {name: "debian:12"}}
          tests:
            t/linux: {command: "echo ${V}"}
    """, header=False)
    assert d["tests"]["t/linux"]["stages"][0]["command"] == "echo 5"


def test_non_string_scalars_become_strings():
    d = resolve("""
        tests:
          define: {N: 10, FLAG: true, R: 1.5}
          in:
            t/linux: {command: "echo ${N} ${FLAG} ${R}"}
    """)
    assert d["tests"]["t/linux"]["stages"][0]["command"] == "echo 10 true 1.5"


def test_list_variable_substitutes_as_value_when_alone():
    d = resolve("""
        tests:
          define: {PYS: [py310, py311]}
          in:
            foreach: {py: "${PYS}"}
            repeat:
              t/${py}/linux: {command: "x"}
    """)
    assert list(d["tests"]) == ["t/py310/linux", "t/py311/linux"]


def test_foreach_list_of_dicts_merges_dict_results():
    d = resolve("""
        tests:
          foreach: [{n: a}, [{n: b}, [{n: c}]]]
          repeat:
            t/${n}/linux: {command: "echo ${n}"}
    """)
    assert list(d["tests"]) == ["t/a/linux", "t/b/linux", "t/c/linux"]


def test_foreach_cross_product_keeps_key_order():
    d = resolve("""
        tests:
          foreach: {os: [linux], py: [p1, p2], opt: [O0, O2]}
          repeat:
            t/${py}/${opt}/${os}: {command: "x"}
    """)
    assert list(d["tests"]) == ["t/p1/O0/linux", "t/p1/O2/linux", "t/p2/O0/linux", "t/p2/O2/linux"]


def test_foreach_list_result_concatenates():
    d = resolve("""
        looper_version: 5
        environments:
          linux: {platform: linux, image: {name: "debian:12"}}
          mix_a: {base: linux, variables: {A: "1"}}
          mix_b: {base: linux, variables: {B: "2"}}
        tests:
          t/linux:
            command: "x"
            mixins:
              foreach: [{m: a}, {m: b}]
              repeat: ["mix_${m}"]
    """, header=False)
    assert d["tests"]["t/linux"]["variables"] == {"A": "1", "B": "2"}


def test_foreach_producing_same_key_twice_is_an_error():
    err = resolve_error("""
        tests:
          foreach: [{n: a}, {n: a}]
          repeat:
            t/${n}/linux: {command: "x"}
    """)
    assert "produced twice" in err.message and "t/a/linux" in err.message
    assert err.line is not None


def test_squash_over_merges_into_each_item():
    d = resolve("""
        tests:
          foreach:
            squash: {suffix: linux}
            over: [{name: one}, [{name: two, suffix: ignored}]]
          repeat:
            ${name}/${suffix}: {command: "run ${name}"}
    """)
    assert sorted(d["tests"]) == ["one/linux", "two/linux"]


def test_case_in_picks_entry():
    d = resolve("""
        tests:
          define: {MODE: fast}
          in:
            t/linux:
              command:
                case: ${MODE}
                in: {fast: "run -q", slow: "run --all"}
    """)
    assert d["tests"]["t/linux"]["stages"][0]["command"] == "run -q"


def test_case_unknown_entry_is_an_error():
    err = resolve_error("""
        tests:
          t/linux:
            command: {case: medium, in: {fast: "a", slow: "b"}}
    """)
    assert "medium" in err.message and "fast, slow" in err.message
    assert err.key_path == "tests.t/linux.command.case"


def test_merge_lists_and_dicts():
    d = resolve("""
        tests:
          merge:
            - {a/linux: {command: "a"}}
            - {b/linux: {command: "b", variables: {merge: [{X: "1"}, {Y: "2"}]}}}
    """)
    assert sorted(d["tests"]) == ["a/linux", "b/linux"]
    assert d["tests"]["b/linux"]["variables"] == {"X": "1", "Y": "2"}
    d = resolve("""
        tests:
          t/linux:
            command: x
            mixins: {merge: [[]]}
    """)
    assert d["tests"]["t/linux"]["environment"] == "linux"


def test_lists_flatten_under_builds_and_tests():
    d = resolve("""
        builds:
          - b1/linux: {command: "1"}
          - [{b2/linux: {command: "2"}}, [{b3/linux: {command: "3"}}]]
        tests:
          - t1/linux: {command: "1"}
    """)
    assert list(d["builds"]) == ["b1/linux", "b2/linux", "b3/linux"]


def test_nested_macro_variables_lookup():
    d = resolve("""
        tests:
          define: {A: fo, B: o, foo: bar}
          in:
            t/linux: {command: "echo ${${A}${B}}"}
    """)
    assert d["tests"]["t/linux"]["stages"][0]["command"] == "echo bar"


def test_cross_product_explosion_is_refused():
    err = resolve_error("""
        tests:
          define:
            L: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
          in:
            foreach: {a: "${L}", b: "${L}", c: "${L}", d: "${L}", e: "${L}", f: "${L}"}
            repeat:
              t/${a}${b}${c}${d}${e}${f}/linux: {command: "x"}
    """)
    assert "refusing" in err.message


def test_empty_foreach_gives_an_empty_value_of_the_templates_kind():
    d = resolve("""
        tests:
          t/linux: {command: x}
        triggers:
          foreach: []
          repeat: [{name: never, paths: ["HEAD/*"], test_sets: [all]}]
        builds:
          foreach: []
          repeat:
            b/${n}/linux: {command: y}
    """)
    assert d["triggers"] == [] and d["builds"] == {}
