"""The pure Repo poll decisions: what to create, cancel and delete, and the status they leave."""

from __future__ import annotations

from testlooper.decisions import repo as decide
from testlooper.decisions.pools import pool_for, pool_status
from testlooper.decisions.testrun import RESULT_FROM_COMMIT, RESULT_FROM_TESTRUN, decide_status

A, B, C = "a" * 40, "b" * 40, "c" * 40
NOW = "2026-12-01T10:00:00Z"


def task(name, kind="test", hash_="h-" , runs=1, depends_on=()):
    return decide.PlannedTask(name, kind, runs, hash_ + name, tuple(depends_on), {"name": name})


def existing(name, commit, task_name, *, hash_=None, phase="", result="", created="2026-12-01T09:00:00Z", **kw):
    return decide.ExistingTestRun(name, commit, task_name, hash_ or f"h-{task_name}", phase, result,
                                  kw.pop("cancel", False), created, **kw)


def observe(heads, new_heads=(), testruns=(), reachable=()):
    return decide.PollObservations(heads=heads, new_heads=tuple(new_heads), testruns=tuple(testruns),
                                   reachable_commits=frozenset(reachable), now=NOW)


def test_branch_globs_select_and_moved_heads_skip_what_was_processed():
    heads = {"main": A, "release/1.0": B, "feature/x": C}
    assert decide.tested_branches(["main", "release/*"], heads) == {"main": A, "release/1.0": B}
    assert decide.moved_heads({"main": A, "release/1.0": B}, [{"name": "main", "commit": A}]) == {"release/1.0": B}


def test_a_new_head_creates_one_testrun_per_planned_task():
    head = decide.HeadObservation("main", A, tasks=(task("build/linux", "build"), task("unit/linux", depends_on=["build/linux"])),
                                  reason="no triggers defined: running all")
    decision = decide.decide_poll({"branches": ["main"]}, {}, observe({"main": A}, [head]))
    assert [(item.commit, item.task.name) for item in decision.create] == [(A, "build/linux"), (A, "unit/linux")]
    assert decision.branches == [{"name": "main", "commit": A, "passed": 0, "failed": 0, "flaky": 0, "running": 2}]
    assert decision.branches_summary == f"main@{A[:8]} 2 running"
    assert ("Normal", "TestRunsCreated", f"branch main at {A[:12]}: 2 TestRuns (no triggers defined: running all)") in decision.events
    assert {c[0]: c[1] for c in decision.conditions} == {"GitReachable": "True", "DefinitionsValid": "True", "Ready": "True"}


def test_a_commit_on_two_branches_and_a_partial_earlier_apply_create_nothing_twice():
    tasks = (task("t1"), task("t2"))
    heads = [decide.HeadObservation("main", A, tasks=tasks), decide.HeadObservation("dev", A, tasks=tasks)]
    already = [existing("run-t1", A, "t1")]
    decision = decide.decide_poll({"branches": ["*"]}, {}, observe({"main": A, "dev": A}, heads, already, reachable=[A]))
    assert [item.task.name for item in decision.create] == ["t2"]


def test_a_task_that_passed_before_with_the_same_hash_is_reused_not_run():
    passed = existing("old-t1", B, "t1", phase="Succeeded", result="passed")
    failed = existing("old-t2", B, "t2", phase="Failed", result="failed")
    head = decide.HeadObservation("main", A, tasks=(task("t1"), task("t2")))
    decision = decide.decide_poll({"branches": ["main"]}, {"branches": [{"name": "main", "commit": B}]},
                                  observe({"main": A}, [head], [passed, failed]))
    reused = {item.task.name: item.reused_from for item in decision.create}
    assert reused["t1"] == passed and reused["t2"] is None
    assert decision.branches[0]["passed"] == 1 and decision.branches[0]["running"] == 1


