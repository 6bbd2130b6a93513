"""`testlooper flaky`: a branch's cases ranked by flake rate over its last tested commits."""

from __future__ import annotations

import argparse
import dataclasses
import json

from testlooper import terminal
from testlooper.errors import UserError
from testlooper.local.recording import open_store_replaying_spool
from testlooper.cli.history_cmd import (
    BranchLine, add_branch_arguments, branch_line, no_history_message, stored_branch_line,
)
from testlooper.history import FLAKY_WINDOW, branch_flakiness

DEFAULT_LAST = FLAKY_WINDOW


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flaky",
        help="rank a branch's cases by flake rate over its last tested commits",
        description="Rank the cases of a branch's last N tested commits (first-parent line) by flake "
        "rate: the share of the commits that ran the case on which it both passed and failed. A case "
        "failing every run is bad, not flaky, and has rate 0.",
    )
    add_branch_arguments(parser)
    parser.add_argument("--last", metavar="N", type=int, default=DEFAULT_LAST,
                        help=f"look at the last N tested commits (default: {DEFAULT_LAST})")
    parser.add_argument("--json", action="store_true", help="print the flaky cases as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.last < 1:
        raise UserError("--last must be at least 1")
    target = None if args.repo_id else branch_line(args.path, args.branch, args.last)
    with open_store_replaying_spool(args.store, args.spool) as store:
        target = target or stored_branch_line(store, args.repo_id, args.branch)
        flakiness = branch_flakiness(store, target.repo_id, target.line, args.last)
        store_url = store.url
    counts, flaky = flakiness.counts, flakiness.flaky
    if args.json:
        print(json.dumps([dataclasses.asdict(rate) for rate in flaky], indent=2, sort_keys=True,
                         ensure_ascii=False))
    elif not counts:
        print(no_history_message(target, store_url, globs=[]))
    elif not flaky:
        print(f"no flaky cases in the last {_tested_commits(len(counts))} of {target.branch}")
    else:
        print(render(target, flaky, len(counts), terminal.Styler(terminal.colour_wanted())))
    return 0


def render(target: BranchLine, flaky: list, tested: int, styler: terminal.Styler) -> str:
    title = f"Flaky cases of {target.branch} of {target.repo_id}, over its last {_tested_commits(tested)}:"
    rows = [[str(rank), rate.task, rate.case or "(task)", terminal.Cell(f"{rate.flake_rate:.1%}", "yellow"),
             f"{rate.flaky_commits}/{rate.commits_tested}", f"{rate.failures}/{rate.runs}"]
            for rank, rate in enumerate(flaky, start=1)]
    headers = ["#", "TASK", "CASE", "FLAKE RATE", "FLAKY COMMITS", "FAILED RUNS"]
    return terminal.heading(title, styler) + "\n\n" + terminal.table(headers, rows, styler)


def _tested_commits(number: int) -> str:
    return "tested commit" if number == 1 else f"{number} tested commits"
