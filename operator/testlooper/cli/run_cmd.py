"""`testlooper run`: run a commit's builds and tests here, as often as asked, and record every case."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from testlooper import terminal
from testlooper.cli import runs_option
from testlooper.errors import UserError

NOTABLE_CLASSES = ("broken", "fixed", "flaky", "bad", "new", "removed")
CLASS_STYLES = {"broken": "red", "bad": "red", "fixed": "green", "flaky": "yellow", "new": "blue", "removed": "dim"}
EXIT_PASSED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
# How far down the first-parent line a run looks for each task's previous results.
COMPARISON_DEPTH = 1000
# While a working tree is copied, a line of progress at most this often; a tree of this many
# files is announced before its copy starts.
SNAPSHOT_PROGRESS_EVERY_SECONDS = 2.0
SNAPSHOT_SAY_FROM_FILES = 1000


def register(subparsers: argparse._SubParsersAction) -> None:
    from testlooper.store import DEFAULT_STORE_PATH

    parser = subparsers.add_parser(
        "run",
        help="run a commit's builds and tests on this machine and record the results",
        description="Run the builds and tests of a checkout (or of commit REV) as local processes, each "
        "test as many times as it asks, record every test case in the history store, and compare "
        "with the nearest earlier tested commit. Exits 0 when everything passed, 1 when something "
        "failed, 2 on a definitions or usage error.",
    )
    parser.add_argument("path", metavar="PATH", nargs="?", default=".", help="a working tree or git repository (default: .)")
    parser.add_argument("--rev", metavar="REV", help="run commit REV (exported, the working tree is not touched)")
    parser.add_argument("--test", metavar="GLOB", dest="tests", action="append", default=[],
                        help="run only tests matching GLOB (repeatable); default: every test")
    parser.add_argument("--test-set", metavar="NAME", dest="test_sets", action="append", default=[],
                        help="run only this test set (repeatable)")
    parser.add_argument("--runs", metavar="N", type=runs_option, help="run each test N times instead of its own `runs`")
    parser.add_argument("--jobs", metavar="N", type=int, default=0, help="runs at once (default: one per core)")
    parser.add_argument("--store", metavar="URL", default="",
                        help=f"history store: a path or sqlite:///ABS/PATH.db, or redis://HOST:PORT/DB "
                        f"(default: {DEFAULT_STORE_PATH})")
    parser.add_argument("--output", metavar="DIR", help="where logs (DIR/runs), workspaces (DIR/work) and "
                        "source snapshots (DIR/sources) go (default: the default store's folder)")
    parser.add_argument("--spool", metavar="DIR", help="where results wait while the history store is down "
                        "(default: the default store's folder; if DIR cannot be written, the --output folder)")
    parser.add_argument("--isolation", choices=("host", "container"), default="host",
                        help="run tasks on this host (default) or in their images through docker or podman")
    parser.add_argument("--keep-workspaces", action="store_true", help="keep each run's workspace for debugging")
    parser.add_argument("--max-log-mb", metavar="MB", type=int,
                        help="cut every run's log past MB MiB, keeping its head and tail, and fail the run "
                        "(default: each task's `max_log_mb`, else 1024)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    from testlooper.repos.definitions import add_repo_option

    add_repo_option(parser)
    parser.set_defaults(run=run)


def default_output_dir() -> str:
    from testlooper.store import default_store_path

    return os.path.dirname(default_store_path())


def checked_output_dir(option: str | None) -> str:
    """The --output folder (made if need be), once a file was written in it: a folder that
    cannot be written is a usage error before anything runs."""
    from testlooper.local.output import why_unwritable

    output_dir = os.path.abspath(option or default_output_dir())
    problem = why_unwritable(output_dir)
    if problem:
        raise UserError(f"cannot write the output folder {output_dir} ({problem}): give --output DIR")
    return output_dir


def run(args: argparse.Namespace) -> int:
    from testlooper.local.progress import Progress
    from testlooper.local.recording import own_paths
    from testlooper.local.session import raise_keyboard_interrupt
    from testlooper.local.target import commit_target, is_bare_repository, working_tree_target
    from testlooper.planning.planner import check_runs
    from testlooper.repos.definitions import repositories_from_option

    if args.jobs < 0:
        raise UserError(f"--jobs must be 0 or more, not {args.jobs}")
    if args.max_log_mb is not None and args.max_log_mb < 1:
        raise UserError(f"--max-log-mb must be at least 1, not {args.max_log_mb}")
    try:  # before the snapshot: `--runs 30000000` fails at once
        check_runs(args.runs)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    output_dir = checked_output_dir(args.output)
    snapshots = os.path.join(output_dir, "sources")
    rev = args.rev
    if rev is None and is_bare_repository(args.path):
        rev = "HEAD"  # a bare repository has no working tree: its HEAD is what there is to run
    repositories = repositories_from_option(args.repos)  # a malformed --repo fails before the snapshot
    # The clock starts now and SIGTERM stops the command as Ctrl-C does, from before the
    # snapshot on: copying a large tree takes a while, and an interrupted copy is removed.
    progress = Progress()
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        if rev:
            target = commit_target(args.path, rev, snapshots, repositories)
        else:
            # What this command writes itself is no change of the tree, even inside it.
            target = working_tree_target(args.path, snapshots, _snapshot_progress(progress, args.path),
                                         own_paths=[output_dir, *own_paths(args.store, args.spool)],
                                         repositories=repositories)
        try:
            return _run_target(args, target, output_dir, progress)
        finally:
            target.remove_snapshot()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _snapshot_progress(progress, path: str, clock=time.monotonic):
    """Says how far the working tree's copy is: at once for a large tree, else once it has taken
    a while, then every few seconds. A small tree's copy says nothing (nor before a usage error)."""
    started = clock()
    last_said = None

    def report(copied: int, total: int | None) -> None:
        nonlocal last_said
        now = clock()
        if last_said is None:
            if (total or 0) < SNAPSHOT_SAY_FROM_FILES and now - started < SNAPSHOT_PROGRESS_EVERY_SECONDS:
                return
            progress.say(f"copying the working tree {path}" + (f" ({terminal.count(total, 'file')})" if total else ""))
            last_said = now
        if now - last_said >= SNAPSHOT_PROGRESS_EVERY_SECONDS:
            progress.say(f"copied {copied}/{total} files" if total else f"copied {copied} files")
            last_said = now

    return report