def test_unended_testruns_of_unreachable_commits_are_cancelled_and_ended_ones_kept():
    orphan = existing("orphan", B, "t1", phase="Pending")
    done = existing("done", B, "t2", phase="Succeeded", result="passed")
    live = existing("live", A, "t1", phase="Pending")
    decision = decide.decide_poll({"branches": ["main"]}, {"branches": [{"name": "main", "commit": A}]},
                                  observe({"main": A}, [], [orphan, done, live], reachable=[A]))
    assert decision.cancel == ["orphan"]
    assert decision.create == []


def test_retention_deletes_testruns_of_old_commits_but_never_a_tested_head():
    runs = [existing(f"r{i}", sha, "t", created=f"2026-12-01T0{i}:00:00Z", phase="Succeeded", result="passed")
            for i, sha in enumerate([C, B, A])]
    decision = decide.decide_poll({"branches": ["main"], "retention": {"keepCommits": 1}},
                                  {"branches": [{"name": "main", "commit": C}]},
                                  observe({"main": C}, [], runs, reachable=[]))
    assert decision.delete == ["r1"]  # A is the newest, C is the head, B goes


def test_a_definitions_error_is_one_event_and_a_condition_until_the_head_moves():
    bad = decide.HeadObservation("main", A, error="testlooper.yml:3:5: tests.x: unknown key 'comand'")
    first = decide.decide_poll({"branches": ["main"]}, {}, observe({"main": A}, [bad]))
    assert [e for e in first.events if e[1] == "DefinitionsInvalid"] == [
        ("Warning", "DefinitionsInvalid", f"branch main at {A[:12]}: testlooper.yml:3:5: tests.x: unknown key 'comand'")]
    conditions = {c[0]: c for c in first.conditions}
    assert conditions["DefinitionsValid"][1] == "False" and "unknown key 'comand'" in conditions["DefinitionsValid"][3]
    assert conditions["Ready"][1] == "False"
    status = {"branches": first.branches}
    again = decide.decide_poll({"branches": ["main"]}, status, observe({"main": A}, []))
    assert again.events == [] and {c[0]: c[1] for c in again.conditions}["DefinitionsValid"] == "False"
    fixed = decide.decide_poll({"branches": ["main"]}, status,
                               observe({"main": B}, [decide.HeadObservation("main", B, tasks=(task("t"),))]))
    assert {c[0]: c[1] for c in fixed.conditions}["DefinitionsValid"] == "True"


def test_git_failure_warns_once_and_keeps_the_last_known_branches():
    branches = [{"name": "main", "commit": A, "passed": 1, "failed": 0, "flaky": 0, "running": 0}]
    first = decide.decide_git_failure("git fetch of https://***@h/x failed: refused", {"branches": branches})
    assert first.events == [("Warning", "GitUnreachable", "git fetch of https://***@h/x failed: refused")]
    assert first.branches == branches and first.create == first.cancel == []
    status = {"conditions": [{"type": "GitReachable", "status": "False"}]}
    assert decide.decide_git_failure("still down", status).events == []


def test_poll_delay_backs_off_and_is_capped():
    assert decide.next_poll_delay(60, 0) == 60
    assert decide.next_poll_delay(60, 1) == 120
    assert decide.next_poll_delay(60, 9) == 600
    assert decide.next_poll_delay(900, 3) == 900  # a long interval is never shortened


def test_suspended_keeps_tallies_and_says_why():
    decision = decide.decide_suspended({"branches": [{"name": "main", "commit": A}]},
                                       [existing("r", A, "t", phase="Failed", result="failed")])
    assert decision.branches[0]["failed"] == 1
    assert decision.conditions == [("Ready", "False", "Suspended", "spec.suspend is true: not polling or creating TestRuns")]


