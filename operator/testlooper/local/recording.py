"""Results into the history store, and never lost: when the store is down, finished runs go to a
spool file, replayed into the store by the next command that reaches it."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

from testlooper.store import (
    CaseResult, RunRecord, StoreUnavailable, default_store_path, open_store, replay_spool, store_identity,
    write_spool,
)

# While the store is down, a Recorder asks it again at most this often (on the next record).
RETRY_SECONDS = 30.0


def spool_path_for(store_url: str) -> str:
    """One spool per store, beside the default store, so a replay goes to the store it was for.

    Named from the store's identity (`store_identity`), not from the URL as typed: a path,
    the same path relative or as `sqlite:///...`, and "" for the default file share one spool.
    """
    digest = hashlib.sha256(store_identity(store_url).encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(default_store_path()), f"unrecorded-{digest}.jsonl")


def open_store_replaying_spool(url: str):
    """The store at `url`, with any results an earlier run could not record replayed into it
    first, so that what is shown is complete."""
    import os
    import sys

    from testlooper.errors import UserError
    from testlooper.store import open_store, replay_spool

    try:
        store = open_store(url or None)
    except ValueError as exc:  # a malformed URL
        raise UserError(str(exc)) from None
    spool = spool_path_for(url)
    if os.path.exists(spool):
        count = replay_spool(store, spool)
        if count:
            print(f"recorded {count} results that an earlier run kept in {spool}", file=sys.stderr)
    return store


class Recorder:
    """Records each finished run in the store; while the store is down, spools it instead and
    asks the store again at most every `retry_seconds`. Once it answers, the spool is replayed
    and runs go to the store again."""

    def __init__(self, store_url: str | None, say, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.url = store_url or ""
        self.say = say
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.spool = spool_path_for(self.url)
        self.spooled = 0  # results of this process still in the spool
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

    def replay(self) -> None:
        if not os.path.exists(self.spool):
            return
        try:
            count = replay_spool(self.store, self.spool)
        except StoreUnavailable as exc:
            self.went_down(exc)
            return
        if count:
            self.say(f"recorded {count} results that an earlier run kept in {self.spool}")

    def allocate_run_indexes(self, planned: dict, repo_id: str, commit: str) -> None:
        """Number each planned task's runs from indexes the store allocates to this command
        alone (`first_run_index`), so that its runs add to the commit's history and never
        replace those of another command, earlier or running at the same time.

        With the store down the runs are numbered from 0; replaying the spool moves them to
        indexes allocated then (`replay_spool`).
        """
        if self.store is None or self.down_reason:
            return
        try:
            for task in planned["tasks"]:
                task["first_run_index"] = self.store.allocate_run_indexes(
                    repo_id, commit, task["name"], task["runs"])
        except StoreUnavailable as exc:
            self.went_down(exc)

    def record(self, record: RunRecord) -> None:
        if self.down_reason and self.clock() - self.last_try >= self.retry_seconds:
            self.try_again()
        if not self.down_reason:
            try:
                self.store.record_run(record)
                return
            except StoreUnavailable as exc:
                self.went_down(exc)
        os.makedirs(os.path.dirname(self.spool), exist_ok=True)
        write_spool(self.spool, [record])
        self.spooled += 1

    def try_again(self) -> None:
        """Ask the store whether it answers; if it does, replay the spool and be up again."""
        try:
            if self.store is None:
                self.store = open_store(self.url or None)
            self.store.ping()
            count = replay_spool(self.store, self.spool)
        except StoreUnavailable:
            self.last_try = self.clock()
            return
        self.down_reason = ""
        self.spooled = 0
        self.say(f"history store {self.store.url} is reachable again; recorded {count} kept results")

    def went_down(self, exc: Exception) -> None:
        self.last_try = self.clock()
        if not self.down_reason:
            self.down_reason = str(exc)
            self.say(f"warning: {str(exc).rstrip('.')}. Results are kept in {self.spool} and recorded when the "
                     f"store is back (it is asked again every {self.retry_seconds:g} s, and the next testlooper "
                     "command that reaches it records them too).")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def run_record(outcome, target) -> RunRecord:
    return RunRecord(
        repo=target.repo_id, commit=target.commit, task=outcome.task, kind=outcome.kind,
        run_index=outcome.run_index, attempt=outcome.attempt, result=outcome.result,
        duration_seconds=outcome.duration_seconds, exit_code=outcome.exit_code, started_at=outcome.started_at,
        branch=target.branch,
        cases=[CaseResult(c["name"], bool(c["success"]), c.get("duration_seconds")) for c in outcome.cases],
    )
