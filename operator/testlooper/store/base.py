"""The history store's interface, its records, and the counting rules both stores share.

A store keeps every recorded run (all attempts, all results) and, per commit, the aggregates
`{(task, case): (runs, failures)}` that `testlooper.stats` classifies. The rules for what a
run contributes to those aggregates live here, so SQLite and Redis count identically.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable

from testlooper.stats import Aggregates

RESULTS = ("passed", "failed", "timeout", "error", "blocked", "cancelled")
# A blocked run never started, a cancelled one was stopped on purpose, and an `error` is the
# infrastructure failing (the worker died, inputs could not be fetched), not the test: none
# says anything about the code, so none counts as a run of its cases. Counting errors as
# failures would make a sound test look broken or flaky whenever a machine failed under it.
# (Schema 1 of both stores counted `error` as a failure; opening one migrates it.)
UNCOUNTED_RESULTS = frozenset({"blocked", "cancelled", "error"})
# The task's own result is kept as a case with this name, so tests that report no cases have
# history too.
TASK_CASE = ""


class StoreError(Exception):
    """The history store cannot do what was asked."""


class StoreReadOnly(StoreError):
    """The store can be read but not written (a read-only file or file system)."""


class StoreUnavailable(StoreError):
    """The backend is down or unreachable; the caller may spool runs and replay them later."""


@dataclass
class CaseResult:
    name: str
    success: bool
    duration_seconds: float | None = None


@dataclass
class RunRecord:
    """One attempt of one run of one task on one commit."""

    repo: str
    commit: str
    task: str
    kind: str
    run_index: int
    attempt: int
    result: str
    duration_seconds: float
    exit_code: int | None
    started_at: float
    branch: str = ""
    cases: list[CaseResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"run result {self.result!r} is not one of {', '.join(RESULTS)}")

    def to_json(self, with_cases: bool = True) -> dict:
        """A JSON-ready dict; cases are `[name, success, duration]` triples to stay compact."""
        data = {
            "repo": self.repo, "commit": self.commit, "task": self.task, "kind": self.kind,
            "run_index": self.run_index, "attempt": self.attempt, "result": self.result,
            "duration_seconds": self.duration_seconds, "exit_code": self.exit_code,
            "started_at": self.started_at, "branch": self.branch,
        }
        if with_cases:
            data["cases"] = [[c.name, c.success, c.duration_seconds] for c in self.cases]
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        fields = dict(data)
        cases = [CaseResult(name, bool(success), duration)
                 for name, success, duration in fields.pop("cases", ())]
        return cls(**fields, cases=cases)


def distinct_cases(cases: list[CaseResult]) -> list[CaseResult]:
    """The cases of one run with each name once, as stored.

    JUnit allows a name twice in one run; the case then failed if any report failed, and its
    duration is the sum of the known durations.
    """
    by_name: dict[str, CaseResult] = {}
    for case in cases:
        seen = by_name.get(case.name)
        if seen is None:
            by_name[case.name] = case
        else:
            durations = [d for d in (seen.duration_seconds, case.duration_seconds) if d is not None]
            by_name[case.name] = CaseResult(case.name, seen.success and case.success,
                                            sum(durations) if durations else None)
    if len(by_name) == len(cases):
        return cases
    return list(by_name.values())


def case_outcomes(result: str, cases: Iterable[tuple[str, bool]]) -> dict[str, bool]:
    """What one run contributes to its commit's aggregates: `{case name: passed}`.

    Empty for blocked, cancelled and error runs (UNCOUNTED_RESULTS). The task's own result is
    the case `""`: passed only if the run passed (failed and timeout count as failures). A
    name reported more than once is one run of that case, failed if any report failed; a
    reported case named `""` is folded into the task's own result the same way.
    """
    if result in UNCOUNTED_RESULTS:
        return {}
    outcomes: dict[str, bool] = {}
    for name, success in cases:
        outcomes[name] = outcomes.get(name, True) and bool(success)
    outcomes[TASK_CASE] = outcomes.get(TASK_CASE, True) and result == "passed"
    return outcomes


def run_outcomes(run: RunRecord) -> dict[str, bool]:
    return case_outcomes(run.result, ((c.name, c.success) for c in run.cases))


def final_attempt_change(recorded_attempts: Iterable[int], attempt: int) -> tuple[int | None, bool]:
    """How recording `attempt` of a run index changes which attempt counts.

    Only the final (highest) attempt of each run index counts. Returns the attempt whose
    contribution must be taken back (None if none) and whether the new record contributes.
    Re-recording the final attempt takes back its old contribution and adds the new one, so
    nothing is counted twice; recording an earlier attempt changes no aggregate.
    """
    final = max(recorded_attempts, default=None)
    if final is None:
        return None, True
    if attempt >= final:
        return final, True
    return None, False


class HistoryStore(abc.ABC):
    """Where run results and per-commit case aggregates are kept.

    Every method raises StoreUnavailable when the backend is down.
    """

    url: str

    def record_run(self, run: RunRecord) -> None:
        """Record one run. Recording one with the same (repo, commit, task, run_index, attempt)
        again replaces it, so nothing is ever counted twice."""
        self.record_runs([run])

    @abc.abstractmethod
    def record_runs(self, runs: Iterable[RunRecord]) -> None:
        """Record many runs, as `record_run` would one by one, in fewer round trips.

        If it raises, some of the runs may be recorded already; recording them again is safe.
        """

    @abc.abstractmethod
    def allocate_run_indexes(self, repo: str, commit: str, task: str, count: int) -> int:
        """Reserve `count` run indexes of the task on the commit; returns the first of them.

        The range `[first, first + count)` is given to this caller alone, however many
        processes allocate at once, and lies after every index recorded or allocated before,
        so runs recorded under it never replace another command's. Indexes allocated but never
        recorded (the command was interrupted) stay unused.
        """

    @abc.abstractmethod
    def runs(self, repo: str, commit: str, with_cases: bool = False) -> list[RunRecord]:
        """Every recorded attempt of every run of the commit, by (task, run_index, attempt).

        Without `with_cases` the records' `cases` lists are empty; with it, they are sorted
        by name, each name once (see `distinct_cases`).
        """

    def task_runs(self, repo: str, commit: str, task: str, with_cases: bool = False) -> list[RunRecord]:
        """`runs` of one task alone, as `runs` gives them. A store may read only that task's
        records (the operator asks for one TestRun's as each of its results lands, and a commit
        may hold thousands)."""
        return [run for run in self.runs(repo, commit, with_cases) if run.task == task]

    @abc.abstractmethod
    def case_counts(self, repo: str, commits: Iterable[str]) -> dict[str, Aggregates]:
        """`{sha: {(task, case): (runs, failures)}}` for those of `commits` that are tested.

        A commit is tested once it has a run that counts (not blocked, cancelled or error);
        only the final attempt of each run index counts.
        """

    @abc.abstractmethod
    def tested_commits(self, repo: str, commits: Iterable[str]) -> set[str]:
        """Those of `commits` that `case_counts` would return, without fetching the counts."""

    @abc.abstractmethod
    def repos(self) -> list[str]:
        """The repos that have recorded runs, sorted."""

    @abc.abstractmethod
    def record_branch_line(self, repo: str, branch: str, line: list[str]) -> None:
        """Keep `line`, the branch's first-parent shas from its head, newest first, in place of
        the one kept before. The operator records it for each tested head, so that `history`
        and `flaky` can show a repository that has no checkout on the reader's machine."""

    @abc.abstractmethod
    def branch_line(self, repo: str, branch: str) -> list[str] | None:
        """The line last recorded for the branch, newest first; None when none was."""

    @abc.abstractmethod
    def branches(self, repo: str) -> list[str]:
        """The branches with a recorded line, sorted."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the backend answers, raise StoreUnavailable if not."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store is not used afterwards."""

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