def test_testrun_status_first_pending_then_cancelled_and_reuse_is_succeeded():
    assert decide_status({"runs": 6}, {}, {}, NOW)["runsSummary"] == "0/6"
    assert decide_status({"runs": 6}, {"phase": "Pending"}, {}, NOW) is None
    cancelled = decide_status({"runs": 6, "cancel": True}, {"phase": "Pending"}, {}, NOW)
    assert (cancelled["phase"], cancelled["result"]) == ("Cancelled", "cancelled")
    assert decide_status({"cancel": True}, {"phase": "Succeeded"}, {}, NOW) is None
    reused = decide_status({"runs": 2}, {}, {RESULT_FROM_TESTRUN: "old", RESULT_FROM_COMMIT: B}, NOW)
    assert reused["phase"] == "Succeeded" and reused["resultFrom"] == {"commit": B, "testRun": "old"}


def test_pools_by_priority_platform_and_ceiling_count_what_is_queued():
    pools = [
        {"metadata": {"name": "small"}, "spec": {"provider": "kubernetes", "priority": 10, "maxPodCores": 2}},
        {"metadata": {"name": "big"}, "spec": {"provider": "kubernetes", "priority": 1, "maxWorkers": 4}},
        {"metadata": {"name": "win"}, "spec": {"provider": "ec2", "platform": "windows", "priority": 99, "ec2": {
            "windowsAmi": "ami-1", "instanceTypes": [{"type": "m5.xlarge", "cores": 4, "ramGb": 16}]}}},
    ]
    assert pool_for({"min_cores": 1}, "", pools) == "small"
    assert pool_for({"min_cores": 8}, "", pools) == "big"
    assert pool_for({"platform": "windows"}, "", pools) == "win"
    assert pool_for({"platform": "mac"}, "", pools) is None
    assert pool_for({"platform": "windows", "min_ram_gb": 64}, "", pools) is None  # no type of its holds that
    testruns = [
        {"spec": {"runs": 6, "definition": {"min_cores": 8}}, "status": {"phase": "Pending", "runCounts": {"queued": 6}}},
        {"spec": {"runs": 3, "definition": {}, "workerPool": "big"}, "status": {}},
        {"spec": {"runs": 5, "definition": {"min_cores": 8}}, "status": {"phase": "Succeeded"}},
    ]
    assert pool_status(pools[1], pools, testruns)["queued"] == 9
    assert pool_status(pools[1], pools, testruns)["workersSummary"] == "0/4"


def test_definitions_warnings_become_warning_events():
    head = decide.HeadObservation("main", A, tasks=(task("t"),), warnings=("testlooper.yml:7:5: key 'command' is written twice",))
    decision = decide.decide_poll({"branches": ["main"]}, {}, observe({"main": A}, [head]))
    assert ("Warning", "DefinitionsWarning", f"branch main at {A[:12]}: testlooper.yml:7:5: key 'command' is written twice") in decision.events
    assert len(decision.create) == 1


def test_a_head_that_comes_back_gets_its_cancelled_testruns_again():
    """A force push undone (or a deleted branch restored) makes a cancelled commit a head again:
    its cancelled TestRuns are replaced, not left as its only result."""
    cancelled = existing("a-t1", A, "t1", phase="Cancelled", result="cancelled", cancel=True)
    asked = existing("a-t2", A, "t2", phase="Pending", cancel=True)  # its handler has not written yet
    head = decide.HeadObservation("main", A, tasks=(task("t1"), task("t2")))
    decision = decide.decide_poll({"branches": ["main"]}, {"branches": [{"name": "main", "commit": B}]},
                                  observe({"main": A}, [head], [cancelled, asked], reachable=[A]))
    assert decision.replace == ["a-t1", "a-t2"]
    assert [item.task.name for item in decision.create] == ["t1", "t2"]
    assert decision.cancel == []
    assert decision.branches[0]["running"] == 2


