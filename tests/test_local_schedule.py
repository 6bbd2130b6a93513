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


def test_a_plan_of_many_runs_holds_no_object_per_run_until_it_starts():
    """Runs not yet started are a counter: 200,000 planned runs cost what 2 do (the runner asks
    for the next actions after every event, so each step must cost what changed, not the plan)."""
    import tracemalloc

    tracemalloc.start()
    try:
        s = make([planned("b", "build"), planned("t", runs=200_000, depends_on=["b"])],
                 [task("b", "build"), task("t", min_cores=1)], jobs=16, cores=16)
        first = s.next_actions(0)
        s.finished(first.start[0], "passed", 1)
        started = s.next_actions(1).start
        assert s.queue_counts() == (200_000 - 16, 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(started) == 16 and [r.run_index for r in started] == list(range(16))
    assert peak < 1_000_000, f"scheduling 200,000 runs took {peak} bytes"


def reference_order(plan, tasks, capacity, results):
    """The rules written as plainly as possible (every step looks at every run): the order the
    fast schedule must reproduce. `results(run)` decides each run's result."""
    runs = []
    for p in plan:
        for index in range(p["runs"]):
            runs.append({"task": p["name"], "kind": p["kind"], "index": index, "attempt": 1, "state": "pending",
                         "not_before": 0.0, "cores": min(tasks[p["name"]]["min_cores"], capacity.cores),
                         "ram": min(tasks[p["name"]]["min_ram_gb"], capacity.ram_gb)})
    depends = {p["name"]: p["depends_on"] for p in plan}
    outcome, log, running, now = {}, [], [], 0.0
    while True:
        changed = True
        while changed:
            changed = False
            for run in runs:
                if run["state"] == "pending" and any(outcome.get(b) == "failed" for b in depends[run["task"]]):
                    run["state"] = "done"
                    log.append(("blocked", run["task"], run["index"]))
                    if run["kind"] == "build":
                        outcome[run["task"]] = "failed"
                    changed = True
        jobs = capacity.jobs - len(running)
        cores = capacity.cores - sum(r["cores"] for r in running)
        ram = capacity.ram_gb - sum(r["ram"] for r in running)
        for run in runs:
            ready = all(outcome.get(b) == "passed" for b in depends[run["task"]])
            if run["state"] == "pending" and ready and run["not_before"] <= now and jobs > 0 \
                    and run["cores"] <= cores and run["ram"] <= ram:
                run["state"] = "running"
                running.append(run)
                log.append(("start", run["task"], run["index"], run["attempt"]))
                jobs, cores, ram = jobs - 1, cores - run["cores"], ram - run["ram"]
        if all(r["state"] == "done" for r in runs):
            return log
        if not running:
            waits = [r["not_before"] for r in runs if r["state"] == "pending" and r["not_before"] > now]
            assert waits, "nothing runs and nothing waits: the reference is stuck"
            now = min(waits)
            continue
        run = running.pop(0)
        now += 1
        run["state"] = "done"
        result = results(run["task"], run["index"], run["attempt"])
        task_ = tasks[run["task"]]
        if run["kind"] == "build":
            if result == "failed" and run["attempt"] <= task_["max_retries"]:
                runs.append({**run, "attempt": run["attempt"] + 1, "state": "pending",
                             "not_before": now + task_["retry_wait_seconds"]})
            else:
                outcome[run["task"]] = "passed" if result == "passed" else "failed"


def fast_order(plan, tasks, capacity, results):
    s = Schedule(plan, tasks, capacity)
    log, running, now = [], [], 0.0
    while True:
        actions = s.next_actions(now)
        log += [("blocked", r.task, r.run_index) for r in actions.blocked]
        for run in actions.blocked:
            s.finished(run, "blocked", now)
        log += [("start", r.task, r.run_index, r.attempt) for r in actions.start]
        running += actions.start
        if s.done:
            return log
        if not running:
            now += s.seconds_until_next_retry(now)
            continue
        run = running.pop(0)
        now += 1
        s.finished(run, results(run.task, run.run_index, run.attempt), now)


def test_the_schedule_starts_and_blocks_exactly_as_the_plain_rules_say():
    import random

    for seed in range(60):
        rng = random.Random(seed)
        tasks, plan = {}, []
        for number in range(rng.randint(1, 7)):
            kind = "build" if rng.random() < 0.4 else "test"
            name = f"{kind}{number}"
            earlier_builds = [p["name"] for p in plan if p["kind"] == "build"]
            needs = rng.sample(earlier_builds, rng.randint(0, min(2, len(earlier_builds))))
            tasks[name] = task(name, kind, min_cores=rng.choice([0, 1, 2, 3, 8]), min_ram_gb=rng.choice([0, 1, 6]),
                               max_retries=rng.randint(0, 2), retry_wait_seconds=rng.choice([0, 3]))
            plan.append(planned(name, kind, runs=1 if kind == "build" else rng.randint(1, 6), depends_on=needs))
        capacity = Capacity(jobs=rng.randint(1, 4), cores=rng.choice([2, 4]), ram_gb=8.0)
        verdicts = {}

        def results(task_name, index, attempt):
            return verdicts.setdefault((task_name, index, attempt), rng.choice(["passed", "passed", "failed"]))

        expected = reference_order(plan, tasks, capacity, results)
        assert fast_order(plan, tasks, capacity, results) == expected, f"seed {seed}: {plan}"
