"""A branch's history as the store knows it: tested commits, their results and their classes,
read only as far back as a question needs (a line can hold millions of case results)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

from testlooper import stats


def tested_aggregates(store, repo_id: str, line: list[str], batch: int,
                      globs: list[str], tested: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """`(sha, aggregates)` of each commit of `line` that ran a task matching `globs` (any task
    without globs), newest first, with only those tasks' cases.

    Commits are read `batch` at a time, and only as far as the caller iterates: a line's
    commits can hold millions of cases in all, and most callers need a few dozen commits.
    """
    if tested is None:  # the caller may already know which commits of the line were tested
        tested = store.tested_commits(repo_id, line)
    shas = [sha for sha in line if sha in tested]
    for start in range(0, len(shas), batch):
        chunk = shas[start:start + batch]
        counts = store.case_counts(repo_id, chunk)
        for sha in chunk:
            aggregates = _select_tasks(counts.get(sha, {}), globs)
            if aggregates:
                yield sha, aggregates


def _select_tasks(aggregates: dict, globs: list[str]) -> dict:
    from testlooper.planning import match_glob

    if not globs:
        return aggregates
    # Match each task once, not each of its (possibly thousands of) cases.
    tasks = {task for task, _ in aggregates}
    wanted = {task for task in tasks if any(match_glob(glob, task) for glob in globs)}
    return {key: value for key, value in aggregates.items() if key[0] in wanted}


@dataclass
class ShownHistory:
    line: list[str]  # from the branch's tip down to the oldest shown commit, tested or not
    counts: dict  # sha -> {(task, case): (runs, failures)}, the shown commits, newest first
    classes: dict  # sha -> {(task, case): class}, the shown commits


def load_shown_history(store, repo_id: str, line: list[str], limit: int, globs: list[str],
                       tested: set[str] | None = None) -> ShownHistory:
    """The newest `limit` tested commits of `line` (first-parent shas, newest first) and their classes."""
    # One read covers the shown commits and, when every commit runs every task, the earlier
    # results they are classified against.
    commits = tested_aggregates(store, repo_id, line, limit + 1, globs, tested)
    shown = dict(itertools.islice(commits, limit))
    if not shown:
        return ShownHistory([], {}, {})
    tasks = {task for aggregates in shown.values() for task, _ in aggregates}
    classes = stats.classify_line(line, {**shown, **_earlier_results(commits, tasks)})
    oldest = line.index(next(reversed(shown)))
    return ShownHistory(line[:oldest + 1], shown, {sha: classes[sha] for sha in shown})


def _earlier_results(commits: Iterator[tuple[str, dict]], tasks: set[str]) -> dict:
    """For each of `tasks`, its results on the newest of `commits` that ran it.

    A task's cases are classified against the task's previous run however far back it is (a
    trigger may run a task on few commits), so this reads on until every task has a previous
    run or the line ends; the other tasks' cases on those commits are left out, as they do
    not change the classes of the shown commits.
    """
    waiting = set(tasks)
    earlier = {}
    for sha, aggregates in commits:
        found = {key: value for key, value in aggregates.items() if key[0] in waiting}
        if found:
            earlier[sha] = found
            waiting -= {task for task, _ in found}
        if not waiting:
            break
    return earlier


FLAKY_WINDOW = 50  # tested commits `testlooper flaky` and the flaky-cases metric look at


@dataclass
class BranchFlakiness:
    counts: dict  # sha -> {(task, case): (runs, failures)}, the last tested commits, newest first
    flaky: list  # stats.FlakeRate of the cases with a rate above 0, highest first


def branch_flakiness(store, repo_id: str, line: list[str], last: int = FLAKY_WINDOW) -> BranchFlakiness:
    """The flaky cases over the last `last` tested commits of `line` (first-parent shas from the
    branch head, newest first): what `testlooper flaky` prints and the operator's
    testlooper_flaky_cases counts."""
    counts = dict(itertools.islice(tested_aggregates(store, repo_id, line, last, globs=[]), last))
    rates = stats.flake_rates(list(counts), counts, last)
    return BranchFlakiness(counts, [rate for rate in rates if rate.flake_rate > 0])