def test_a_spec_edit_does_not_bring_back_testruns_of_a_head_that_did_not_move():
    """Re-reading an unmoved head (a spec edit) leaves a TestRun cancelled by hand cancelled."""
    by_hand = existing("a-t1", A, "t1", phase="Cancelled", result="cancelled", cancel=True)
    head = decide.HeadObservation("main", A, tasks=(task("t1"),))
    decision = decide.decide_poll({"branches": ["main"]}, {"branches": [{"name": "main", "commit": A}]},
                                  observe({"main": A}, [head], [by_hand], reachable=[A]))
    assert decision.replace == [] and decision.create == []


def test_retention_never_deletes_a_testrun_that_has_not_ended():
    """An unended TestRun's result is not in the store yet: deleting it would lose it."""
    old_running = existing("old-running", B, "t1", phase="Pending", created="2026-12-01T01:00:00Z")
    old_asked = existing("old-asked", B, "t2", phase="Pending", cancel=True, created="2026-12-01T01:00:00Z")
    old_done = existing("old-done", B, "t3", phase="Failed", result="failed", created="2026-12-01T01:00:00Z")
    head = existing("head", A, "t1", phase="Pending", created="2026-12-01T02:00:00Z")
    decision = decide.decide_poll({"branches": ["main"], "retention": {"keepCommits": 1}},
                                  {"branches": [{"name": "main", "commit": A}]},
                                  observe({"main": A}, [], [old_running, old_asked, old_done, head], reachable=[A, B]))
    assert decision.delete == ["old-done"]


def test_retention_counts_a_head_first_among_commits_seen_in_the_same_second():
    same_second = "2026-12-01T02:00:00Z"
    older = existing("older", B, "t", phase="Cancelled", result="cancelled", cancel=True, created=same_second)
    head = existing("head", A, "t", phase="Pending", created=same_second)
    for listed in ([older, head], [head, older]):
        decision = decide.decide_poll({"branches": ["main"], "retention": {"keepCommits": 1}},
                                      {"branches": [{"name": "main", "commit": A}]},
                                      observe({"main": A}, [], listed, reachable=[A]))
        assert decision.delete == ["older"]


def test_an_untestable_head_is_read_again_each_poll_and_warned_about_once():
    """Its error may pass without a push: a pinned repository's commit fetched since, say."""
    error = "testlooper.yml:2:3: repos.lib: repository 'lib' has no commit 'c0ffee'"
    previous = {"branches": [{"name": "main", "commit": A, "error": error}]}
    assert decide.moved_heads({"main": A}, previous["branches"]) == {"main": A}
    again = decide.decide_poll({"branches": ["main"]}, previous,
                               observe({"main": A}, [decide.HeadObservation("main", A, error=error,
                                                                            warnings=("f.yml:1:1: twice",))]))
    assert again.events == []  # neither the error nor the warnings read with it again
    assert {c[0]: c[1] for c in again.conditions}["DefinitionsValid"] == "False"
    other = decide.decide_poll({"branches": ["main"]}, previous,
                               observe({"main": A}, [decide.HeadObservation("main", A, error="another error")]))
    assert [e[2] for e in other.events if e[1] == "DefinitionsInvalid"] == [f"branch main at {A[:12]}: another error"]
    resolved = decide.decide_poll({"branches": ["main"]}, previous,
                                  observe({"main": A}, [decide.HeadObservation("main", A, tasks=(task("t"),))]))
    assert [item.task.name for item in resolved.create] == ["t"]
    assert {c[0]: c[1] for c in resolved.conditions}["DefinitionsValid"] == "True"


def test_a_result_is_still_reused_when_retention_deleted_the_testrun_that_ran():
    """Only a reuse of it is left: the new TestRun is a reuse too, and names the run that ran."""
    reuse = existing("b-t1", B, "t1", phase="Succeeded", result="passed",
                     result_from_commit=A, result_from_testrun="a-t1")
    head = decide.HeadObservation("main", C, tasks=(task("t1"),))
    decision = decide.decide_poll({"branches": ["main"]}, {"branches": [{"name": "main", "commit": B}]},
                                  observe({"main": C}, [head], [reuse]))
    origin = decision.create[0].reused_from
    assert (origin.name, origin.commit) == ("a-t1", A)