def _run_target(args: argparse.Namespace, target, output_dir: str, progress) -> int:
    from testlooper.local import containers
    from testlooper.local.recording import Recorder
    from testlooper.local.runner import RunnerOptions, summarize
    from testlooper.local.session import run_target
    from testlooper.planning import plan

    if target.definitions is None:
        from testlooper.repos.definitions import looked_for

        print(f"{target.note}: no definitions file, so nothing to run (looked for {looked_for()})", file=sys.stderr)
        return EXIT_PASSED
    selection = args.test_sets if (args.test_sets or args.tests) else ["all"]
    try:
        planned = plan(target.definitions, None, test_sets=selection, runs=args.runs, tests=args.tests)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    progress.total = sum(t["runs"] for t in planned["tasks"])
    try:  # before anything is said: a malformed --store URL is a usage error of one line
        recorder = (Recorder(args.store, progress.say, spool_dir=args.spool, output_dir=output_dir)
                    if target.record else None)
    except ValueError as exc:  # a malformed --store URL
        raise UserError(str(exc)) from None
    progress.say(f"running {target.note}: {terminal.count(len(planned['tasks']), 'task')}, "
                 f"{terminal.count(progress.total, 'run')}")
    options = RunnerOptions(output_dir=output_dir, jobs=args.jobs, isolation=args.isolation,
                            keep_workspaces=args.keep_workspaces, max_log_mb=args.max_log_mb)
    try:
        result = run_target(target, planned, recorder, options, progress)
    except containers.ContainerError as exc:
        raise UserError(str(exc)) from None
    outcomes, interrupted = result.outcomes, result.interrupted

    summary = summarize(outcomes)
    comparison = _compare(recorder, target) if recorder is not None else None
    if recorder is not None:
        recorder.close()
    if args.json:
        document = {"repo": target.repo_id, "commit": target.commit, "runs": [o.to_json() for o in outcomes],
                    "summary": summary}
        if comparison is not None:
            document["compared_with"] = comparison["previous"]
            document["classes"] = [{"task": t, "case": c, "class": k} for (t, c), k in sorted(comparison["classes"].items())]
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(render_summary(outcomes, summary, comparison, output_dir, recorder, terminal.Styler(terminal.colour_wanted())))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if summary["passed"] == sum(summary.values()) else EXIT_FAILED


def _compare(recorder, target) -> dict | None:
    """This commit's classes: each task's cases against that task's previous run on the
    first-parent line (see docs/decisions.md)."""
    from testlooper import gitio
    from testlooper.history import load_shown_history
    from testlooper.store import StoreUnavailable

    if recorder.store is None or recorder.down_reason or target.repo is None:
        return None
    line = gitio.first_parent_line(target.repo, target.commit, COMPARISON_DEPTH)
    try:
        tested = recorder.store.tested_commits(target.repo_id, line)
        history = load_shown_history(recorder.store, target.repo_id, line, limit=1, globs=[], tested=tested)
    except StoreUnavailable as exc:
        recorder.went_down(exc)
        return None
    previous = next((sha for sha in line[1:] if sha in tested), None)
    return {"previous": previous, "classes": history.classes.get(target.commit, {}),
            "counts": history.counts.get(target.commit, {})}


