"""The TestRun status decisions of operator part 1: the first status, reuse and cancellation.

The TestRun handler is the only writer of a TestRun's status. The Repo reconciler asks for a
cancel through `spec.cancel`, and marks a reused result with annotations at creation, so the two
never race on the same field. Part 2 extends this with the run phase machine.
"""

from __future__ import annotations

from testlooper.decisions.repo import ENDED_PHASES

RESULT_FROM_TESTRUN = "testlooper.dev/result-from-testrun"
RESULT_FROM_COMMIT = "testlooper.dev/result-from-commit"


def decide_status(spec: dict, status: dict, annotations: dict, now: str) -> dict | None:
    """The status patch this TestRun needs now, or None."""
    phase = status.get("phase") or ""
    if phase in ENDED_PHASES:
        return None
    runs = int(spec.get("runs") or 1)
    if spec.get("cancel"):
        return {
            "phase": "Cancelled", "result": "cancelled", "completionTime": now,
            "runCounts": {**_counts(runs), "queued": 0},
            "message": "cancelled: no tested branch contains its commit any more" if not phase else "cancelled",
        }
    if phase:
        return None
    origin = annotations.get(RESULT_FROM_TESTRUN)
    if origin:
        commit = annotations.get(RESULT_FROM_COMMIT, "")
        return {
            "phase": "Succeeded", "result": "passed", "startTime": now, "completionTime": now,
            "resultFrom": {"commit": commit, "testRun": origin},
            "runCounts": {**_counts(runs), "queued": 0, "passed": runs},
            "runsSummary": f"{runs}/{runs}",
            "message": f"passed before with the same content, on commit {commit[:12]} ({origin}): not run again",
        }
    return {
        "phase": "Pending",
        "runCounts": _counts(runs),
        "runsSummary": f"0/{runs}",
        "message": "waiting to be scheduled",
    }


def _counts(runs: int) -> dict:
    return {"total": runs, "passed": 0, "failed": 0, "running": 0, "queued": runs, "errored": 0}
