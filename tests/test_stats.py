import pytest

from testlooper.stats import (
    BAD, BROKEN, FIXED, FLAKY, GOOD, NEW, REMOVED, FlakeRate, case_state, classify_commit,
    classify_line, flake_rates,
)

# (runs, failures) giving each state
COUNTS = {GOOD: (3, 0), BAD: (2, 2), FLAKY: (4, 1)}


@pytest.mark.parametrize("runs, failures, state", [
    (1, 0, GOOD), (5, 0, GOOD), (1, 1, BAD), (5, 5, BAD), (2, 1, FLAKY), (10, 9, FLAKY),
])
def test_case_state(runs, failures, state):
    assert case_state(runs, failures) == state


@pytest.mark.parametrize("before, now, expected", [
    (GOOD, GOOD, GOOD), (GOOD, BAD, BROKEN), (GOOD, FLAKY, FLAKY),
    (BAD, GOOD, FIXED), (BAD, BAD, BAD), (BAD, FLAKY, FLAKY),
    (FLAKY, GOOD, GOOD), (FLAKY, BAD, BROKEN), (FLAKY, FLAKY, FLAKY),
])
def test_every_transition(before, now, expected):
    key = ("unit", "test_a")
    assert classify_commit({key: COUNTS[now]}, {key: COUNTS[before]}) == {key: expected}


@pytest.mark.parametrize("now", [GOOD, BAD, FLAKY])
def test_a_case_with_no_earlier_result_is_new_whatever_its_state(now):
    key = ("unit", "test_a")
    assert classify_commit({key: COUNTS[now]}, None) == {key: NEW}
    assert classify_commit({key: COUNTS[now]}, {("unit", "other"): (1, 0)})[key] == NEW


def test_a_case_gone_since_the_previous_commit_is_removed():
    previous = {("unit", "kept"): (1, 0), ("unit", "gone"): (1, 1)}
    assert classify_commit({("unit", "kept"): (1, 0)}, previous) == {
        ("unit", "kept"): GOOD, ("unit", "gone"): REMOVED}


def test_classify_line_skips_untested_commits_and_compares_with_the_nearest_tested():
    key = ("unit", "test_a")
    line = ["c5", "c4", "c3", "c2", "c1"]  # newest first
    counts = {"c1": {key: (1, 0)}, "c3": {key: (1, 1)}, "c5": {key: (1, 0)}}
    assert classify_line(line, counts) == {
        "c1": {key: NEW}, "c3": {key: BROKEN}, "c5": {key: FIXED}}


def test_classify_line_ignores_counts_of_commits_off_the_line():
    key = ("unit", "test_a")
    counts = {"c1": {key: (1, 0)}, "elsewhere": {key: (1, 1)}, "c2": {key: (1, 0)}}
    assert classify_line(["c2", "c1"], counts) == {"c1": {key: NEW}, "c2": {key: GOOD}}


def test_classify_line_compares_each_task_with_the_last_commit_that_ran_it():
    unit, slow = ("unit", "test_a"), ("slow", "test_b")
    counts = {
        "c1": {unit: (1, 0), slow: (1, 0)},
        "c2": {unit: (1, 1)},                  # a trigger ran only the unit tests
        "c3": {unit: (1, 1), slow: (1, 1)},
    }
    assert classify_line(["c3", "c2", "c1"], counts) == {
        "c1": {unit: NEW, slow: NEW},
        "c2": {unit: BROKEN},                  # slow was not run: not removed
        "c3": {unit: BAD, slow: BROKEN},       # slow compared with c1, not new
    }


def test_classify_line_removes_only_cases_of_tasks_that_ran():
    a, b, other = ("unit", "test_a"), ("unit", "test_b"), ("slow", "test_c")
    counts = {"c1": {a: (1, 0), b: (1, 0), other: (1, 0)}, "c2": {a: (1, 0)}}
    assert classify_line(["c2", "c1"], counts)["c2"] == {a: GOOD, b: REMOVED}


def test_flake_rates_count_commits_runs_and_failures_over_the_last_tested_commits():
    a, b, c = ("unit", "a"), ("unit", "b"), ("unit", "c")
    line = ["c6", "c5", "c4", "c3", "c2", "c1"]
    counts = {
        "c6": {a: (4, 1), b: (2, 2), c: (3, 1)},
        "c4": {a: (4, 0), b: (2, 2), c: (3, 2)},
        "c3": {a: (4, 2), c: (3, 0)},
        "c1": {a: (4, 4)},  # beyond the last 3 tested commits
    }
    assert flake_rates(line, counts, last_n=3) == [
        FlakeRate("unit", "a", 3, 2, 12, 3, 2 / 3),
        FlakeRate("unit", "c", 3, 2, 9, 3, 2 / 3),    # tie with a: ordered by name
        FlakeRate("unit", "b", 2, 0, 4, 4, 0.0),      # always failing is bad, not flaky
    ]


def test_flake_rates_of_an_untested_line_are_empty():
    assert flake_rates(["c2", "c1"], {}, last_n=10) == []
