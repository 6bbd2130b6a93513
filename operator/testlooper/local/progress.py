"""Live progress of a local run, one line per event, with the elapsed time."""

from __future__ import annotations

import sys
import threading
import time

from testlooper import terminal

_RESULT_STYLES = {"passed": "green", "failed": "red", "timeout": "red", "error": "magenta",
                  "blocked": "yellow", "cancelled": "yellow"}
# With nothing else to say, a line about what is still running at most this often.
STILL_RUNNING_EVERY_SECONDS = 15.0


class Progress:
    def __init__(self, stream=None, total_runs: int = 0):
        self.stream = stream or sys.stderr
        self.styler = terminal.Styler(terminal.colour_wanted(self.stream))
        self.started = time.monotonic()
        self.total = total_runs
        self.done = 0
        self.running: dict[str, float] = {}
        self.last_line = self.started
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            elapsed = time.monotonic() - self.started
            self.stream.write(f"{self.styler(f'[{elapsed:6.1f}s]', 'dim')} {text}\n")
            self.stream.flush()
            self.last_line = time.monotonic()

    def event(self, kind: str, run, outcome) -> None:
        if kind == "started":
            self.running[run.label] = time.monotonic()
            self.say(f"start    {terminal.printable(run.label)}" + (f" (attempt {run.attempt})" if run.attempt > 1 else ""))
        elif kind == "finished":
            self.running.pop(run.label, None)
            self.done += 1
            self.say(self.finished_line(run, outcome))
        elif kind == "retry":
            if self.total:
                self.total += 1  # a retry is one more run to finish: counters never read [6/5]
            self.say(f"retry    {terminal.printable(run.label)} in {max(0.0, run.not_before - time.time()):.0f}s "
                     f"(attempt {run.attempt})")

    def finished_line(self, run, outcome) -> str:
        result = self.styler(f"{outcome.result:<8}", _RESULT_STYLES.get(outcome.result))
        # Names and messages come from the task: a newline in them must not start a line of its own.
        parts = [f"{result} {terminal.printable(run.label)}", f"({outcome.duration_seconds:.1f}s)"]
        if outcome.cases:
            failed = [terminal.printable(c["name"]) for c in outcome.cases if not c["success"]]
            parts.append(f"{len(outcome.cases) - len(failed)}/{len(outcome.cases)} cases passed")
            if failed:
                shown = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
                parts.append(f"failed: {shown}")
        if outcome.message:
            parts.append(f"- {terminal.printable(outcome.message)}")
        parts.append(self.styler(f"[{self.done}/{self.total}]", "dim") if self.total else "")
        return " ".join(p for p in parts if p)

    def tick(self) -> None:
        """Called while waiting: says what is still running when nothing was said for a while."""
        if self.running and time.monotonic() - self.last_line >= STILL_RUNNING_EVERY_SECONDS:
            now = time.monotonic()
            items = ", ".join(f"{terminal.printable(label)} ({now - since:.0f}s)"
                              for label, since in sorted(self.running.items()))
            self.say(f"running  {items}")
