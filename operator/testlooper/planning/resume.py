"""What is left of a plan once some of its runs are recorded (pure, no I/O).

A commit counts as tested only when every planned run has a counted result. A command stopped
part way (a `watch` restarted while a commit's tests ran) leaves runs cancelled or missing;
testing that commit again runs exactly those, and the builds they need.
"""

from __future__ import annotations

import copy

# Results that say something about the code (the history store counts them; see
# store.base.UNCOUNTED_RESULTS for why blocked, cancelled and error do not).
COUNTED_RESULTS = frozenset({"passed", "failed", "timeout"})


def remaining_plan(planned: dict, recorded: dict[str, list[str]]) -> dict:
    """The part of `planned` (as `plan` returns it) still to run.

    `recorded` maps each task to the results of the final attempts of its run indexes already
    recorded for this commit. A task needs its planned runs minus those with a counted result.
    A task whose build has counted results and never passed needs nothing more: its runs were
    blocked by that failure, and would be again. A build that passed is run again when a task
    still to run needs it, since its artifacts were not kept. Returns a plan of the same shape
    with only the tasks that run and their runs to do; no tasks when the commit is tested.
    """
    tasks = {task["name"]: task for task in planned["tasks"]}
    counted = {name: sum(1 for result in recorded.get(name, ()) if result in COUNTED_RESULTS)
               for name in tasks}
    failed_builds = {name for name, task in tasks.items()
                     if task["kind"] == "build" and counted[name]
                     and "passed" not in recorded.get(name, ())}

    blocked_memo: dict[str, bool] = {}

    def blocked(name: str) -> bool:
        """Whether a build `name` needs (directly or not) failed for good."""
        if name not in blocked_memo:
            blocked_memo[name] = any(dependency in failed_builds or blocked(dependency)
                                     for dependency in tasks[name].get("depends_on", ()))
        return blocked_memo[name]

    runs_to_do = {name: 0 if blocked(name) or name in failed_builds
                  else max(0, task["runs"] - counted[name])
                  for name, task in tasks.items()}
    # Every build a task still to run needs, transitively, runs again (once, at least).
    pending = [name for name, runs in runs_to_do.items() if runs]
    while pending:
        for dependency in tasks[pending.pop()].get("depends_on", ()):
            if not runs_to_do[dependency]:
                runs_to_do[dependency] = 1
                pending.append(dependency)

    remaining = copy.deepcopy(planned)
    remaining["tasks"] = []
    for task in planned["tasks"]:
        if runs_to_do[task["name"]]:
            kept = copy.deepcopy(task)
            kept["runs"] = runs_to_do[task["name"]]
            kept["needed_by"] = [name for name in task.get("needed_by", ()) if runs_to_do.get(name)]
            remaining["tasks"].append(kept)
    return remaining
