"""Results into the history store, and never lost: when the store is down, finished runs go to a
spool file, replayed into the store by the next command that reaches it."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

from testlooper import terminal
from testlooper.local.output import why_unwritable

from testlooper.store import (
    CaseResult, RunRecord, StoreError, StoreReadOnly, StoreUnavailable, default_store_path, open_store,
    record_kept_runs, replay_spool, store_identity, write_spool,
)

# While the store is down, a Recorder asks it again at most this often (on the next record).
RETRY_SECONDS = 30.0


def default_spool_dir() -> str:
    """Beside the default store: the folder the default store itself needs writable."""
    return os.path.dirname(default_store_path())


def spool_path_for(store_url: str, spool_dir: str | None = None) -> str:
    """One spool per store, in `spool_dir` (default: beside the default store), so a replay goes
    to the store it was for.

    Named from the store's identity (`store_identity`), not from the URL as typed: a path,
    the same path relative or as `sqlite:///...`, and "" for the default file share one spool.
    """
    digest = hashlib.sha256(store_identity(store_url).encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(spool_dir or default_spool_dir()), f"unrecorded-{digest}.jsonl")


def own_paths(store_url: str, spool_dir: str | None) -> list[str]:
    """The files and folders a command of this store and spool writes itself: never a change
    of the working tree they lie in, never part of its snapshot."""
    paths = [os.path.abspath(spool_dir or default_spool_dir())]
    identity = store_identity(store_url)
    if identity.startswith("sqlite://"):
        database = identity[len("sqlite://"):]
        paths += [database + suffix for suffix in ("", "-wal", "-shm", "-journal")]
    return paths


def open_store_replaying_spool(url: str, spool_dir: str | None = None):
    """The store at `url`, with any results an earlier run could not record replayed into it
    first, so that what is shown is complete. A read-only SQLite store is opened for reading,
    and its spool is left for a command that can write the store."""
    import sys

    from testlooper.errors import UserError

    spool = spool_path_for(url, spool_dir)
    try:
        store = open_store(url or None)
    except ValueError as exc:  # a malformed URL
        raise UserError(str(exc)) from None
    except StoreReadOnly:
        store = open_store(url or None, read_only=True)
        if os.path.exists(spool):
            print(f"note: the history store {store.url} is read-only, so the results kept in {spool} "
                  "are not recorded in it yet, nor shown", file=sys.stderr)
        return store
    if os.path.exists(spool):
        count = replay_spool(store, spool)
        if count:
            print(f"recorded {terminal.count(count, 'result')} that an earlier run kept in {spool}", file=sys.stderr)
    return store


class Recorder:
    """Records each finished run in the store; while the store is down, spools it instead and
    asks the store again at most every `retry_seconds`. Once it answers, the spool is replayed
    and runs go to the store again.

    The spool is in `spool_dir` (default: beside the default store). When it cannot be written
    there, it is in `output_dir` (the runs' output folder), said before the first run; when it
    cannot be written anywhere, results the store cannot take are kept only in memory
    (`unkept`: the command's own report still has them).
    """

    def __init__(self, store_url: str | None, say, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, spool_dir: str | None = None,
                 output_dir: str | None = None):
        self.url = store_url or ""
        self.say = say
        self.retry_seconds = retry_seconds
        self.clock = clock
        # Where results may be kept, in order; every one of them is replayed.
        self.spools = [spool_path_for(self.url, spool_dir)]
        if output_dir and spool_path_for(self.url, output_dir) not in self.spools:
            self.spools.append(spool_path_for(self.url, output_dir))
        self.spool = self._first_writable_spool()
        self.spooled = 0  # results of this process still in a spool
        self.unkept: list[RunRecord] = []  # results the store could not take and no spool could keep
        self.store = None
        self.down_reason = ""
        self.last_try = 0.0  # when the store last failed, by `clock`
        try:
            self.store = open_store(store_url)
            self.store.ping()
        except StoreUnavailable as exc:
            self.went_down(exc)
            return
        self.replay()

    def _first_writable_spool(self) -> str | None:
        problems = []
        for spool in self.spools:
            problem = why_unwritable(os.path.dirname(spool))
            if problem is None:
                if problems:
                    self.say(f"warning: cannot write a spool in {'; '.join(problems)}. Results the history store "
                             f"cannot take will be kept in {spool}, and recorded by the next `testlooper run` or "
                             f"`watch` with this --output, or by `testlooper history --spool "
                             f"{os.path.dirname(spool)}`.")
                return spool
            problems.append(f"{os.path.dirname(spool)} ({problem})")
        self.say(f"warning: cannot write a spool in {'; '.join(problems)}. If the history store cannot take a "
                 "result, it will not be kept anywhere but in this command's own report (give --spool DIR).")
        return None

    def replay(self) -> None:
        for spool in self.spools:
            try:
                count = self._replay(spool)
            except StoreError as exc:
                self.went_down(exc)
                return
            if count:
                self.say(f"recorded {terminal.count(count, 'result')} that an earlier run kept in {spool}")

    def _replay(self, spool: str) -> int:
        """Replays one spool; one that cannot be read or rewritten is left as it is, said."""
        try:
            return replay_spool(self.store, spool)
        except OSError as exc:
            self.say(f"warning: cannot replay the spool {spool} ({exc.strerror or exc}); its results stay there")
            return 0

    def allocate_run_indexes(self, planned: dict, repo_id: str, commit: str, recorded_as=None) -> None:
        """Number each planned task's runs from indexes the store allocates to this command
        alone (`first_run_index`), so that its runs add to the commit's history and never
        replace those of another command, earlier or running at the same time.

        With the store down the runs are numbered from 0; replaying the spool moves them to
        indexes allocated then (`replay_spool`). `recorded_as(task) -> (repo, commit, name)` says
        where a task's runs go when that is not `repo_id` and `commit` (another repository's build).
        """
        if self.store is None or self.down_reason:
            return
        try:
            for task in planned["tasks"]:
                repo, at, name = recorded_as(task) if recorded_as else (repo_id, commit, task["name"])
                task["first_run_index"] = self.store.allocate_run_indexes(repo, at, name, task["runs"])
        except StoreError as exc:
            self.went_down(exc)

    def record(self, record: RunRecord) -> None:
        if self.down_reason and self.clock() - self.last_try >= self.retry_seconds:
            self.try_again()
        if not self.down_reason:
            try:
                self.store.record_run(record)
                return
            except StoreError as exc:  # down, or damaged under us: keep the result either way
                self.went_down(exc)
        self.keep(record)

    def keep(self, record: RunRecord) -> None:
        """Into the spool; if it cannot be written (a full disk), into the next one."""
        while self.spool is not None:
            try:
                os.makedirs(os.path.dirname(self.spool), exist_ok=True)
                write_spool(self.spool, [record])
                self.spooled += 1
                return
            except OSError as exc:
                later = self.spools[self.spools.index(self.spool) + 1:]
                following = next((s for s in later if why_unwritable(os.path.dirname(s)) is None), None)
                self.say(f"warning: cannot write the spool {self.spool} ({exc.strerror or exc}); "
                         + (f"results are kept in {following} from now on" if following else
                            "results the history store cannot take are now kept only in this command's report"))
                self.spool = following
        self.unkept.append(record)

    def try_again(self) -> None:
        """Ask the store whether it answers; if it does, replay the spools and be up again."""
        count = 0
        try:
            if self.store is None:
                self.store = open_store(self.url or None)
            self.store.ping()
            for spool in self.spools:
                count += self._replay(spool)
            count += record_kept_runs(self.store, self.unkept)
        except StoreError:
            self.last_try = self.clock()
            return
        self.unkept = []
        self.down_reason = ""
        self.spooled = 0
        self.say(f"history store {self.store.url} is reachable again; recorded {count} kept results")

    def went_down(self, exc: Exception) -> None:
        self.last_try = self.clock()
        if not self.down_reason:
            self.down_reason = str(exc)
            if self.spool:
                kept = (f"Results are kept in {self.spool} and recorded when the store is back (it is asked "
                        f"again every {self.retry_seconds:g} s, and the next testlooper command that reaches it "
                        "records them too).")
            else:
                kept = ("No spool can be written, so results are kept only in this command's report, and "
                        f"recorded if the store answers before it ends (it is asked again every "
                        f"{self.retry_seconds:g} s).")
            self.say(f"warning: {str(exc).rstrip('.')}. {kept}")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def final_results(runs: list[RunRecord]) -> dict[str, list[str]]:
    """`{task: [result of the final attempt of each recorded run index]}`."""
    finals: dict[tuple[str, int], RunRecord] = {}
    for run in runs:
        key = (run.task, run.run_index)
        if key not in finals or run.attempt > finals[key].attempt:
            finals[key] = run
    results: dict[str, list[str]] = {}
    for (task, _index), run in sorted(finals.items()):
        results.setdefault(task, []).append(run.result)
    return results


def run_record(outcome, target) -> RunRecord:
    return RunRecord(
        repo=target.repo_id, commit=target.commit, task=outcome.task, kind=outcome.kind,
        run_index=outcome.run_index, attempt=outcome.attempt, result=outcome.result,
        duration_seconds=outcome.duration_seconds, exit_code=outcome.exit_code, started_at=outcome.started_at,
        branch=target.branch,
        cases=[CaseResult(c["name"], bool(c["success"]), c.get("duration_seconds")) for c in outcome.cases],
    )


def pinned_run_record(outcome, task: dict, pinned) -> RunRecord:
    """A run of another repository's build, under that repository, its pinned commit and the
    build's own name there."""
    repository_pin = task["repo"]
    return RunRecord(
        repo=pinned.repo_id(repository_pin), commit=pinned.where(repository_pin)[1], task=task["name"],
        kind=outcome.kind, run_index=outcome.run_index, attempt=outcome.attempt, result=outcome.result,
        duration_seconds=outcome.duration_seconds, exit_code=outcome.exit_code, started_at=outcome.started_at,
        branch="", cases=[CaseResult(c["name"], bool(c["success"]), c.get("duration_seconds")) for c in outcome.cases],
    )
