"""Classification of test cases across a branch's history, and flake rates. Pure: no I/O.

Aggregates are one commit's results, `{(task, case): (runs, failures)}`, `runs` >= 1. A task's
own result is the case `""` (see `testlooper.store.base.case_outcomes`).

A case's state on one commit: `good` (no run failed), `bad` (every run failed), `flaky` (some
runs failed, some passed). Against the same case's state on the previous result, its class is:

    before \\ now   good     bad      flaky
    (absent)       new      new      new
    good           good     broken   flaky
    bad            fixed    bad      flaky
    flaky          good     broken   flaky

and a case present before but absent now is `removed`. So `broken` needs the case to be bad
now and to have been run before without being bad; a new case that fails is `new`, not broken.
`fixed` needs it to be good now and bad before: flaky-after-bad stays `flaky`, and
good-after-flaky is plain `good`.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

GOOD, BAD, FLAKY = "good", "bad", "flaky"
BROKEN, FIXED, NEW, REMOVED = "broken", "fixed", "new", "removed"

Key = tuple[str, str]
Aggregates = dict[Key, tuple[int, int]]

_CLASS_BY_TRANSITION = {
    (GOOD, GOOD): GOOD, (GOOD, BAD): BROKEN, (GOOD, FLAKY): FLAKY,
    (BAD, GOOD): FIXED, (BAD, BAD): BAD, (BAD, FLAKY): FLAKY,
    (FLAKY, GOOD): GOOD, (FLAKY, BAD): BROKEN, (FLAKY, FLAKY): FLAKY,
}


def case_state(runs: int, failures: int) -> str:
    if failures == 0:
        return GOOD
    if failures >= runs:
        return BAD
    return FLAKY


class _ClassOf(dict):
    """`(counts before or None, counts now) -> class`, filled on first use.

    A history has few distinct counts (mostly (1, 0) and (1, 1)), so classifying a case is one
    lookup, and `map` does the lookups in C: a line's history holds millions of cases.
    """

    def __missing__(self, transition: tuple[tuple[int, int] | None, tuple[int, int]]) -> str:
        before, now = transition
        if before is None:
            class_ = NEW
        else:
            class_ = _CLASS_BY_TRANSITION[case_state(*before), case_state(*now)]
        self[transition] = class_
        return class_


_class_of = _ClassOf()


def classify_commit(current: Aggregates, previous: Aggregates | None) -> dict[Key, str]:
    """Classify each case of `current` against `previous` (None: nothing ran before).

    Cases of `previous` missing from `current` are in the result as `removed`.
    """
    previous = previous or {}
    transitions = zip(map(previous.get, current), current.values())
    classes = dict(zip(current, map(_class_of.__getitem__, transitions)))
    # The subset test builds no set, and most commits remove nothing.
    if not current.keys() >= previous.keys():
        classes.update(dict.fromkeys(previous.keys() - current.keys(), REMOVED))
    return classes


def classify_line(line: list[str], counts: dict[str, Aggregates]) -> dict[str, dict[Key, str]]:
    """Classify every tested commit of a branch's first-parent line.

    `line` is newest first, as git lists it, tested or not; `counts` holds the aggregates of
    the tested commits. Each task's cases are classified against that task's cases on the
    nearest earlier commit that ran the task. When every commit runs every task, that is the
    nearest earlier tested commit. When a commit ran only some tasks (a trigger picked a
    smaller test set), the tasks it did not run are neither classified nor `removed` on it,
    and are compared with their last results when they run again; `removed` means the task
    ran and no longer reported the case.
    """
    classes = {}
    # The latest aggregates of every task run so far, oldest commit first.
    latest: Aggregates = {}
    latest_tasks: set[str] = set()
    for sha in reversed(line):
        current = counts.get(sha)
        if current is None:
            continue
        tasks = set(map(itemgetter(0), current))
        if tasks >= latest_tasks:
            previous = latest
            latest = current
        else:
            previous = {key: value for key, value in latest.items() if key[0] in tasks}
            latest = {key: value for key, value in latest.items() if key[0] not in tasks}
            latest.update(current)
        latest_tasks |= tasks
        classes[sha] = classify_commit(current, previous)
    return classes


@dataclass(frozen=True)
class FlakeRate:
    """One case over the last N tested commits of a line.

    `flake_rate` is `flaky_commits / commits_tested`: the share of the commits that ran the
    case on which it both passed and failed. It counts commits, not runs, so a case run 100
    times on one commit weighs as much as one run once, and a case that fails every run
    (bad, not flaky) has rate 0.
    """

    task: str
    case: str
    commits_tested: int
    flaky_commits: int
    runs: int
    failures: int
    flake_rate: float


def flake_rates(line: list[str], counts: dict[str, Aggregates], last_n: int) -> list[FlakeRate]:
    """Flake rates of every case run on the last `last_n` tested commits of `line` (newest
    first), highest rate first, ties by (task, case)."""
    tested = [sha for sha in line if sha in counts][:last_n]
    totals: dict[Key, list[int]] = {}
    for sha in tested:
        for key, (runs, failures) in counts[sha].items():
            total = totals.get(key)
            if total is None:
                total = totals[key] = [0, 0, 0, 0]
            total[0] += 1
            total[1] += 0 < failures < runs
            total[2] += runs
            total[3] += failures
    rates = [FlakeRate(task, case, commits, flaky, runs, failures, flaky / commits)
             for (task, case), (commits, flaky, runs, failures) in totals.items()]
    rates.sort(key=lambda rate: (-rate.flake_rate, rate.task, rate.case))
    return rates
