"""What is left of a plan once some runs are recorded: a commit is tested only when every
planned run has a counted result."""

from testlooper.planning.resume import remaining_plan


def planned(*tasks):
    return {"reason": "test", "tasks": [
        {"name": name, "kind": kind, "runs": runs, "hash": "h", "depends_on": list(needs),
         "needed_by": [other for other, _, _, other_needs in tasks if name in other_needs]}
        for name, kind, runs, needs in tasks]}


PLAN = planned(("lib", "build", 1, ()), ("tool", "build", 1, ("lib",)),
               ("unit", "test", 3, ("tool",)), ("lint", "test", 2, ()))


def runs_of(remaining):
    return {task["name"]: task["runs"] for task in remaining["tasks"]}


def test_nothing_recorded_leaves_the_whole_plan():
    assert remaining_plan(PLAN, {}) == PLAN


def test_a_commit_whose_planned_runs_all_have_counted_results_is_tested():
    recorded = {"lib": ["passed"], "tool": ["passed"], "unit": ["passed", "failed", "timeout"],
                "lint": ["passed", "passed"]}
    assert remaining_plan(PLAN, recorded)["tasks"] == []


def test_cancelled_error_and_missing_runs_are_run_again_with_the_builds_they_need():
    recorded = {"lib": ["passed"], "tool": ["passed"], "unit": ["passed", "cancelled"],
                "lint": ["error", "passed"]}
    remaining = remaining_plan(PLAN, recorded)
    assert runs_of(remaining) == {"lib": 1, "tool": 1, "unit": 2, "lint": 1}
    assert [t["name"] for t in remaining["tasks"]] == ["lib", "tool", "unit", "lint"]  # builds first
    assert remaining["tasks"][0]["needed_by"] == ["tool"]
    assert PLAN["tasks"][2]["runs"] == 3  # the plan given is not changed


def test_only_what_is_missing_runs_and_builds_nobody_needs_do_not():
    recorded = {"lib": ["passed"], "tool": ["passed"], "unit": ["passed"] * 3, "lint": ["passed"]}
    assert runs_of(remaining_plan(PLAN, recorded)) == {"lint": 1}


def test_runs_blocked_by_a_build_that_failed_for_good_are_settled():
    recorded = {"lib": ["passed"], "tool": ["failed"], "unit": ["blocked"] * 3, "lint": ["passed"] * 2}
    assert remaining_plan(PLAN, recorded)["tasks"] == []
    # Further down the chain too.
    recorded = {"lib": ["timeout"], "tool": ["blocked"], "unit": ["blocked"] * 3, "lint": ["passed"] * 2}
    assert remaining_plan(PLAN, recorded)["tasks"] == []


def test_a_build_that_errored_or_was_cancelled_is_run_again():
    recorded = {"lib": ["error"], "tool": ["blocked"], "unit": ["blocked"] * 3, "lint": ["passed"] * 2}
    assert runs_of(remaining_plan(PLAN, recorded)) == {"lib": 1, "tool": 1, "unit": 3}
