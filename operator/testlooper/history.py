"""A branch's history as the store knows it: first-parent commits, their results, their classes."""

from __future__ import annotations

from dataclasses import dataclass

from testlooper import stats


@dataclass
class BranchHistory:
    line: list[str]  # first-parent commits, newest first, tested or not
    counts: dict  # sha -> {(task, case): (runs, failures)}, tested commits only
    classes: dict  # sha -> {(task, case): class}

    @property
    def tested(self) -> list[str]:
        return [sha for sha in self.line if sha in self.counts]

    def previous_tested(self, sha: str) -> str | None:
        tested = self.tested
        if sha not in tested:
            return None
        index = tested.index(sha)
        return tested[index + 1] if index + 1 < len(tested) else None


def load_branch_history(store, repo_id: str, repo, rev: str, limit: int) -> BranchHistory:
    from testlooper import gitio

    line = gitio.first_parent_line(repo, rev, limit)
    counts = store.case_counts(repo_id, line)
    return BranchHistory(line=line, counts=counts, classes=stats.classify_line(line, counts))
