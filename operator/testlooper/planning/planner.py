"""Decide which builds and tests run for one commit: resolved definitions in, a plan out.

The definitions are the resolved-definitions contract and the plan is the plan contract, both
described in docs/design.md. Nothing here does I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from testlooper.definitions.tasks import MAX_RUNS

# One command plans at most this many runs in all (as one test's `runs` is at most MAX_RUNS):
# past it the plan is refused before anything is allocated for its runs.
MAX_RUNS_PER_PLAN = MAX_RUNS


def match_glob(pattern: str, name: str) -> bool:
    """Whether `name` matches the shell-style `pattern`, case-sensitively.

    `*` also matches `/` (`HEAD/*.py` matches `HEAD/src/a.py`), as old TestLooper files expect.
    """
    return fnmatch.fnmatchcase(name, pattern)


def plan(
    definitions: dict,
    changed_files: list[str] | None,
    test_sets: Sequence[str] = (),
    runs: int | None = None,
    tests: Sequence[str] = (),
    pinned_changes: dict[str, list[str]] | None = None,
) -> dict:
    """The builds and tests to run for a commit, in dependency order.

    `pinned_changes` maps a pin whose commit moved since the first parent to the paths that
    changed in its repository; triggers match them as `pin/<path>`, as this commit's own paths
    are matched as `HEAD/<path>`.
    `changed_files` are the commit's paths changed relative to its first parent; None means they
    are unknown (as for a root commit), and then the commit runs the test set `all`, as the
    original did. Naming `test_sets` or `tests` (test-name globs) overrides the triggers. `runs`
    overrides each test's own `runs`. A disabled test (looper_version 4) runs only when `tests`
    names it.
    Raises ValueError for an unknown test set, a test glob matching nothing, `runs` that is not
    a whole number from 1 to MAX_RUNS, or a plan of more than MAX_RUNS_PER_PLAN runs in all.
    """
    check_runs(runs)
    if test_sets or tests:
        selection = _select_requested(definitions, test_sets, tests)
    elif not definitions["triggers"] or changed_files is None:
        reason = ("no triggers defined: running all" if not definitions["triggers"]
                  else "changed files unknown (a commit with no parent): running all")
        selection = _Selection(test_names=_enabled(definitions, definitions["test_sets"]["all"]),
                               test_sets=["all"], reason=reason)
    else:
        selection = _select_by_triggers(definitions, changed_files, pinned_changes or {})
    tasks = _ordered_tasks(definitions, selection.test_names, runs)
    total = sum(task["runs"] for task in tasks)
    if total > MAX_RUNS_PER_PLAN:
        raise ValueError(f"this plan has {total} runs, more than the {MAX_RUNS_PER_PLAN} one command may run: "
                         "ask for fewer (--runs, --test) or split them over several commands")
    return {
        "test_sets": selection.test_sets,
        "triggers_fired": selection.triggers_fired,
        "reason": selection.reason,
        "tasks": tasks,
    }


def check_runs(runs: int | None) -> None:
    """A `runs` override must be a whole number from 1 to MAX_RUNS (None: no override)."""
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS):
        raise ValueError(f"runs must be a whole number from 1 to {MAX_RUNS}, not {runs!r}")


@dataclass
class _Selection:
    test_names: set[str]
    test_sets: list[str]
    reason: str
    triggers_fired: list[dict] = field(default_factory=list)


def _select_requested(definitions: dict, test_sets: Sequence[str], tests: Sequence[str]) -> _Selection:
    known_sets = definitions["test_sets"]
    unknown = [name for name in test_sets if name not in known_sets]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(
            f"unknown test set{plural} {_quoted(unknown)}; known test sets: {', '.join(sorted(known_sets))}"
        )
    requested_sets = list(dict.fromkeys(test_sets))
    test_names = _enabled(definitions, (test for name in requested_sets for test in known_sets[name]))
    for glob in tests:
        matched = [name for name in definitions["tests"] if match_glob(glob, name)]
        if not matched:
            raise ValueError(f"no test name matches {glob!r}")
        test_names.update(matched)
    reasons = []
    if requested_sets:
        reasons.append(f"requested test sets: {', '.join(requested_sets)}")
    if tests:
        reasons.append(f"requested tests: {', '.join(tests)}")
    return _Selection(test_names=test_names, test_sets=requested_sets, reason="; ".join(reasons))


def _select_by_triggers(definitions: dict, changed_files: list[str], pinned_changes: dict) -> _Selection:
    known_sets = definitions["test_sets"]
    head_paths = [f"HEAD/{path}" for path in changed_files]
    head_paths += [f"{pin}/{path}" for pin, paths in sorted(pinned_changes.items()) for path in paths]
    fired = []
    for trigger in definitions["triggers"]:
        paths_matched = list(filter(_any_glob(trigger["paths"]), head_paths))
        if paths_matched:
            matches_set = _any_glob(trigger["test_sets"])
            fired.append({
                "name": trigger["name"],
                "paths_matched": paths_matched,
                "test_sets": sorted(filter(matches_set, known_sets)),
            })
    set_names = sorted({name for trigger in fired for name in trigger["test_sets"]})
    return _Selection(
        test_names=_enabled(definitions, (test for name in set_names for test in known_sets[name])),
        test_sets=set_names,
        reason=_trigger_reason(fired, head_paths),
        triggers_fired=fired,
    )


def _enabled(definitions: dict, names: Iterable[str]) -> set[str]:
    tests = definitions["tests"]
    return {name for name in names if not tests[name].get("disabled")}


def _trigger_reason(fired: list[dict], changed_files: list[str]) -> str:
    if not changed_files:
        return "no files changed: no trigger fired"
    if not fired:
        return f"no trigger matched the {_count(len(changed_files), 'changed file')}"
    sentences = []
    for trigger in fired:
        first, *others = trigger["paths_matched"]
        more = f" and {_count(len(others), 'more path')}" if others else ""
        sentences.append(f"trigger {trigger['name']!r} fired on {first}{more}")
    return "; ".join(sentences)


def _ordered_tasks(definitions: dict, test_names: set[str], runs: int | None) -> list[dict]:
    """The tests and every build they need (transitively), builds first, each once."""
    tests = definitions["tests"]
    builds = {**definitions["builds"], **definitions.get("external_builds", {})}
    depends_on = {name: _head_builds(tests[name]) for name in test_names}
    pending = [build for needed in depends_on.values() for build in needed]
    build_names: set[str] = set()
    while pending:
        build = pending.pop()
        if build in build_names:
            continue
        if build not in builds:
            consumers = sorted(name for name, needed in depends_on.items() if build in needed)
            raise ValueError(f"build {build!r} is not defined (needed by {', '.join(consumers)})")
        build_names.add(build)
        depends_on[build] = _head_builds(builds[build])
        pending.extend(depends_on[build])

    needed_by: dict[str, list[str]] = defaultdict(list)
    for name in sorted(depends_on):
        for build in depends_on[name]:
            needed_by[build].append(name)

    levels = _build_levels({name: depends_on[name] for name in build_names})
    planned = [
        _planned_task(name, builds[name], "build", 1, depends_on[name], needed_by[name])
        for name in sorted(build_names, key=lambda name: (levels[name], name))
    ]
    for name in sorted(test_names):
        test_runs = tests[name]["runs"] if runs is None else runs
        planned.append(_planned_task(name, tests[name], "test", test_runs, depends_on[name], needed_by[name]))
    return planned


def _planned_task(
    name: str, task: dict, kind: str, runs: int, depends_on: list[str], needed_by: list[str]
) -> dict:
    return {
        "name": name,
        "kind": kind,
        "repo": task.get("repo", "HEAD"),
        "runs": runs,
        "hash": task["hash"],
        "needed_by": needed_by,
        "depends_on": depends_on,
    }


def _head_builds(task: dict) -> list[str]:
    """Names of the builds `task` takes as inputs: `build` for this commit's, `pin/build` for
    another repository's (keys of the definitions' `external_builds`)."""
    return sorted({
        build_key(dependency["repo"], dependency["build"])
        for dependency in task["dependencies"].values()
        if dependency["kind"] == "build"
    })


def build_key(dependency_repo: str, build: str) -> str:
    """An external build's dependencies are rebased already: their `repo` is a pin path of the
    root's, so only this commit's builds ("HEAD") go without a prefix."""
    return build if dependency_repo == "HEAD" else f"{dependency_repo}/{build}"


def _build_levels(depends_on: dict[str, list[str]]) -> dict[str, int]:
    """Each build's depth: 0 when it needs no build, else one more than its deepest input.

    Kahn's algorithm, so a long chain of builds needs no recursion; builds left over sit on a
    cycle (which the definitions engine rejects already, but a plan must never loop).
    """
    waiting_on = {name: len(needed) for name, needed in depends_on.items()}
    dependents: dict[str, list[str]] = defaultdict(list)
    for name, needed in depends_on.items():
        for build in needed:
            dependents[build].append(name)
    levels = dict.fromkeys(depends_on, 0)
    ready = [name for name, count in waiting_on.items() if count == 0]
    done = 0
    while ready:
        build = ready.pop()
        done += 1
        for dependent in dependents[build]:
            levels[dependent] = max(levels[dependent], levels[build] + 1)
            waiting_on[dependent] -= 1
            if waiting_on[dependent] == 0:
                ready.append(dependent)
    if done < len(depends_on):
        cycle = sorted(name for name, count in waiting_on.items() if count)
        raise ValueError(f"builds depend on each other in a cycle: {', '.join(cycle)}")
    return levels


def _any_glob(globs: Iterable[str]) -> Callable[[str], object]:
    """A test for "matches any of these globs" (truthy on a match), compiled once into one
    regular expression: a plan matches thousands of paths and names."""
    translated = [fnmatch.translate(glob) for glob in globs]
    if not translated:
        return lambda name: False
    return re.compile("|".join(translated)).match


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
