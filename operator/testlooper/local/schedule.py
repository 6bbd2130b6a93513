"""What to start next: a pure state machine over a plan's runs.

The runner feeds it observations (a run finished with a result, time passed) and asks it for
actions (start these runs, these are blocked). It does no I/O, so its rules are tested
directly. The rules themselves (retries, blocking, fitting a task's cores and RAM to a machine)
are plain functions in decisions/rules.py, which the cluster operator's phase machine shares.

Every step costs what changed, not the size of the plan: a task's runs not yet started are a
counter rather than a list, the runs ready to start wait in one heap per size of run (cores and
RAM), and a build's result only touches the tasks that need it. So 100,000 runs schedule in
about the time of 1,000 (bench/bench_schedule.py measures it).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

# The rules live below both shells, shared with the cluster operator; they are re-exported here.
from testlooper.decisions.rules import (  # noqa: F401
    RETRIED_RESULTS, blocked_reason, build_verdict, fit, fits, retry_wait,
)

PENDING, WAITING_RETRY, RUNNING, DONE = "pending", "waiting-retry", "running", "done"


# -- the state machine -------------------------------------------------------------------------

@dataclass
class Capacity:
    jobs: int
    cores: int
    ram_gb: float


@dataclass
class Free:
    """What the running runs leave of the capacity."""

    jobs: int
    cores: float
    ram_gb: float


@dataclass(eq=False)  # compared by identity: two runs are never the same run
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


@dataclass(eq=False)
class _Task:
    """One planned task: its runs not yet started are the indexes [next_index, end_index)."""

    name: str
    kind: str
    position: int  # in the plan: earlier tasks start first
    next_index: int
    end_index: int
    cores: int
    ram_gb: float
    missing: set[str]  # builds it needs that have not passed yet
    queued: bool = False  # in a ready heap

    @property
    def unstarted(self) -> int:
        return self.end_index - self.next_index


class Schedule:
    """The runs of one plan: builds before their consumers, within the machine's capacity.

    The order is the plan's, then retries in the order they were decided; among the runs ready
    to start, the first one that fits what is free starts, until nothing more fits.
    """

    def __init__(self, plan_tasks: list[dict], tasks: dict[str, dict], capacity: Capacity):
        self.capacity = capacity
        self.tasks = tasks
        self.depends_on = {t["name"]: list(t.get("depends_on", [])) for t in plan_tasks}
        self.build_outcome: dict[str, str] = {}  # build name -> "passed" | "failed"
        self.free = Free(capacity.jobs, capacity.cores, capacity.ram_gb)
        self._tasks: dict[str, _Task] = {}
        self._consumers: dict[str, list[_Task]] = {}  # build -> the planned tasks that need it
        for position, planned in enumerate(plan_tasks):
            task = tasks[planned["name"]]
            first = int(planned.get("first_run_index", 0))  # runs an earlier command recorded come first
            entry = _Task(
                name=planned["name"], kind=planned["kind"], position=position, next_index=first,
                end_index=first + int(planned["runs"]),
                # 0 cores: "don't care", limited only by --jobs.
                cores=fit(int(task.get("min_cores") or 0), capacity.cores),
                ram_gb=fit(float(task.get("min_ram_gb") or 0), capacity.ram_gb),
                missing=set(self.depends_on[planned["name"]]),
            )
            self._tasks[entry.name] = entry
            for build in entry.missing:
                self._consumers.setdefault(build, []).append(entry)
        # (cores, ram) -> heap of (0, task position, -, task) for a task's next run, or
        # (1, sequence, run, -) for a retry whose wait is over.
        self._ready: dict[tuple[int, float], list] = {}
        self._retries: list = []  # heap of (not_before, sequence, run): retries still waiting
        self._sequence = itertools.count()
        self._running: dict[int, Run] = {}  # id(run) -> run, in the order they started
        self._to_block: list[str] = []  # builds that failed, whose consumers are not blocked yet
        self._ready_retries = 0  # retries in the ready heaps
        self._unstarted = sum(t.unstarted for t in self._tasks.values())
        for entry in self._tasks.values():
            if not entry.missing:
                self._queue_task(entry)

    # -- observations -----------------------------------------------------------------------

    def finished(self, run: Run, result: str, now: float) -> Run | None:
        """Record a result. Returns the retry that was scheduled for a failed build, if any."""
        if self._running.pop(id(run), None) is not None:
            self.free.jobs += 1
            self.free.cores += run.cores
            self.free.ram_gb += run.ram_gb
        run.result = result
        run.state = DONE
        if run.kind != "build":
            return None
        wait = retry_wait(self.tasks[run.task], run.kind, run.attempt, result)
        if wait is not None:
            retry = Run(task=run.task, kind=run.kind, run_index=run.run_index, attempt=run.attempt + 1,
                        state=WAITING_RETRY, not_before=now + wait, cores=run.cores, ram_gb=run.ram_gb)
            heapq.heappush(self._retries, (retry.not_before, next(self._sequence), retry))
            return retry
        verdict = build_verdict(result)
        if verdict is not None and run.task not in self.build_outcome:
            self._build_decided(run.task, verdict)
        return None

    def cancel_waiting(self, reason: str) -> list[Run]:
        """Stop everything not yet started (Ctrl-C); returns the runs now cancelled."""
        cancelled = []
        for entry in self._tasks.values():
            cancelled.extend(self._take_all(entry, DONE, "cancelled", reason))
            entry.queued = False
        retries = [item[2] for heap in self._ready.values() for item in heap if item[0] == 1]
        retries += [item[2] for item in self._retries]
        for run in retries:
            run.state, run.result, run.reason = DONE, "cancelled", reason
        self._ready.clear()
        self._retries.clear()
        self._ready_retries = 0
        self._to_block.clear()  # their consumers are among the cancelled
        return cancelled + retries

    # -- decisions ---------------------------------------------------------------------------

    def next_actions(self, now: float) -> Actions:
        actions = Actions()
        while self._to_block:
            self._block_consumers(self._to_block.pop(), actions)
        while self._retries and self._retries[0][0] <= now:
            _, sequence, retry = heapq.heappop(self._retries)
            self._push_ready((retry.cores, retry.ram_gb), (1, sequence, retry, None))
            self._ready_retries += 1
        while self.free.jobs > 0:
            run = self._take_first_fitting()
            if run is None:
                break
            run.state = RUNNING
            self._running[id(run)] = run
            self.free.jobs -= 1
            self.free.cores -= run.cores
            self.free.ram_gb -= run.ram_gb
            actions.start.append(run)
        return actions

    def inputs_ready(self, run: Run) -> bool:
        return not self._tasks[run.task].missing

    def seconds_until_next_retry(self, now: float) -> float:
        return max(0.0, self._retries[0][0] - now) if self._retries else math.inf

    def queue_counts(self) -> tuple[int, int]:
        """(runs waiting to start, runs running)."""
        return self._unstarted + len(self._retries) + self._ready_retries, len(self._running)

    @property
    def done(self) -> bool:
        return not (self._unstarted or self._retries or self._ready_retries or self._running or self._to_block)

    @property
    def running(self) -> list[Run]:
        return list(self._running.values())

    # -- the inside ----------------------------------------------------------------------------

    def _queue_task(self, entry: _Task) -> None:
        if entry.unstarted and not entry.queued:
            entry.queued = True
            self._push_ready((entry.cores, entry.ram_gb), (0, entry.position, None, entry))

    def _push_ready(self, size: tuple[int, float], item: tuple) -> None:
        heapq.heappush(self._ready.setdefault(size, []), item)

    def _take_first_fitting(self) -> Run | None:
        """The earliest ready run among the sizes that fit what is free. Within one size the
        heap's head comes first; a size whose head does not fit has no run that fits."""
        best_size, best = None, None
        for size, heap in self._ready.items():
            if heap and fits(size[0], size[1], self.free) and (best is None or heap[0][:2] < best[:2]):
                best_size, best = size, heap[0]
        if best is None:
            return None
        heap = self._ready[best_size]
        if best[0] == 1:  # a retry
            heapq.heappop(heap)
            self._ready_retries -= 1
            return best[2]
        entry: _Task = best[3]
        run = Run(task=entry.name, kind=entry.kind, run_index=entry.next_index, cores=entry.cores,
                  ram_gb=entry.ram_gb)
        entry.next_index += 1
        self._unstarted -= 1
        if not entry.unstarted:
            heapq.heappop(heap)
            entry.queued = False
        return run

    def _take_all(self, entry: _Task, state: str, result: str, reason: str) -> list[Run]:
        runs = [Run(task=entry.name, kind=entry.kind, run_index=index, state=state, result=result,
                    reason=reason, cores=entry.cores, ram_gb=entry.ram_gb)
                for index in range(entry.next_index, entry.end_index)]
        self._unstarted -= entry.unstarted
        entry.next_index = entry.end_index
        return runs

    def _build_decided(self, build: str, verdict: str) -> None:
        self.build_outcome[build] = verdict
        if verdict == "failed":
            self._to_block.append(build)  # reported by the next next_actions, as blocked runs
            return
        for consumer in self._consumers.get(build, []):
            consumer.missing.discard(build)
            if not consumer.missing:
                self._queue_task(consumer)

    def _block_consumers(self, build: str, actions: Actions) -> None:
        for consumer in self._consumers.get(build, []):
            if not consumer.unstarted:
                continue
            failed = [b for b in self.depends_on[consumer.name] if self.build_outcome.get(b) == "failed"]
            actions.blocked.extend(self._take_all(consumer, DONE, "blocked", blocked_reason(failed)))
            if consumer.kind == "build" and consumer.name not in self.build_outcome:
                self._build_decided(consumer.name, "failed")  # its own consumers are blocked too
