"""`testlooper watch`: poll a repository's branches and test each new head commit, until stopped."""

from __future__ import annotations

import argparse
import os
import signal
import time

from testlooper.cli import UserError, runs_option

DEFAULT_METRICS_PORT = 9464


def register(subparsers: argparse._SubParsersAction) -> None:
    from testlooper.store import DEFAULT_STORE_PATH

    parser = subparsers.add_parser(
        "watch",
        help="poll branches and test every new head commit, serving Prometheus metrics",
        description="Poll the repository's branches and test each new head commit as its triggers say "
        "(its changes against its first parent), recording results in the history store. Runs until "
        "stopped (Ctrl-C or SIGTERM).",
    )
    parser.add_argument("path", metavar="PATH", nargs="?", default=".", help="a git repository (default: .)")
    parser.add_argument("--branch", metavar="GLOB", dest="branches", action="append", default=[],
                        help="branches to test (repeatable; default: every local branch)")
    parser.add_argument("--interval", metavar="S", type=float, default=30.0, help="seconds between polls (default 30)")
    parser.add_argument("--fetch", action="store_true",
                        help="run `git fetch` before each poll and test the remote-tracking branches' heads too")
    parser.add_argument("--metrics-port", metavar="P", type=int, default=DEFAULT_METRICS_PORT,
                        help=f"serve Prometheus metrics on this port (default {DEFAULT_METRICS_PORT}; 0 turns them off)")
    parser.add_argument("--metrics-address", metavar="ADDR", default="127.0.0.1",
                        help="address the metrics listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--store", metavar="URL", default="", help=f"history store (default: {DEFAULT_STORE_PATH})")
    parser.add_argument("--runs", metavar="N", type=runs_option, help="run each test N times instead of its own `runs`")
    parser.add_argument("--jobs", metavar="N", type=int, default=0, help="runs at once (default: one per core)")
    parser.add_argument("--output", metavar="DIR", help="where logs, workspaces and snapshots go")
    parser.add_argument("--spool", metavar="DIR", help="where results wait while the history store is down "
                        "(default: the default store's folder; if DIR cannot be written, the --output folder)")
    parser.add_argument("--max-polls", metavar="N", type=int, default=0, help=argparse.SUPPRESS)  # for tests
    from testlooper.repos.definitions import add_repo_option

    add_repo_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from testlooper import gitio
    from testlooper.cli.run_cmd import checked_output_dir
    from testlooper.local.metrics import WatchMetrics
    from testlooper.local.progress import Progress
    from testlooper.local.recording import Recorder
    from testlooper.local.session import raise_keyboard_interrupt
    from testlooper.planning.planner import check_runs
    from testlooper.repos.definitions import repositories_from_option

    if args.interval <= 0:
        raise UserError("--interval must be more than 0 seconds")
    try:  # at once, not on the first commit to test
        check_runs(args.runs)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    args.repositories = repositories_from_option(args.repos)  # a malformed --repo is a usage error now
    repo = gitio.open_repo(args.path)
    output_dir = checked_output_dir(args.output)
    progress = Progress()
    try:
        recorder = Recorder(args.store, progress.say, spool_dir=args.spool, output_dir=output_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    metrics = WatchMetrics()
    if args.metrics_port:
        try:
            server = metrics.serve(args.metrics_port, args.metrics_address)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {args.metrics_address}:{args.metrics_port}: {exc}") from None
        progress.say(f"metrics on http://{args.metrics_address}:{server.server_port}/metrics")
    watcher = Watcher(args, repo, recorder, metrics, progress, output_dir)
    # SIGTERM stops the watcher as Ctrl-C does, between commits too (run_target handles it during
    # a run and then puts this handler back); without it, SIGTERM while polling or sleeping
    # killed the process at once (status 143), skipping the store's close.
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        watcher.loop()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        recorder.close()
    progress.say("stopped")
    return 0


class Watcher:
    def __init__(self, args, repo, recorder, metrics, progress, output_dir: str):
        from testlooper.local.target import repo_identity

        self.args = args
        self.repo = repo
        self.recorder = recorder
        self.metrics = metrics
        self.progress = progress
        self.output_dir = output_dir
        self.seen: set[str] = set()  # heads already tested, or untestable, in this process
        self.repo_id = repo_identity(repo)

    def loop(self) -> None:
        polls = 0
        globs = self.args.branches or ["*"]
        self.progress.say(f"watching {self.args.path} branches {', '.join(globs)} every {self.args.interval:g}s")
        while True:
            self.poll(globs)
            polls += 1
            if self.args.max_polls and polls >= self.args.max_polls:
                return
            time.sleep(self.args.interval)

    def poll(self, globs: list[str]) -> None:
        from testlooper import gitio

        if self.args.fetch:
            try:
                self.repo.git.fetch("--prune", "--quiet")
            except Exception as exc:  # a git host down must not stop the watcher
                self.progress.say(f"warning: git fetch failed: {str(exc).strip().splitlines()[-1]}")
        self.metrics.last_poll.set_to_current_time()
        heads = gitio.branches(self.repo, globs)
        if self.args.fetch:
            heads.update(self.remote_heads(globs))
        new = {}
        for branch, sha in sorted(heads.items()):
            if sha not in self.seen:
                new.setdefault(sha, branch)
        for sha, branch in new.items():
            self.test(sha, branch)
            self.seen.add(sha)

    def remote_heads(self, globs: list[str]) -> dict[str, str]:
        from testlooper.planning import match_glob

        output = self.repo.git.for_each_ref("--format=%(objectname) %(refname:short)", "refs/remotes/")
        heads = {}
        for line in output.splitlines():
            sha, name = line.split(" ", 1)
            branch = name.split("/", 1)[-1]
            if branch != "HEAD" and any(match_glob(glob, branch) for glob in globs):
                heads[name] = sha
        return heads

    def recorded_results(self, sha: str, definitions: dict | None = None) -> dict[str, list[str]] | None:
        """What the store holds of this commit (`final_results`), or None if it cannot say.
        Another repository's builds (`external_builds`) are recorded under that repository and
        its pinned commit: their results are looked up there, under their planned names."""
        from testlooper.local.recording import final_results
        from testlooper.store import StoreError

        if self.recorder.store is None or self.recorder.down_reason:
            return None
        try:
            results = final_results(self.recorder.store.runs(self.repo_id, sha))
            for key, task in (definitions or {}).get("external_builds", {}).items():
                where = self.pinned_repo_id(definitions["repos"][task["repo"]])
                if where is not None:
                    theirs = final_results(self.recorder.store.runs(where, definitions["repos"][task["repo"]]["commit"]))
                    if task["name"] in theirs:
                        results[key] = theirs[task["name"]]
            return results
        except StoreError as exc:
            self.recorder.went_down(exc)
            return None

    def pinned_repo_id(self, entry: dict) -> str | None:
        from testlooper.definitions import RepositoryLookupError
        from testlooper.local.target import repo_identity

        try:
            return repo_identity(self.args.repositories.repo(entry["repository"]))
        except RepositoryLookupError:
            return None

    def still_to_run(self, sha: str, planned: dict, definitions: dict | None = None) -> dict:
        """The planned runs the store has no counted result of (a watch stopped part way
        through this commit left them cancelled or missing); all of them if it cannot say."""
        from testlooper.planning.resume import remaining_plan

        recorded = self.recorded_results(sha, definitions)
        return remaining_plan(planned, recorded) if recorded else planned

    def test(self, sha: str, branch: str) -> None:
        from testlooper import gitio
        from testlooper.definitions import DefinitionsError
        from testlooper.local.runner import RunnerOptions, summarize
        from testlooper.local.session import run_target
        from testlooper.local.target import commit_target
        from testlooper.planning import plan
        from testlooper.repos.definitions import definitions_at_commit, pinned_changes_at, print_warning

        # Planned before anything is exported: a head tested in full already needs no snapshot.
        try:
            definitions = definitions_at_commit(self.repo, sha, repositories=self.args.repositories,
                                                warn=print_warning)
            planned = None if definitions is None else plan(
                definitions, gitio.changed_files(self.repo, sha), runs=self.args.runs,
                pinned_changes=pinned_changes_at(self.repo, sha, definitions, self.args.repositories))
        except (DefinitionsError, ValueError, gitio.GitError) as exc:
            self.progress.say(f"new head of {branch}: {sha[:12]}")
            self.untestable(sha, exc)
            return
        remaining = planned
        if planned is not None and planned["tasks"]:
            remaining = self.still_to_run(sha, planned, definitions)
            if not remaining["tasks"]:
                return  # every planned run has a counted result: tested
        self.progress.say(f"new head of {branch}: {sha[:12]}")
        if remaining is not planned:
            planned_runs = sum(t["runs"] for t in planned["tasks"])
            self.progress.say(f"{sha[:12]} was tested only in part: running the {sum(t['runs'] for t in remaining['tasks'])} "
                              f"of its {planned_runs} planned runs (with the builds they need) that have no result")
            planned = remaining
        if planned is None:
            self.metrics.commits.labels("no_definitions").inc()
            self.progress.say(f"{sha[:12]} has no definitions file: nothing to test")
            return
        try:
            target = commit_target(self.args.path, sha, os.path.join(self.output_dir, "sources"),
                                   self.args.repositories)
        except (DefinitionsError, gitio.GitError) as exc:
            self.untestable(sha, exc)
            return
        try:
            target.branch = branch
            self.progress.say(planned["reason"])
            self.progress.total, self.progress.done = sum(t["runs"] for t in planned["tasks"]), 0
            options = RunnerOptions(output_dir=self.output_dir, jobs=self.args.jobs)
            result = run_target(target, planned, self.recorder, options, self.progress,
                                on_outcome=self.metrics.outcome, on_queue=self.metrics.queued)
        finally:
            target.remove_snapshot()  # a long watch must not fill the disk with old commits
        self.metrics.queued(0, 0)
        self.metrics.commits.labels("tested").inc()
        totals = ", ".join(f"{n} {name}" for name, n in summarize(result.outcomes).items() if n)
        self.progress.say(f"{sha[:12]} on {branch}: {totals or 'nothing ran'}")
        if result.interrupted:
            raise KeyboardInterrupt

    def untestable(self, sha: str, exc: Exception) -> None:
        self.metrics.commits.labels("untestable").inc()
        self.progress.say(f"{sha[:12]} is untestable: {exc}")
