"""The local runner's pure scheduling rules."""

from testlooper.local.schedule import DONE, Capacity, Schedule


def task(name, kind="test", min_cores=0, min_ram_gb=0, max_retries=0, retry_wait_seconds=0):
    return {"name": name, "kind": kind, "min_cores": min_cores, "min_ram_gb": min_ram_gb,
            "max_retries": max_retries, "retry_wait_seconds": retry_wait_seconds}


def make(plan, tasks, jobs=2, cores=2, ram=8.0):
    return Schedule(plan, {t["name"]: t for t in tasks}, Capacity(jobs, cores, ram))


def planned(name, kind="test", runs=1, depends_on=()):
    return {"name": name, "kind": kind, "runs": runs, "depends_on": list(depends_on)}


def names(runs):
    return [r.label for r in runs]


def test_builds_run_before_consumers_and_runs_repeat():
    s = make([planned("b", "build"), planned("t", runs=3, depends_on=["b"])], [task("b", "build"), task("t")])
    first = s.next_actions(0)
    assert names(first.start) == ["b"]
    s.finished(first.start[0], "passed", 1)
    second = s.next_actions(1)
    assert names(second.start) == ["t #1", "t #2"]  # two jobs
    s.finished(second.start[0], "failed", 2)
    assert names(s.next_actions(2).start) == ["t #3"]


def test_failed_build_blocks_consumers_transitively():
    s = make([planned("b1", "build"), planned("b2", "build", depends_on=["b1"]), planned("t", runs=2, depends_on=["b2"]),
              planned("free")], [task("b1", "build"), task("b2", "build"), task("t"), task("free")])
    start = s.next_actions(0).start
    assert names(start) == ["b1", "free #1"]
    s.finished(start[0], "failed", 1)
    actions = s.next_actions(1)
    assert sorted(names(actions.blocked)) == ["b2", "t #1", "t #2"]
    assert all(r.result == "blocked" and r.reason.endswith("which failed") for r in actions.blocked)
    assert [r.reason for r in actions.blocked if r.task == "b2"] == ["needs build b1, which failed"]


def test_failed_build_is_retried_after_waiting():
    s = make([planned("b", "build"), planned("t", depends_on=["b"])], [task("b", "build", max_retries=2, retry_wait_seconds=10), task("t")])
    run = s.next_actions(0).start[0]
    retry = s.finished(run, "failed", 5)
    assert retry.attempt == 2 and retry.not_before == 15
    assert s.next_actions(10).start == []
    assert s.seconds_until_next_retry(10) == 5
    second = s.next_actions(15).start[0]
    assert second.attempt == 2
    third = s.finished(second, "error", 16)
    assert third.attempt == 3
    s.finished(s.next_actions(100).start[0], "timeout", 101)
    assert names(s.next_actions(101).blocked) == ["t #1"]  # out of retries


def test_capacity_limits_by_cores_and_ram():
    s = make([planned("big"), planned("small1"), planned("small2")],
             [task("big", min_cores=2), task("small1", min_cores=1), task("small2", min_cores=1, min_ram_gb=6)],
             jobs=4, cores=3, ram=8)
    start = s.next_actions(0).start
    assert names(start) == ["big #1", "small1 #1"]  # small2 would exceed the cores left
    s.finished(start[0], "passed", 1)
    assert names(s.next_actions(1).start) == ["small2 #1"]


def test_a_task_bigger_than_the_machine_runs_alone():
    s = make([planned("huge"), planned("other")], [task("huge", min_cores=64, min_ram_gb=512), task("other", min_cores=1)],
             jobs=2)
    start = s.next_actions(0).start
    assert names(start) == ["huge #1"]
    s.finished(start[0], "passed", 1)
    assert names(s.next_actions(1).start) == ["other #1"]


def test_cancel_waiting_marks_everything_not_started():
    s = make([planned("b", "build"), planned("t", runs=2, depends_on=["b"])], [task("b", "build"), task("t")])
    running = s.next_actions(0).start
    cancelled = s.cancel_waiting("interrupted")
    assert names(cancelled) == ["t #1", "t #2"]
    assert all(r.state == DONE and r.result == "cancelled" for r in cancelled)
    s.finished(running[0], "cancelled", 1)
    assert s.done


def test_tasks_that_do_not_care_about_cores_are_limited_by_jobs_alone():
    s = make([planned("t", runs=4)], [task("t")], jobs=4, cores=2)
    assert len(s.next_actions(0).start) == 4


def test_run_indexes_continue_after_those_already_recorded():
    s = make([{**planned("t", runs=2), "first_run_index": 3}], [task("t")])
    assert [r.run_index for r in s.next_actions(0).start] == [3, 4]
