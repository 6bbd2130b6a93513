"""Parsing individual test results: testSummary.json in both shapes, and JUnit XML."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from testlooper.worker.results import collect_results, parse_junit, parse_test_summary


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def case(name, success, duration=None):
    return {"name": name, "success": success, "duration_seconds": duration}


# -- testSummary.json ----------------------------------------------------------------------------


def test_summary_dict_shape(tmp_path):
    path = write(tmp_path / "testSummary.json", json.dumps({
        "test_a": True, "test_b": False, "test_c": {"success": False, "logs": ["c.log"]},
        "test_d": {"success": True, "logs": [], "elapsed": 2.5}}))

    assert parse_test_summary(path) == (
        [case("test_a", True), case("test_b", False), case("test_c", False), case("test_d", True, 2.5)], [])


def test_summary_list_shape(tmp_path):
    path = write(tmp_path / "testSummary.json", json.dumps([
        {"testName": "suite::one", "success": True, "logs": [], "elapsed": 0.25, "startTimestamp": 1700000000},
        {"testName": "suite::two", "success": False, "logs": ["two.log"], "elapsed": None},
        {"testName": "suite::three", "success": True}]))

    assert parse_test_summary(path) == (
        [case("suite::one", True, 0.25), case("suite::two", False), case("suite::three", True)], [])


def test_summary_with_a_byte_order_mark_and_unicode_names(tmp_path):
    path = tmp_path / "testSummary.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"тест/ü": True}, ensure_ascii=False).encode())

    assert parse_test_summary(path) == ([case("тест/ü", True)], [])


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read test results"),
    ("42", "expected a JSON object or list"),
    ("", "cannot read test results"),
])
def test_malformed_summary_is_reported_not_raised(tmp_path, text, message):
    path = write(tmp_path / "testSummary.json", text)

    cases, errors = parse_test_summary(path, label="testSummary.json")

    assert cases == []
    assert len(errors) == 1 and errors[0].startswith("testSummary.json: ") and message in errors[0]


def test_bad_entries_are_reported_and_good_ones_kept(tmp_path):
    path = write(tmp_path / "testSummary.json", json.dumps([
        {"testName": "good", "success": True}, {"testName": "no-verdict"}, "a string",
        {"success": True}, {"testName": "numeric", "success": 1}]))

    cases, errors = parse_test_summary(path, label="s.json")

    assert cases == [case("good", True)]
    assert errors == ['s.json: entry 1 (\'no-verdict\'): "success" must be true or false',
                      's.json: entry 2: expected an object, got "a string"',
                      's.json: entry 3: "testName" must be a non-empty string',
                      's.json: entry 4 (\'numeric\'): "success" must be true or false']


def test_an_empty_case_name_is_refused_in_every_shape(tmp_path):
    """The history keeps a task's own result as its case "": a case named so would replace it."""
    dict_shape = write(tmp_path / "d" / "testSummary.json", json.dumps({"": False, "real": True}))
    list_shape = write(tmp_path / "l" / "testSummary.json", json.dumps([{"testName": "", "success": False}]))
    junit = write(tmp_path / "j" / "junit.xml", '<testsuite><testcase classname="" name=""><failure/></testcase>'
                                                '<testcase name="real"/></testsuite>')

    assert parse_test_summary(dict_shape, label="s.json") == (
        [case("real", True)], ["s.json: a test has an empty name (its value: false)"])
    assert parse_test_summary(list_shape, label="s.json") == ([], ['s.json: entry 0: "testName" must be a non-empty string'])
    assert parse_junit(junit, label="j.xml") == ([case("real", True)], ["j.xml: a <testcase> has no name attribute (case 1)"])


def test_thousands_of_bad_entries_give_a_bounded_report(tmp_path):
    path = write(tmp_path / "testSummary.json", json.dumps({f"t{index}": "yes" for index in range(5000)}))

    cases, errors = parse_test_summary(path, label="s.json")

    assert cases == [] and len(errors) == 21
    assert errors[-1] == "s.json: ... and 4980 more problems"


# -- JUnit ---------------------------------------------------------------------------------------


PYTEST_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="1.2">
  <testcase classname="tests.test_x" name="test_pass" time="0.010"><system-out>ok</system-out></testcase>
  <testcase classname="tests.test_x" name="test_fail" time="0.020">
    <failure message="assert 1 == 2">trace</failure>
  </testcase>
  <testcase classname="tests.test_x" name="test_error" time="bogus"><error message="fixture broke"/></testcase>
  <testcase classname="tests.test_x" name="test_skip" time="0"><skipped message="not today"/></testcase>
  <testcase name="bare_name"><properties><property name="failure" value="not a failure"/></properties></testcase>
</testsuite></testsuites>
"""


def test_junit_outcomes_names_and_durations(tmp_path):
    assert parse_junit(write(tmp_path / "junit.xml", PYTEST_JUNIT)) == ([
        case("tests.test_x.test_pass", True, 0.01),
        case("tests.test_x.test_fail", False, 0.02),
        case("tests.test_x.test_error", False, None),
        case("bare_name", True),
    ], [])


# What pytest writes for a test that fails and whose fixture then errors in teardown.
PYTEST_FAIL_THEN_TEARDOWN_ERROR = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" tests="2">
  <testcase classname="tests.test_y" name="test_both" time="0.5"><failure message="assert 0">x</failure></testcase>
  <testcase classname="tests.test_y" name="test_both" time="0.25"><error message="teardown">y</error></testcase>
  <testcase classname="tests.test_y" name="test_teardown_only" time="0.5"/>
  <testcase classname="tests.test_y" name="test_teardown_only" time="0.1"><error message="teardown"/></testcase>
  <testcase classname="tests.test_y" name="test_fine" time="0.1"/>
</testsuite></testsuites>
"""