def render_summary(outcomes, summary, comparison, output_dir, recorder, styler: terminal.Styler) -> str:
    from testlooper.decisions.rules import task_result
    from testlooper.local.runner import final_attempts

    by_task: dict[str, list] = {}
    for outcome in final_attempts(outcomes):
        by_task.setdefault(outcome.task, []).append(outcome)
    rows = []
    for task, runs in by_task.items():
        results = [o.result for o in runs]
        passed = results.count("passed")
        cases = sum(len(o.cases) for o in runs)
        failed_cases = sum(1 for o in runs for c in o.cases if not c["success"])
        status = task_result(results)
        style = {"passed": "green", "flaky": "yellow"}.get(status, "red")
        attempts = max(o.attempt for o in runs)
        rows.append([task, terminal.kind_cell(runs[0].kind), terminal.Cell(status, style), f"{passed}/{len(runs)}",
                     f"{cases - failed_cases}/{cases}" if cases else "-",
                     terminal.duration(sum(o.duration_seconds for o in runs)),
                     f"{attempts}" if attempts > 1 else ""])
    lines = [terminal.heading("Results", styler),
             terminal.table(["task", "kind", "result", "runs passed", "cases passed", "time", "attempts"], rows, styler)]
    totals = ", ".join(f"{count} {name}" for name, count in summary.items() if count)
    lines.append("")
    lines.append(f"{terminal.count(sum(summary.values()), 'run')}: {totals or 'none'}")
    if comparison is not None:
        lines += _render_comparison(comparison, styler, _uncounted(outcomes))
    lines.append(f"logs and artifacts: {os.path.join(output_dir, 'runs')}")
    if recorder is not None and recorder.spooled:
        lines.append(styler(f"{terminal.count(recorder.spooled, 'result')} could not reach the history store and wait in "
                            f"{recorder.spool or ', '.join(recorder.spools)}", "yellow"))
    if recorder is not None and recorder.unkept:
        lines.append(styler(f"{terminal.count(len(recorder.unkept), 'result')} could not reach the history store and could not be "
                            "kept in a spool: they are only in this report", "red"))
    return "\n".join(lines)


def _uncounted(outcomes) -> list:
    """The runs that ended without a verdict on their cases (error, blocked, cancelled): the
    history counts none of their cases, so "every case passed" must not hide them."""
    from testlooper.local.runner import final_attempts
    from testlooper.store.base import UNCOUNTED_RESULTS

    return [o for o in final_attempts(outcomes) if o.result in UNCOUNTED_RESULTS]


def _render_comparison(comparison, styler, uncounted=()) -> list[str]:
    """Cases worth a look: every class but `good`; a `new` case shows its state when it is not good.
    Runs in `uncounted` are named after them: they tested nothing."""
    from testlooper.stats import case_state

    previous = comparison["previous"]
    rows = []
    for key, cls in sorted(comparison["classes"].items()):
        if cls == "new":
            state = case_state(*comparison["counts"][key]) if key in comparison["counts"] else "good"
            if state == "good":
                continue
            cls = f"new, {state}"
        if cls in NOTABLE_CLASSES or cls.startswith("new"):
            rows.append((key, cls))
    lines = [""]
    if not comparison["counts"]:
        lines.append("no run of this commit finished, so there is nothing to compare")
        return lines + _uncounted_lines(uncounted, styler)
    if previous is None:
        lines.append("first tested commit of this branch in the history: nothing to compare with yet")
    else:
        lines.append(f"compared with the nearest earlier tested commit ({previous[:12]}):")
    if not rows:
        if previous is not None:
            lines.append("  no counted case changed state" if uncounted else "  no case changed state")
        else:
            lines.append("  every counted case passed" if uncounted else "  every case passed")
    for (task, case), cls in rows:
        style = CLASS_STYLES.get(cls.split(", ")[-1])
        runs, failures = comparison["counts"].get((task, case), (0, 0))
        tally = f" ({runs - failures}/{runs} runs passed)" if runs else ""
        lines.append(f"  {styler(f'{cls:<10}', style)} {task}" + (f" :: {terminal.printable(case)}" if case else "")
                     + tally)
    return lines + _uncounted_lines(uncounted, styler)


def _uncounted_lines(uncounted, styler) -> list[str]:
    if not uncounted:
        return []
    counted = f"{len(uncounted)} run{'s' if len(uncounted) > 1 else ''}"
    lines = [styler(f"{counted} tested nothing, so no case of {'them' if len(uncounted) > 1 else 'it'} "
                    "is counted:", "red")]
    for outcome in uncounted:
        label = outcome.task if outcome.kind == "build" else f"{outcome.task} #{outcome.run_index + 1}"
        lines.append(f"  {outcome.result:<10} {label}" + (f": {terminal.printable(outcome.message)}"
                                                          if outcome.message else ""))
    return lines
