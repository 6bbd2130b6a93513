"""Results into the history store, and never lost: when the store is down, finished runs go to a
spool file, replayed into the store by the next command that reaches it."""

from __future__ import annotations

import hashlib
import os

from testlooper.store import (
    CaseResult, RunRecord, StoreUnavailable, default_store_path, open_store, replay_spool, write_spool,
)


def spool_path_for(store_url: str) -> str:
    """One spool per store, beside the default store, so a replay goes to the store it was for."""
    digest = hashlib.sha256((store_url or "").encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(default_store_path()), f"unrecorded-{digest}.jsonl")


class Recorder:
    def __init__(self, store_url: str | None, say):
        self.url = store_url or ""
        self.say = say
        self.spool = spool_path_for(self.url)
        self.spooled = 0
        self.store = None
        self.down_reason = ""
        try:
            self.store = open_store(store_url)
            self.store.ping()
        except StoreUnavailable as exc:
            self.went_down(exc)
            return
        self.replay()

    @property
    def display_url(self) -> str:
        return self.url or f"sqlite://{default_store_path()}"

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

    def record(self, record: RunRecord) -> None:
        if self.store is not None and not self.down_reason:
            try:
                self.store.record_run(record)
                return
            except StoreUnavailable as exc:
                self.went_down(exc)
        os.makedirs(os.path.dirname(self.spool), exist_ok=True)
        write_spool(self.spool, [record])
        self.spooled += 1

    def went_down(self, exc: Exception) -> None:
        if not self.down_reason:
            self.down_reason = str(exc)
            self.say(f"warning: {str(exc).rstrip('.')}. Results are kept in {self.spool} and recorded when the "
                     "store is back (by the next testlooper command that reaches it).")

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
