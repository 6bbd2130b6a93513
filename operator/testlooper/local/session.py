"""One local run of one target, shared by `testlooper run` and `testlooper watch`."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from testlooper.local.recording import Recorder, pinned_run_record, run_record
from testlooper.local.runner import Interrupted, LocalRunner, RunnerOptions, RunOutcome
from testlooper.local.target import Target


@dataclass
class SessionResult:
    outcomes: list[RunOutcome]
    interrupted: bool


def run_target(target: Target, planned: dict, recorder: Recorder | None, options: RunnerOptions, progress,
               on_outcome=None, on_queue=None) -> SessionResult:
    """Run a plan, recording each finished attempt as it comes; Ctrl-C and SIGTERM cancel it.
    `on_queue(waiting, running)` hears the queue's length after every event."""

    external = target.definitions.get("external_builds", {})

    def finished(outcome: RunOutcome) -> None:
        if recorder is not None and target.record:
            if outcome.task in external:  # another repository's build: recorded under its own repository
                recorder.record(pinned_run_record(outcome, external[outcome.task], target.pinned))
            else:
                recorder.record(run_record(outcome, target))
        if on_outcome is not None:
            on_outcome(outcome)

    def event(kind, run, outcome) -> None:
        progress.event(kind, run, outcome)
        if on_queue is not None:
            on_queue(*runner.schedule.queue_counts())

    def recorded_as(task: dict) -> tuple[str, str, str]:
        """(repository, commit, task name) a planned task's runs are recorded under."""
        if task["name"] in external and target.pinned is not None:
            pin = external[task["name"]]["repo"]
            return target.pinned.repo_id(pin), target.pinned.where(pin)[1], external[task["name"]]["name"]
        return target.repo_id, target.commit, task["name"]

    if recorder is not None and target.record:
        recorder.allocate_run_indexes(planned, target.repo_id, target.commit, recorded_as)
    runner = LocalRunner(target.definitions, planned, target.source_dir, target.commit or "working-tree",
                         target.commit_message, options, on_event=event, on_outcome=finished, on_tick=progress.tick,
                         pinned=target.pinned)
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        return SessionResult(runner.run(), interrupted=False)
    except Interrupted as stop:
        return SessionResult(stop.outcomes, interrupted=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_keyboard_interrupt(signum, frame):
    """A SIGTERM handler: stop as Ctrl-C does, through the same clean-up."""
    raise KeyboardInterrupt
