"""What to start next: a pure state machine over a plan's runs.

The runner feeds it observations (a run finished with a result, time passed) and asks it for
actions (start these runs, these are blocked). It does no I/O, so its rules are tested
directly and the cluster operator can reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PENDING, WAITING_RETRY, RUNNING, DONE = "pending", "waiting-retry", "running", "done"


@dataclass
class Capacity:
    jobs: int
    cores: int
    ram_gb: float


@dataclass
class Run:
    task: str
    kind: str
    run_index: int
    attempt: int = 1
    state: str = PENDING
    result: str | None = None
    not_before: float = 0.0  # a retried build waits until then
    cores: int = 0
    ram_gb: float = 0.0
    reason: str = ""  # why it was blocked or cancelled

    @property
    def label(self) -> str:
        return f"{self.task}" if self.kind == "build" else f"{self.task} #{self.run_index + 1}"


@dataclass
class Actions:
    start: list[Run] = field(default_factory=list)
    blocked: list[Run] = field(default_factory=list)


class Schedule:
    """The runs of one plan: builds before their consumers, within the machine's capacity."""

    def __init__(self, plan_tasks: list[dict], tasks: dict[str, dict], capacity: Capacity):
        self.capacity = capacity
        self.tasks = tasks
        self.depends_on = {t["name"]: list(t.get("depends_on", [])) for t in plan_tasks}
        self.runs: list[Run] = []
        for planned in plan_tasks:
            task = tasks[planned["name"]]
            first = int(planned.get("first_run_index", 0))  # runs an earlier command recorded come first
            for index in range(first, first + planned["runs"]):
                self.runs.append(Run(
                    task=planned["name"], kind=planned["kind"], run_index=index,
                    # 0 cores: "don't care", limited only by --jobs.
                    cores=self.fit(int(task.get("min_cores") or 0), capacity.cores),
                    ram_gb=self.fit(float(task.get("min_ram_gb") or 0), capacity.ram_gb),
                ))
        self.build_outcome: dict[str, str] = {}  # build name -> "passed" | "failed"

    @staticmethod
    def fit(need, available):
        """A task asking more than this machine has runs alone rather than never."""
        return min(need, available) if available else need

    # -- observations -----------------------------------------------------------------------

    def finished(self, run: Run, result: str, now: float) -> Run | None:
        """Record a result. Returns the retry that was scheduled for a failed build, if any."""
        run.result = result
        run.state = DONE
        if run.kind != "build":
            return None
        task = self.tasks[run.task]
        if result in ("failed", "timeout", "error") and run.attempt <= int(task.get("max_retries") or 0):
            retry = Run(task=run.task, kind=run.kind, run_index=run.run_index, attempt=run.attempt + 1,
                        state=WAITING_RETRY, not_before=now + float(task.get("retry_wait_seconds") or 0),
                        cores=run.cores, ram_gb=run.ram_gb)
            self.runs.append(retry)
            return retry
        if result != "cancelled":
            self.build_outcome[run.task] = "passed" if result == "passed" else "failed"
        return None

    def cancel_waiting(self, reason: str) -> list[Run]:
        """Stop everything not yet started (Ctrl-C); returns the runs now cancelled."""
        cancelled = []
        for run in self.runs:
            if run.state in (PENDING, WAITING_RETRY):
                run.state, run.result, run.reason = DONE, "cancelled", reason
                cancelled.append(run)
        return cancelled

    # -- decisions ---------------------------------------------------------------------------

    def next_actions(self, now: float) -> Actions:
        actions = Actions()
        running = [r for r in self.runs if r.state == RUNNING]
        jobs = self.capacity.jobs - len(running)
        cores = self.capacity.cores - sum(r.cores for r in running)
        ram = self.capacity.ram_gb - sum(r.ram_gb for r in running)
        for run in self.runs:
            if run.state not in (PENDING, WAITING_RETRY):
                continue
            failed = [b for b in self.depends_on.get(run.task, []) if self.build_outcome.get(b) == "failed"]
            if failed:
                run.state, run.result = DONE, "blocked"
                run.reason = "needs build " + ", ".join(failed) + ", which failed"
                actions.blocked.append(run)
                if run.kind == "build":
                    self.build_outcome[run.task] = "failed"  # its own consumers are blocked too
                continue
            if not self.inputs_ready(run) or run.not_before > now:
                continue
            if jobs <= 0 or run.cores > cores or run.ram_gb > ram:
                continue  # needs are capped to the machine (fit), so an idle machine fits any run
            run.state = RUNNING
            actions.start.append(run)
            jobs -= 1
            cores -= run.cores
            ram -= run.ram_gb
        if actions.blocked:  # a blocked build may block more runs: decide those now too
            more = self.next_actions(now)
            actions.blocked.extend(more.blocked)
            actions.start.extend(more.start)
        return actions

    def inputs_ready(self, run: Run) -> bool:
        return all(self.build_outcome.get(b) == "passed" for b in self.depends_on.get(run.task, []))

    def seconds_until_next_retry(self, now: float) -> float:
        waits = [r.not_before - now for r in self.runs if r.state == WAITING_RETRY and self.inputs_ready(r)]
        return max(0.0, min(waits)) if waits else math.inf

    def queue_counts(self) -> tuple[int, int]:
        """(runs waiting to start, runs running)."""
        waiting = sum(1 for r in self.runs if r.state in (PENDING, WAITING_RETRY))
        return waiting, sum(1 for r in self.runs if r.state == RUNNING)

    @property
    def done(self) -> bool:
        return all(r.state == DONE for r in self.runs)

    @property
    def running(self) -> list[Run]:
        return [r for r in self.runs if r.state == RUNNING]
