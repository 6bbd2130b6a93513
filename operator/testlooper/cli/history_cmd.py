"""`testlooper history`: each task's result on a branch's recent tested commits, and the cases
that need a look on the newest one.

Also the pieces `testlooper flaky` shares: the branch's first-parent line, the store, and
reading tested commits in batches.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from testlooper import terminal
from testlooper.errors import UserError
from testlooper.cli.run_cmd import CLASS_STYLES
from testlooper.history import ShownHistory, load_shown_history
from testlooper.local.recording import open_store_replaying_spool

DEFAULT_LIMIT = 20
# How far back along the first parents to look for tested commits: untested ones (left out by
# triggers, still queued) are passed over, but a long branch is not walked to its root.
WALK_PER_TESTED_COMMIT, MAX_WALK = 50, 10_000
# Wider grids are printed in blocks of this many task columns, each repeating the commits.
MAX_TASK_COLUMNS = 8
MESSAGE_WIDTH = 40
# A case's state on one commit (testlooper.stats.case_state) as a grid cell shows it.
STATE_CELLS = {"good": ("passed", "green"), "bad": ("failed", "red"), "flaky": ("flaky", "yellow")}
# The order of the list under the grid: problems first, then changes for the better.
CLASS_ORDER = ("broken", "bad", "flaky", "new", "fixed", "removed")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "history",
        help="show each task's results on a branch's recent tested commits",
        description="Show the last tested commits of a branch's first-parent line, newest first, with "
        "each task's own result on each (runs passed / runs), then the cases that are broken, bad, "
        "flaky, new and failing, fixed or removed on the newest tested commit.",
    )
    add_branch_arguments(parser)
    parser.add_argument("--test", metavar="GLOB", dest="tests", action="append", default=[],
                        help="only the tasks whose names match GLOB (repeatable)")
    parser.add_argument("--limit", metavar="N", type=int, default=DEFAULT_LIMIT,
                        help=f"show the last N tested commits (default: {DEFAULT_LIMIT})")
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    parser.set_defaults(run=run)


def add_branch_arguments(parser: argparse.ArgumentParser) -> None:
    """PATH, --branch and --store, as `history` and `flaky` both take them."""
    from testlooper.store import DEFAULT_STORE_PATH

    parser.add_argument("path", metavar="PATH", nargs="?", default=".",
                        help="the top of a git repository (default: .)")
    parser.add_argument("--branch", metavar="BRANCH",
                        help="the branch (or any revision) whose first-parent line to read "
                        "(default: the checked-out branch, HEAD)")
    parser.add_argument("--store", metavar="URL", default="",
                        help=f"history store: a path or sqlite:///ABS/PATH.db, or redis://HOST:PORT/DB "
                        f"(default: {DEFAULT_STORE_PATH})")
    parser.add_argument("--repo", metavar="NAMESPACE/NAME", dest="repo_id",
                        help="a Repo tested in a cluster: its branch line comes from the store, as the "
                        "operator recorded it, so no checkout is needed (use with --store redis://...)")
    parser.add_argument("--spool", metavar="DIR",
                        help="record first the results a run kept in DIR while the store was down "
                        "(default: the default store's folder)")


@dataclass
class BranchLine:
    repo: object  # the git.Repo; None for a Repo known only from the store (--repo)
    repo_id: str  # the repository's name in the history store
    branch: str
    line: list[str]  # first-parent shas from the branch's tip, newest first, tested or not


def branch_line(path: str, branch: str | None, tested_wanted: int) -> BranchLine:
    """The first-parent line of `branch`, deep enough to hold `tested_wanted` tested commits
    when at most one commit in WALK_PER_TESTED_COMMIT was tested."""
    from testlooper import gitio
    from testlooper.local.target import current_branch, repo_identity

    repo = gitio.open_repo(path)
    branch = branch or current_branch(repo) or "HEAD"
    depth = max(tested_wanted, min(WALK_PER_TESTED_COMMIT * tested_wanted, MAX_WALK))
    return BranchLine(repo, repo_identity(repo), branch, gitio.first_parent_line(repo, branch, depth))


def stored_branch_line(store, repo_id: str, branch: str | None) -> BranchLine:
    """The line the operator recorded for a Repo's branch (`--repo NAMESPACE/NAME`): the named
    branch, else `main`, else the only one recorded."""
    known = store.branches(repo_id)
    if not known:
        raise UserError(f"the history store {store.url} has no branch of {repo_id}: the operator records "
                        "each tested branch when it tests its head (is --store the operator's?)")
    chosen = branch or ("main" if "main" in known else known[0] if len(known) == 1 else None)
    if chosen is None:
        raise UserError(f"{repo_id} has several tested branches: name one with --branch ({', '.join(known)})")
    if chosen not in known:
        raise UserError(f"{repo_id} has no tested branch {chosen} in the store (it has {', '.join(known)})")
    return BranchLine(None, repo_id, chosen, store.branch_line(repo_id, chosen) or [])


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    target = None if args.repo_id else branch_line(args.path, args.branch, args.limit)
    with open_store_replaying_spool(args.store, args.spool) as store:
        target = target or stored_branch_line(store, args.repo_id, args.branch)
        history = load_shown_history(store, target.repo_id, target.line, args.limit, args.tests)
        store_url = store.url
        unfinished = unfinished_runs(store, target.repo_id, next(iter(history.counts), None), args.tests)
    if args.json:
        print(json.dumps(history_json(target, history), indent=2, sort_keys=True, ensure_ascii=False))
    elif not history.counts:
        print(no_history_message(target, store_url, args.tests))
    else:
        print(render(target, history, args.tests, terminal.Styler(terminal.colour_wanted()), unfinished))
    return 0


def unfinished_runs(store, repo_id: str, sha: str | None, globs: list[str]) -> int:
    """How many run indexes of commit `sha` (of the tasks matching `globs`) ended cancelled or in
    error, without a counted result: the commit is not tested in full, whatever its cases say."""
    from testlooper.local.recording import final_results
    from testlooper.planning import match_glob

    if sha is None:
        return 0
    return sum(results.count("cancelled") + results.count("error")
               for task, results in final_results(store.runs(repo_id, sha)).items()
               if not globs or any(match_glob(glob, task) for glob in globs))


def no_history_message(target: BranchLine, store_url: str, globs: list[str]) -> str:
    tasks = f" of tasks matching {', '.join(globs)}" if globs else ""
    return (f"No results{tasks} for {target.branch} of {target.repo_id} in the history store {store_url}: "
            f"none of its last {terminal.count(len(target.line), 'commit')} was tested.")


def history_json(target: BranchLine, history: ShownHistory) -> dict:
    tasks: dict[str, dict[str, list]] = {}
    for sha, aggregates in history.counts.items():
        classes = history.classes[sha]
        for (task, case), (runs, failures) in aggregates.items():
            tasks.setdefault(task, {}).setdefault(case, []).append(
                {"commit": sha, "runs": runs, "failures": failures, "class": classes[task, case]})
    commits = [{"sha": sha, "message": _subject(target.repo, sha), "tested": sha in history.counts}
               for sha in history.line]
    return {"repo": target.repo_id, "branch": target.branch, "commits": commits, "tasks": tasks}


def render(target: BranchLine, history: ShownHistory, globs: list[str], styler: terminal.Styler,
           unfinished: int = 0) -> str:
    tested = len(history.counts)
    untested = len(history.line) - tested
    title = f"{target.branch} of {target.repo_id}: {terminal.count(tested, 'tested commit')}, newest first"
    if untested:
        title += f" ({terminal.count(untested, 'untested commit')} left out)"
    if globs:
        title += f"; tasks matching {', '.join(globs)}"
    return "\n\n".join([terminal.heading(title, styler), _grid(target, history, styler),
                        _notable_cases(history, styler, unfinished)])


def _grid(target: BranchLine, history: ShownHistory, styler: terminal.Styler) -> str:
    """Commits as rows, tasks as columns, in blocks of MAX_TASK_COLUMNS tasks."""
    tasks = sorted({task for aggregates in history.counts.values() for task, _ in aggregates})
    commit_cells = {sha: [sha[:12], _truncate(_subject(target.repo, sha), MESSAGE_WIDTH)]
                    for sha in history.counts}
    blocks = []
    for start in range(0, len(tasks), MAX_TASK_COLUMNS):
        block = tasks[start:start + MAX_TASK_COLUMNS]
        rows = [commit_cells[sha] + [_result_cell(aggregates.get((task, ""))) for task in block]
                for sha, aggregates in history.counts.items()]
        blocks.append(terminal.table(["COMMIT", "MESSAGE", *block], rows, styler))
    return "\n\n".join(blocks)


def _notable_cases(history: ShownHistory, styler: terminal.Styler, unfinished: int = 0) -> str:
    """Every case of the newest tested commit whose class is not `good`, except new cases that
    passed: on a first tested commit every case is new, and a new passing case needs no look."""
    newest, aggregates = next(iter(history.counts.items()))
    notable = sorted(
        (CLASS_ORDER.index(class_), task, case, class_)
        for (task, case), class_ in history.classes[newest].items()
        if class_ != "good" and not (class_ == "new" and aggregates[task, case][1] == 0)
    )
    if not notable and unfinished:
        return (f"Every case that ran passed on {newest[:12]}, the newest tested commit, but "
                f"{terminal.count(unfinished, 'run')} ended cancelled or in error: it is not tested in full.")
    if not notable:
        return f"Every case passed on {newest[:12]}, the newest tested commit."
    rows = [[terminal.Cell(class_, CLASS_STYLES.get(class_)), task if not case else f"{task} :: {case}",
             _result_cell(aggregates.get((task, case)))]
            for _, task, case, class_ in notable]
    heading = f"On {newest[:12]}, the newest tested commit, against each task's previous results:"
    return terminal.heading(heading, styler) + "\n" + terminal.table(["CLASS", "CASE", "RESULT"], rows, styler)


def _result_cell(counts: tuple[int, int] | None) -> terminal.Cell:
    """`passed 6/6`, `failed 0/1`, `flaky 4/6` (runs passed / runs), or `-` when not run."""
    from testlooper.stats import case_state

    if counts is None:
        return terminal.Cell("-")
    runs, failures = counts
    word, style = STATE_CELLS[case_state(runs, failures)]
    return terminal.Cell(f"{word} {runs - failures}/{runs}", style)


def _subject(repo, sha: str) -> str:
    """The first line of the commit's message ("" without a checkout: --repo)."""
    from testlooper import gitio

    if repo is None:
        return ""
    return gitio.commit_message(repo, sha).strip().split("\n", 1)[0]


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
