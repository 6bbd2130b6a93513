"""`testlooper plan`: which builds and tests a commit (or the working tree) runs, and why."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from testlooper import terminal
from testlooper.cli import runs_option
from testlooper.errors import UserError
from testlooper.repos.definitions import (
    definitions_at_commit,
    definitions_on_disk,
    empty_definitions,
    existing_directory,
    looked_for,
    add_repo_option,
    pinned_changes_at,
    print_warning,
    repositories_from_option,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show which builds and tests run for a commit, and why",
        description="Plan a commit: pick the test sets its changes trigger (or the ones asked for), "
        "add the builds they need, and list the tasks in the order they can run.",
    )
    parser.add_argument(
        "path", metavar="PATH", nargs="?", default=".", help="a working tree or git repository (default: .)"
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="plan the commit REV (its definitions and its changes) instead of the working tree",
    )
    parser.add_argument(
        "--base", metavar="REV", help="count changes against REV instead of the first parent"
    )
    parser.add_argument(
        "--test-set",
        metavar="NAME",
        dest="test_sets",
        action="append",
        default=[],
        help="run this test set whatever the triggers say (repeatable)",
    )
    parser.add_argument(
        "--test",
        metavar="GLOB",
        dest="tests",
        action="append",
        default=[],
        help="run the tests whose names match GLOB whatever the triggers say (repeatable)",
    )
    parser.add_argument("--runs", metavar="N", type=runs_option, help="run each test N times instead of its own `runs`")
    add_repo_option(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


@dataclass
class _Target:
    """What is planned: definitions (None without a file), its changed files (None: unknown), its commit."""

    definitions: dict | None
    changed_files: list[str] | None
    commit: str | None
    description: str
    pinned_changes: dict = field(default_factory=dict)  # pin -> paths changed since the base's pin


def run(args: argparse.Namespace) -> int:
    from testlooper.planning import plan

    target = _commit_target(args) if args.rev is not None else _working_tree_target(args)
    try:
        result = plan(
            target.definitions or empty_definitions(),
            target.changed_files,
            test_sets=args.test_sets,
            runs=args.runs,
            tests=args.tests,
            pinned_changes=target.pinned_changes,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if target.definitions is None:
        result["reason"] = f"no definitions file, so nothing to run (looked for {looked_for()})"

    if args.json:
        print(json.dumps({**result, "commit": target.commit}, indent=2, sort_keys=True))
    else:
        print(render(result, target, terminal.Styler(terminal.colour_wanted())))
    return 0


def _commit_target(args: argparse.Namespace) -> _Target:
    from testlooper import gitio

    repo = gitio.open_repo(args.path)
    sha = gitio.resolve_rev(repo, args.rev)
    base = gitio.resolve_rev(repo, args.base) if args.base else None
    repositories = repositories_from_option(args.repos)
    definitions = definitions_at_commit(repo, sha, repositories=repositories, warn=print_warning)
    changed = gitio.changed_files(repo, sha, base)
    return _Target(
        definitions=definitions,
        changed_files=changed,
        commit=sha,
        description=f"commit {sha[:12]}",
        pinned_changes=pinned_changes_at(repo, sha, definitions, repositories, base) if changed is not None else {},
    )


def _working_tree_target(args: argparse.Namespace) -> _Target:
    """The files on disk; changes are HEAD's (against its first parent or --base) plus uncommitted ones."""
    from testlooper import gitio

    root = existing_directory(args.path)
    definitions = definitions_on_disk(root, repositories_from_option(args.repos), print_warning)
    try:
        repo = gitio.open_repo(root)
    except gitio.GitError:
        if args.base:
            raise UserError(f"--base needs a git repository, and {args.path} is not one") from None
        return _Target(definitions, None, None, f"working tree {args.path} (not a git repository)")
    if not repo.head.is_valid():
        return _Target(definitions, None, None, f"working tree {args.path} (no commits yet)")
    sha = gitio.resolve_rev(repo, "HEAD")
    base = gitio.resolve_rev(repo, args.base) if args.base else None
    committed = gitio.changed_files(repo, sha, base)
    changed = None if committed is None else sorted({*committed, *gitio.uncommitted_changes(repo)})
    # The working tree's pins against the base's (the first parent of HEAD, or --base).
    pinned = {} if changed is None else pinned_changes_at(repo, sha, definitions,
                                                         repositories_from_option(args.repos), base)
    return _Target(definitions, changed, sha, f"working tree {args.path} (HEAD {sha[:12]} and uncommitted changes)",
                   pinned)


def render(result: dict, target: _Target, styler: terminal.Styler) -> str:
    changed = target.changed_files
    summary = [
        ("Planning", target.description),
        ("Changed", "unknown (a commit with no parent): the test set all runs" if changed is None else terminal.count(len(changed), "file")),
        ("Reason", result["reason"]),
        ("Test sets", ", ".join(result["test_sets"]) or "none"),
    ]
    width = max(len(label) for label, _ in summary)
    lines = [f"{terminal.heading(label.ljust(width), styler)}  {value}" for label, value in summary]
    tasks = result["tasks"]
    if not tasks:
        return "\n".join(lines + ["", "Nothing to run."])
    rows = [
        [str(position), task["name"], terminal.kind_cell(task["kind"]), str(task["runs"]), ", ".join(task["depends_on"])]
        for position, task in enumerate(tasks, start=1)
    ]
    builds = sum(task["kind"] == "build" for task in tasks)
    runs = sum(task["runs"] for task in tasks)
    totals = f"{terminal.count(builds, 'build')} and {terminal.count(len(tasks) - builds, 'test')}: {terminal.count(runs, 'run')} in all"
    table = terminal.table(["#", "NAME", "KIND", "RUNS", "DEPENDS ON"], rows, styler)
    return "\n".join(lines + ["", table, "", totals])