def test_a_case_reported_twice_is_one_case_failed_if_either_entry_failed(tmp_path):
    write(tmp_path / "out" / "junit.xml", PYTEST_FAIL_THEN_TEARDOWN_ERROR)
    write(tmp_path / "out" / "testSummary.json", json.dumps({"tests.test_y.test_fine": False, "other": True}))

    cases, errors = collect_results(tmp_path / "out")

    assert errors == []
    assert cases == [case("tests.test_y.test_fine", False, 0.1), case("other", True),
                     case("tests.test_y.test_both", False, 0.75), case("tests.test_y.test_teardown_only", False, 0.6)]


def test_junit_with_a_bare_testsuite_root_and_a_namespace(tmp_path):
    text = ('<testsuite xmlns="urn:x-junit"><testcase classname="Go" name="TestA" time="1"/>'
            '<testcase classname="Go" name="TestB"><failure/></testcase></testsuite>')

    assert parse_junit(write(tmp_path / "go.xml", text)) == (
        [case("Go.TestA", True, 1.0), case("Go.TestB", False)], [])


def test_other_xml_files_are_not_results(tmp_path):
    coverage = '<?xml version="1.0"?>\n<!DOCTYPE coverage SYSTEM "http://cobertura/coverage-04.dtd">\n<coverage/>'

    assert parse_junit(write(tmp_path / "pom.xml", "<project><testcase name='no'/></project>")) == ([], [])
    assert parse_junit(write(tmp_path / "coverage.xml", coverage)) == ([], [])


def test_truncated_junit_keeps_the_cases_read_and_reports_the_error(tmp_path):
    path = write(tmp_path / "cut.xml", '<testsuite><testcase name="done"/><testcase name="cut">')

    cases, errors = parse_junit(path, label="cut.xml")

    assert cases == [case("done", True)]
    assert len(errors) == 1 and errors[0].startswith("cut.xml: not well-formed XML")


def test_an_entity_expansion_bomb_is_refused_quickly(tmp_path):
    levels = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">' for level in range(1, 10)]
    bomb = (f'<?xml version="1.0"?><!DOCTYPE testsuite [{"".join(levels)}]>'
            '<testsuite><testcase name="&lol9;"/></testsuite>')
    started = time.monotonic()

    cases, errors = parse_junit(write(tmp_path / "bomb.xml", bomb), label="bomb.xml")

    assert time.monotonic() - started < 1
    assert cases == []
    assert errors == ["bomb.xml: refused: the file declares a DOCTYPE (entity declarations are not allowed)"]


def test_external_entities_are_refused(tmp_path):
    text = ('<?xml version="1.0"?><!DOCTYPE testsuites [<!ENTITY secret SYSTEM "file:///etc/passwd">]>'
            '<testsuites><testcase name="&secret;"/></testsuites>')

    cases, errors = parse_junit(write(tmp_path / "xxe.xml", text))

    assert cases == [] and "DOCTYPE" in errors[0]


def test_100000_cases_parse_fast_in_flat_memory(tmp_path):
    path = tmp_path / "big.xml"
    with open(path, "w") as out:
        out.write('<?xml version="1.0"?>\n<testsuites><testsuite name="big">\n')
        for index in range(100_000):
            failing = index % 10 == 0
            verdict = '<failure message="x">trace\nmore</failure>' if failing else "<system-out>ok</system-out>"
            out.write(f'<testcase classname="pkg.mod" name="test_{index}" time="0.001">{verdict}</testcase>\n')
        out.write("</testsuite></testsuites>\n")
    tracemalloc.start()
    started = time.monotonic()

    cases, errors = parse_junit(path)

    elapsed = time.monotonic() - started
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cases) == 100_000 and errors == []
    assert sum(not parsed["success"] for parsed in cases) == 10_000
    assert elapsed < 5
    # Beyond the cases it returns, parsing a 10 MB file costs next to nothing.
    assert peak - retained < 2 * 1024 * 1024


# -- the whole output directory ------------------------------------------------------------------


def test_collect_results_reads_the_summary_and_every_junit_file(tmp_path):
    write(tmp_path / "testSummary.json", json.dumps({"from_summary": True}))
    write(tmp_path / "reports" / "unit" / "junit.XML", '<testsuite><testcase name="deep"/></testsuite>')
    write(tmp_path / "a.xml", '<testsuites><testcase name="shallow"><error/></testcase></testsuites>')
    write(tmp_path / "broken.xml", "<testsuite>")
    write(tmp_path / "notes.txt", "not a result")

    cases, errors = collect_results(tmp_path)

    assert cases == [case("from_summary", True), case("shallow", False), case("deep", True)]
    assert len(errors) == 1 and errors[0].startswith("broken.xml: not well-formed XML")


def test_collect_results_of_a_missing_directory_is_empty(tmp_path):
    assert collect_results(tmp_path / "absent") == ([], [])


def test_the_parsers_live_in_the_agent_module_and_results_re_exports_them():
    from testlooper.worker import agent, results

    assert (results.collect_results, results.parse_junit, results.parse_test_summary) == (
        agent.collect_results, agent.parse_junit, agent.parse_test_summary)