def test_a_pin_names_a_repo_by_its_name_else_by_the_end_of_its_url():
    keys = {"lib": "git.example.com/team/lib", "lib-fork": "git.example.com/me/lib", "app": "git.example.com/team/app"}
    assert decide.pinned_repos("lib", keys) == ["lib"]
    assert decide.pinned_repos("team/lib", keys) == ["lib"]
    assert decide.pinned_repos("me/lib", keys) == ["lib-fork"]
    assert decide.pinned_repos("lib", {k: v for k, v in keys.items() if k != "lib"}) == ["lib-fork"]
    assert decide.pinned_repos("lib", {"a": "h/x/lib", "b": "h/y/lib"}) == ["a", "b"]
    assert decide.pinned_repos("nowhere", keys) == []


def test_credentials_go_only_where_their_secret_says_and_never_over_plain_http():
    refusal = decide.credentials_refusal
    hosts = {"testlooper.dev/git-hosts": "github.com, git.example.com"}
    assert refusal("s", hosts, "https://github.com/org/repo.git") == ""
    assert refusal("s", hosts, "git@git.example.com:org/repo.git") == ""
    assert refusal("s", hosts, "ssh://git@GIT.example.com:2222/org/repo") == ""
    assert refusal("s", {}, "file:///srv/repo.git") == ""  # nothing leaves the machine
    assert "not to evil.example.net" in refusal("s", hosts, "https://evil.example.net/x.git")
    assert "(none)" in refusal("s", {}, "https://github.com/org/repo.git")
    assert refusal("s", hosts, "http://github.com/org/repo.git") == (
        "credentials are sent over https or ssh only, not over http:// to github.com")
    assert refusal("s", {"testlooper.dev/git-hosts": "127.0.0.1"}, "http://127.0.0.1:8080/x.git") == ""


def test_no_matching_branch_cancels_nothing_and_says_why():
    live = existing("live", A, "t1", phase="Pending")
    decision = decide.decide_poll({"branches": ["mian"]}, {"branches": [{"name": "main", "commit": A}]},
                                  observe({"main": A}, [], [live], reachable=[]))
    assert decision.cancel == [] and decision.branches == []
    ready = {c[0]: c for c in decision.conditions}["Ready"]
    assert ready[1:3] == ("False", "NoTestedBranches") and "(mian)" in ready[3]


def test_retally_recounts_the_known_heads_from_the_testruns_as_they_are_now():
    """A TestRun that ends moves its Repo's tally at once (no fetch, no plan): the heads are the
    ones the last poll wrote, an untestable head keeps its error, a cancelled run counts nowhere."""
    previous = {"branches": [
        {"name": "main", "commit": "a" * 40, "passed": 0, "failed": 0, "flaky": 0, "running": 3},
        {"name": "dev", "commit": "b" * 40, "passed": 0, "failed": 0, "flaky": 0, "running": 0, "error": "bad yaml"}]}
    testruns = [existing("r1", "a" * 40, "build", phase="Succeeded", result="passed"),
                existing("r2", "a" * 40, "flaky", phase="Failed", result="flaky"),
                existing("r3", "a" * 40, "check", phase="Running"),
                existing("r4", "a" * 40, "gone", phase="Cancelled", result="cancelled", cancel=True),
                existing("r5", "c" * 40, "old", phase="Failed", result="failed")]
    branches, summary = decide.retally(previous, testruns)
    assert branches == [
        {"name": "main", "commit": "a" * 40, "passed": 1, "failed": 0, "flaky": 1, "running": 1},
        {"name": "dev", "commit": "b" * 40, "passed": 0, "failed": 0, "flaky": 0, "running": 0, "error": "bad yaml"}]
    assert summary == f"main@{'a' * 8} 1 passed 1 flaky 1 running, dev@{'b' * 8} untestable"
    assert decide.retally({}, testruns) == ([], "")
