"""`testlooper run`: run a commit's builds and tests here, as often as asked, and record every case."""

from __future__ import annotations

import argparse
import json
import os
import sys

from testlooper import terminal
from testlooper.errors import UserError

NOTABLE_CLASSES = ("broken", "fixed", "flaky", "bad", "new", "removed")
CLASS_STYLES = {"broken": "red", "bad": "red", "fixed": "green", "flaky": "yellow", "new": "blue", "removed": "dim"}
EXIT_PASSED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
# How far down the first-parent line a run looks for each task's previous results.
COMPARISON_DEPTH = 1000


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
    parser.add_argument("--runs", metavar="N", type=int, help="run each test N times instead of its own `runs`")
    parser.add_argument("--jobs", metavar="N", type=int, default=0, help="runs at once (default: one per core)")
    parser.add_argument("--store", metavar="URL", default="",
                        help=f"history store: a path or sqlite:///ABS/PATH.db, or redis://HOST:PORT/DB "
                        f"(default: {DEFAULT_STORE_PATH})")
    parser.add_argument("--output", metavar="DIR", help="where logs (DIR/runs), workspaces (DIR/work) and "
                        "source snapshots (DIR/sources) go (default: the default store's folder)")
    parser.add_argument("--isolation", choices=("host", "container"), default="host",
                        help="run tasks on this host (default) or in their images through docker or podman")
    parser.add_argument("--keep-workspaces", action="store_true", help="keep each run's workspace for debugging")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.set_defaults(run=run)


def default_output_dir() -> str:
    from testlooper.store import default_store_path

    return os.path.dirname(default_store_path())


def run(args: argparse.Namespace) -> int:
    from testlooper.local.target import commit_target, working_tree_target
    from testlooper.planning.planner import check_runs

    if args.jobs < 0:
        raise UserError(f"--jobs must be 0 or more, not {args.jobs}")
    try:  # before the snapshot: `--runs 30000000` fails at once
        check_runs(args.runs)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    output_dir = os.path.abspath(args.output or default_output_dir())
    snapshots = os.path.join(output_dir, "sources")
    target = commit_target(args.path, args.rev, snapshots) if args.rev else working_tree_target(args.path, snapshots)
    try:
        return _run_target(args, target, output_dir)
    finally:
        target.remove_snapshot()


def _run_target(args: argparse.Namespace, target, output_dir: str) -> int:
    from testlooper.local import containers
    from testlooper.local.progress import Progress
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

    progress = Progress(total_runs=sum(t["runs"] for t in planned["tasks"]))
    try:  # before anything is said: a malformed --store URL is a usage error of one line
        recorder = Recorder(args.store, progress.say) if target.record else None
    except ValueError as exc:  # a malformed --store URL
        raise UserError(str(exc)) from None
    _continue_run_indexes(planned, recorder, target)
    progress.say(f"running {target.note}: {len(planned['tasks'])} tasks, {progress.total} runs")
    options = RunnerOptions(output_dir=output_dir, jobs=args.jobs, isolation=args.isolation,
                            keep_workspaces=args.keep_workspaces)
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


def _continue_run_indexes(planned: dict, recorder, target) -> None:
    """Running a commit again adds runs to its history rather than replacing the earlier ones:
    each task's run indexes continue after those already recorded for this commit."""
    from testlooper.store import StoreUnavailable

    if recorder is None or recorder.store is None or recorder.down_reason:
        return
    try:
        recorded = recorder.store.runs(target.repo_id, target.commit)
    except StoreUnavailable as exc:
        recorder.went_down(exc)
        return
    following: dict[str, int] = {}
    for run in recorded:
        following[run.task] = max(following.get(run.task, 0), run.run_index + 1)
    for task in planned["tasks"]:
        task["first_run_index"] = following.get(task["name"], 0)


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
        status = "passed" if passed == len(runs) else ("flaky" if passed else _worst(results))
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
    lines.append(f"{sum(summary.values())} runs: {totals or 'none'}")
    if comparison is not None:
        lines += _render_comparison(comparison, styler)
    lines.append(f"logs and artifacts: {os.path.join(output_dir, 'runs')}")
    if recorder is not None and recorder.spooled:
        lines.append(styler(f"{recorder.spooled} results could not reach the history store and wait in "
                            f"{recorder.spool}", "yellow"))
    return "\n".join(lines)


def _render_comparison(comparison, styler) -> list[str]:
    """Cases worth a look: every class but `good`; a `new` case shows its state when it is not good."""
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
        return lines
    if previous is None:
        lines.append("first tested commit of this branch in the history: nothing to compare with yet")
    else:
        lines.append(f"compared with the nearest earlier tested commit ({previous[:12]}):")
    if not rows:
        lines.append("  no case changed state" if previous is not None else "  every case passed")
    for (task, case), cls in rows:
        style = CLASS_STYLES.get(cls.split(", ")[-1])
        runs, failures = comparison["counts"].get((task, case), (0, 0))
        tally = f" ({runs - failures}/{runs} runs passed)" if runs else ""
        lines.append(f"  {styler(f'{cls:<10}', style)} {task}" + (f" :: {case}" if case else "") + tally)
    return lines


def _worst(results: list[str]) -> str:
    for result in ("error", "timeout", "failed", "blocked", "cancelled"):
        if result in results:
            return result
    return results[0]
