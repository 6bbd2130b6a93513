"""`testlooper run` end to end: real repositories, real agents, real stores, real faults.

Every test runs the command as a subprocess (tests/run_helpers.py) with its own store, output
folder and XDG_DATA_HOME. Tasks leave pids and timestamps in `$TL_SCRATCH`, a folder outside
the repository, so that the tests can watch the processes the runner starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gitrepo import GitRepo
from redis_server import RedisServer
from run_helpers import (
    RUN_KEYS, SUMMARY_KEYS, cli_env, explain, json_document, kill_quietly, make_repo, process_alive, read_pids,
    repo_id, run_args, runs_of, start_tl, stop_process, stored_runs, tl, wait_for,
)

DEFINITIONS = r"""
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "example/runner:1"}
    variables: {GREETING: hello}
    test_timeout: 60

builds:
  lib/linux:
    dependencies: {src: HEAD}
    command: |
      mkdir -p "$TEST_BUILD_OUTPUT_DIR/lib"
      cp src/value.txt "$TEST_BUILD_OUTPUT_DIR/lib/value.txt"
  broken/linux:
    max_retries: 2
    retry_wait_seconds: 1
    command: |
      echo "$(date +%s.%N) $TEST_LOOPER_ATTEMPT" >> "$TL_SCRATCH/broken-attempts"
      exit 3
  second-try/linux:
    max_retries: 1
    command: |
      echo "built by attempt $TEST_LOOPER_ATTEMPT" > "$TEST_BUILD_OUTPUT_DIR/attempt.txt"
      test "$TEST_LOOPER_ATTEMPT" -ge 2

tests:
  pass/linux:
    command: |
      printf '{"case_a": true, "case_b": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
  fail/linux:
    command: |
      printf '{"case_a": true, "case_b": false}' > "$TEST_OUTPUT_DIR/testSummary.json"
      exit 1
  consume/linux:
    dependencies: {src: HEAD, lib: lib/linux}
    command: |
      echo "from build: $(cat "$TEST_INPUTS/lib/lib/value.txt")"
      echo "from source: $(cat src/value.txt)"
      echo "commit: $(head -n 1 "$TEST_SRC_DIR/.git_commit") / $(head -n 1 src/.git_commit)"
      echo "greeting: $GREETING"
  needs-broken/linux:
    dependencies: {b: broken/linux}
    command: "true"
  needs-second-try/linux:
    dependencies: {b: second-try/linux}
    command: cat b/attempt.txt
  stamp/linux:
    runs: 3
    command: |
      echo "S $(date +%s.%N) $TEST_LOOPER_RUN_INDEX" >> "$TL_SCRATCH/stamps"
      sleep 0.6
      echo "E $(date +%s.%N) $TEST_LOOPER_RUN_INDEX" >> "$TL_SCRATCH/stamps"
  hang/linux:
    timeout: 2
    command: |
      trap '' TERM
      sh -c 'sleep 300 & echo $! > "$TL_SCRATCH/grandchild.pid"; wait' &
      while :; do sleep 1; done
  sleeper/linux:
    runs: 3
    command: |
      sleep 120 &
      echo $! > "$TL_SCRATCH/sleeper-$TEST_LOOPER_RUN_INDEX.pid"
      wait
  dies/linux:
    runs: 2
    command: |
      case "$(tr '\0' ' ' < /proc/$PPID/cmdline)" in
        *testlooper.worker.agent*) kill -9 $PPID ;;
        *) echo "the parent is not the agent"; exit 7 ;;
      esac
      sleep 1
  big/linux:
    command: yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 200000000
  bad-results/linux:
    command: |
      printf '{"unterminated": tru' > "$TEST_OUTPUT_DIR/testSummary.json"
      printf '<testsuite name="s"><testcase name="x">' > "$TEST_OUTPUT_DIR/junit.xml"
  names/linux:
    dependencies: {src: HEAD}
    command: python3 src/names.py
"""

# Case names that would escape a folder if anything used them as paths, relative to the
# task's output folder. The task builds them from $TL_SCRATCH, so an escape lands there.
NAMES_SCRIPT = r'''
import json, os
scratch = os.environ["TL_SCRATCH"]
up = "/".join([".."] * 30)
names = {
    "a/b/c": True,
    "..": False,
    "../../escaped-relative": True,
    up + scratch + "/escaped-deep": False,
    scratch + "/escaped-absolute": True,
    "ünïcødé ✓ 测试": False,
    "x" * 300: True,
}
with open(os.path.join(os.environ["TEST_OUTPUT_DIR"], "testSummary.json"), "w", encoding="utf-8") as out:
    json.dump(names, out, ensure_ascii=False)
junit = (f'<testsuite name="s"><testcase classname=".." name="{up}{scratch}/junit-escaped">'
         '<failure message="no"/></testcase></testsuite>')
os.makedirs(os.path.join(os.environ["TEST_OUTPUT_DIR"], "reports"))
with open(os.path.join(os.environ["TEST_OUTPUT_DIR"], "reports", "junit.xml"), "w", encoding="utf-8") as out:
    out.write(junit)
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """One repository for most tests here; each test picks its tasks with --test."""
    return make_repo(tmp_path_factory.mktemp("repo") / "project", DEFINITIONS,
                     {"value.txt": "committed value\n", "names.py": NAMES_SCRIPT})


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path)


def scratch(env) -> Path:
    return Path(env["TL_SCRATCH"])


# -- 1. exit codes -----------------------------------------------------------------------------


def test_exit_0_when_everything_passed(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "pass/linux"), env)
    assert completed.returncode == 0, explain(completed)
    assert "1 run: 1 passed" in completed.stdout


def test_exit_1_when_a_test_failed(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "fail/linux", "--test", "pass/linux"), env)
    assert completed.returncode == 1, explain(completed)
    assert "2 runs: 1 passed, 1 failed" in completed.stdout


@pytest.mark.parametrize("rev", [None, "HEAD"], ids=["working-tree", "rev"])
def test_exit_2_with_one_line_on_a_definitions_error(tmp_path, env, rev):
    broken = make_repo(tmp_path / "broken", "looper_version: 5\ntests:\n  unit/linux: {command: [unclosed\n")
    completed = tl(run_args(broken, tmp_path, *(["--rev", rev] if rev else [])), env)
    assert completed.returncode == 2, explain(completed)
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert re.match(r"testlooper\.yml:\d+:\d+: ", lines[0]), lines[0]
    assert completed.stdout == ""


@pytest.mark.parametrize("extra, message", [
    (["--test-set", "nope"], "testlooper: error: unknown test set 'nope'; known test sets: all"),
    (["--store", "foo://x"], "testlooper: error: history store URL 'foo://x': expected a path"),
], ids=["unknown-test-set", "bad-store-url"])
def test_exit_2_with_one_line_on_a_usage_error(repo, tmp_path, env, extra, message):
    args = run_args(repo, tmp_path)
    if extra[0] == "--store":
        args[args.index("--store") + 1] = extra[1]
    else:
        args += extra
    completed = tl(args, env)
    assert completed.returncode == 2, explain(completed)
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), completed.stderr
    assert not (tmp_path / "out" / "runs").exists(), "nothing may run on a usage error"


# -- 2. the --json contract --------------------------------------------------------------------


def test_json_follows_the_contract(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "fail/linux", "--test", "consume/linux", "--json"), env)
    assert completed.returncode == 1, explain(completed)
    document = json_document(completed)
    assert {"repo", "commit", "runs", "summary"} <= set(document)
    assert document["repo"] == repo_id(repo)
    assert document["commit"] == repo.head()
    assert SUMMARY_KEYS <= set(document["summary"])
    assert {k: document["summary"][k] for k in SUMMARY_KEYS} == {
        "passed": 2, "failed": 1, "timeout": 0, "error": 0, "blocked": 0, "cancelled": 0}
    assert [r["task"] for r in document["runs"]].count("lib/linux") == 1
    for run in document["runs"]:
        assert RUN_KEYS <= set(run), run
        assert isinstance(run["run_index"], int) and isinstance(run["attempt"], int)
        assert isinstance(run["duration_seconds"], (int, float)) and run["duration_seconds"] >= 0
        assert set(run["cases"]) >= {"total", "passed", "failed"}
        assert os.path.isfile(run["log"]) and os.path.isdir(run["artifacts"]), run
    (failed,) = runs_of(document, "fail/linux")
    assert {k: failed[k] for k in ("kind", "run_index", "attempt", "result", "exit_code", "cases", "failed_cases")} == {
        "kind": "test", "run_index": 0, "attempt": 1, "result": "failed", "exit_code": 1,
        "cases": {"total": 2, "passed": 1, "failed": 1}, "failed_cases": ["case_b"]}
    (build,) = runs_of(document, "lib/linux")
    assert (build["kind"], build["result"], build["exit_code"], build["cases"]["total"]) == ("build", "passed", 0, 0)
    (consumer,) = runs_of(document, "consume/linux")
    assert (consumer["result"], consumer["exit_code"], consumer["failed_cases"]) == ("passed", 0, [])


# -- 3. inputs, sources, --rev, dirty trees ----------------------------------------------------


def test_build_output_becomes_input_and_source_has_git_commit(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "consume/linux", "--json"), env)
    assert completed.returncode == 0, explain(completed)
    (consumer,) = runs_of(json_document(completed), "consume/linux")
    log = Path(consumer["log"]).read_text()
    assert "from build: committed value" in log
    assert "from source: committed value" in log
    assert "commit: First commit / First commit" in log  # .git_commit in TEST_SRC_DIR and in src/
    assert "greeting: hello" in log


def test_rev_runs_the_commit_and_a_dirty_tree_is_run_but_not_recorded(tmp_path, env):
    project = make_repo(tmp_path / "edited", DEFINITIONS, {"value.txt": "committed value\n"})
    (project.path / "value.txt").write_text("edited in the working tree\n")
    store = str(tmp_path / "history.db")

    by_rev = tl(run_args(project, tmp_path, "--rev", "HEAD", "--test", "consume/linux", "--json"), env)
    assert by_rev.returncode == 0, explain(by_rev)
    (consumer,) = runs_of(json_document(by_rev), "consume/linux")
    log = Path(consumer["log"]).read_text()
    assert "from build: committed value" in log and "from source: committed value" in log
    assert (project.path / "value.txt").read_text() == "edited in the working tree\n"
    assert project.git("status", "--porcelain") == "M value.txt"  # the working tree and index untouched
    assert sorted(r.task for r in stored_runs(store, project, project.head())) == ["consume/linux", "lib/linux"]

    dirty = tl(run_args(project, tmp_path, "--test", "consume/linux", "--json",
                                store=str(tmp_path / "dirty.db")), env)
    assert dirty.returncode == 0, explain(dirty)
    assert "with uncommitted changes (results are not kept in the history; commit, or use --rev)" in dirty.stderr
    (consumer,) = runs_of(json_document(dirty), "consume/linux")
    assert "from build: edited in the working tree" in Path(consumer["log"]).read_text()
    assert stored_runs(str(tmp_path / "dirty.db"), project, project.head()) == []


# -- 4. runs and jobs --------------------------------------------------------------------------


def stamp_intervals(env) -> list[tuple[float, float]]:
    starts, ends = {}, {}
    for line in (scratch(env) / "stamps").read_text().splitlines():
        kind, when, index = line.split()
        (starts if kind == "S" else ends)[int(index)] = float(when)
    assert set(starts) == set(ends)
    return sorted((starts[i], ends[i]) for i in starts)


def test_runs_from_the_definitions_and_jobs_1_never_overlaps(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "stamp/linux", "--jobs", "1", "--json"), env)
    assert completed.returncode == 0, explain(completed)
    assert [r["run_index"] for r in runs_of(json_document(completed), "stamp/linux")] == [0, 1, 2]
    intervals = stamp_intervals(env)
    assert len(intervals) == 3
    for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
        assert end <= next_start, f"two runs overlapped with --jobs 1: {intervals}"


def test_runs_option_overrides_and_jobs_2_overlaps(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "stamp/linux", "--runs", "5", "--jobs", "2",
                                    "--json"), env)
    assert completed.returncode == 0, explain(completed)
    assert [r["run_index"] for r in runs_of(json_document(completed), "stamp/linux")] == [0, 1, 2, 3, 4]
    intervals = stamp_intervals(env)
    assert len(intervals) == 5
    overlaps = sum(1 for (_, end), (next_start, _) in zip(intervals, intervals[1:]) if next_start < end)
    assert overlaps >= 1, f"no two runs overlapped with --jobs 2: {intervals}"
    running = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert running <= 2, f"more than 2 runs at once with --jobs 2: {intervals}"


# -- 5. retries and blocking -------------------------------------------------------------------


def test_failed_build_is_retried_then_its_consumers_are_blocked(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "needs-broken/linux", "--test",
                                    "needs-second-try/linux", "--json"), env)
    assert completed.returncode == 1, explain(completed)
    document = json_document(completed)
    broken = runs_of(document, "broken/linux")
    assert [(r["attempt"], r["result"], r["exit_code"]) for r in broken] == [(1, "failed", 3), (2, "failed", 3),
                                                                              (3, "failed", 3)]
    attempts = [line.split() for line in (scratch(env) / "broken-attempts").read_text().splitlines()]
    assert [a for _, a in attempts] == ["1", "2", "3"]
    times = [float(t) for t, _ in attempts]
    assert all(later - earlier >= 1.0 for earlier, later in zip(times, times[1:])), times  # retry_wait_seconds
    (blocked,) = runs_of(document, "needs-broken/linux")
    assert blocked["result"] == "blocked" and blocked["exit_code"] is None and blocked["log"] == ""
    assert "broken/linux" in blocked["message"]
    # A build that passes on its retry lets its consumer run, with the retry's output.
    second = runs_of(document, "second-try/linux")
    assert [(r["attempt"], r["result"]) for r in second] == [(1, "failed"), (2, "passed")]
    (consumer,) = runs_of(document, "needs-second-try/linux")
    assert consumer["result"] == "passed"
    assert "built by attempt 2" in Path(consumer["log"]).read_text()
    # Final attempts count: broken failed, its consumer blocked, the rest passed.
    assert document["summary"] == {"passed": 2, "failed": 1, "timeout": 0, "error": 0, "blocked": 1, "cancelled": 0}
    assert "[7/7]" in completed.stderr  # retries count in the progress totals
    recorded = stored_runs(str(tmp_path / "history.db"), repo, repo.head())
    assert sorted((r.task, r.attempt, r.result) for r in recorded if r.task.startswith(("broken", "needs-b"))) == [
        ("broken/linux", 1, "failed"), ("broken/linux", 2, "failed"), ("broken/linux", 3, "failed"),
        ("needs-broken/linux", 1, "blocked")]


# -- 6. 200 MB of output -----------------------------------------------------------------------

# VmHWM, not getrusage's ru_maxrss: Linux carries the pre-exec high-water mark over exec, so
# ru_maxrss would report the forking pytest process once the whole suite is imported (~100 MiB).
RSS_WRAPPER = """
import sys
from testlooper.cli.main import main
status = main(sys.argv[1:])
with open("/proc/self/status") as proc_status:
    peak = next(int(line.split()[1]) for line in proc_status if line.startswith("VmHWM:"))
print("RUNNER_MAXRSS_KB", peak, file=sys.stderr)
sys.exit(status)
"""


def test_200_mb_of_output_keeps_the_runner_small(repo, tmp_path, env):
    wrapper = tmp_path / "rss_wrapper.py"
    wrapper.write_text(RSS_WRAPPER)
    completed = subprocess.run([sys.executable, str(wrapper), *run_args(repo, tmp_path, "--test", "big/linux",
                                                                        "--json")],
                               env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, explain(completed)
    peak_kb = int(re.search(r"RUNNER_MAXRSS_KB (\d+)", completed.stderr).group(1))
    print(f"runner peak RSS with 200 MB of task output: {peak_kb / 1024:.1f} MiB")
    assert peak_kb < 100 * 1024, f"the runner peaked at {peak_kb / 1024:.1f} MiB"
    (run,) = runs_of(json_document(completed), "big/linux")
    assert os.path.getsize(run["log"]) >= 200_000_000
    with open(run["log"], "rb") as log:
        log.seek(-4096, os.SEEK_END)
        assert b"[testlooper] result: passed" in log.read()


# -- 7. timeouts kill the whole tree -----------------------------------------------------------


def test_timeout_kills_a_task_ignoring_sigterm_with_its_grandchild(repo, tmp_path, env):
    try:
        completed = tl(run_args(repo, tmp_path, "--test", "hang/linux", "--json"), env)
        assert completed.returncode == 1, explain(completed)
        (run,) = runs_of(json_document(completed), "hang/linux")
        assert (run["result"], run["exit_code"], run["message"]) == ("timeout", None, "timed out after 2 s")
        assert json_document(completed)["summary"]["timeout"] == 1
        (grandchild,) = read_pids(scratch(env), "grandchild.pid")
        wait_for(lambda: not process_alive(grandchild), 5, f"the grandchild {grandchild} to be gone")
    finally:
        kill_quietly(read_pids(scratch(env), "grandchild.pid"))


# -- 8. malformed result files -----------------------------------------------------------------


def test_malformed_result_files_leave_the_run_recorded_with_the_errors_logged(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "bad-results/linux", "--json"), env)
    assert completed.returncode == 0, explain(completed)
    (run,) = runs_of(json_document(completed), "bad-results/linux")
    assert run["result"] == "passed" and run["cases"]["total"] == 0
    log = Path(run["log"]).read_text()
    assert re.search(r"\[testlooper\] test results: testSummary\.json: .*", log), log
    assert re.search(r"\[testlooper\] test results: junit\.xml: .*", log), log
    (recorded,) = stored_runs(str(tmp_path / "history.db"), repo, repo.head())
    assert (recorded.task, recorded.result) == ("bad-results/linux", "passed")


# -- 9. hostile case names ---------------------------------------------------------------------


def file_listing(root: Path, skip: set[Path]) -> dict[str, float]:
    listing = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if Path(directory, d) not in skip]
        for name in files + subdirectories:
            path = Path(directory, name)
            listing[str(path)] = path.lstat().st_mtime
    return listing


def test_case_names_never_escape_the_output_folder(repo, tmp_path, env):
    skip = {tmp_path / "out", tmp_path / "xdg"}
    outside = [tmp_path, repo.path.parent]
    before = {str(root): file_listing(root, skip) for root in outside}
    completed = tl(run_args(repo, tmp_path, "--test", "names/linux", "--json"), env)
    # A task passes or fails by its exit code (the spec), whatever cases it reports: exit 0.
    assert completed.returncode == 0, explain(completed)
    after = {str(root): file_listing(root, skip) for root in outside}
    for root in before:
        created = set(after[root]) - set(before[root])
        created -= {str(tmp_path / "history.db"), str(tmp_path / "history.db-wal"), str(tmp_path / "history.db-shm")}
        assert not created, f"written outside --output: {sorted(created)}"
    assert not list(scratch(env).iterdir())

    up = "/".join([".."] * 30)
    expected = {"a/b/c": True, "..": False, "../../escaped-relative": True, f"{up}{scratch(env)}/escaped-deep": False,
                f"{scratch(env)}/escaped-absolute": True, "ünïcødé ✓ 测试": False, "x" * 300: True,
                f"...{up}{scratch(env)}/junit-escaped": False}
    (run,) = runs_of(json_document(completed), "names/linux")
    assert run["result"] == "passed"
    assert run["cases"] == {"total": 8, "passed": 4, "failed": 4}
    assert sorted(run["failed_cases"]) == sorted(name for name, ok in expected.items() if not ok)
    (recorded,) = stored_runs(str(tmp_path / "history.db"), repo, repo.head(), with_cases=True)
    assert {c.name: c.success for c in recorded.cases} == expected


# -- 10. the store goes away -------------------------------------------------------------------

REDIS_DEFINITIONS = """
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
builds:
  first/linux:
    command: echo first
  stopper/linux:
    dependencies: {first: first/linux}
    command: redis-cli -p "$TL_REDIS_PORT" shutdown nosave || true
tests:
  ok/linux:
    dependencies: {s: stopper/linux}
    command: |
      echo '{"c1": true, "c2": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
  bad/linux:
    dependencies: {s: stopper/linux}
    command: |
      echo '{"c1": true, "c2": false}' > "$TEST_OUTPUT_DIR/testSummary.json"
      exit 1
"""


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="needs redis-server and redis-cli")
def test_redis_going_away_mid_run_loses_nothing(tmp_path):
    """Observed behaviour, end to end:

    - The build `first/linux` finishes while Redis is up and is recorded there.
    - The build `stopper/linux` (which needs `first/linux`, so it always comes second) shuts
      Redis down. Recording its own result fails after the Redis client's brief retries, and the
      runner prints ONE warning on stderr: `warning: history store redis://127.0.0.1:PORT/0 is
      unreachable: Error 111 connecting to ... Connection refused. Results are kept in
      XDG_DATA_HOME/testlooper/unrecorded-<hash>.jsonl and recorded when the store is back ...`.
    - From then on it does not try the store again: `stopper/linux`, `ok/linux` and `bad/linux`
      go straight to that spool file (fsynced JSON lines). The tests still run; the command
      exits 1 because `bad/linux` failed, and the summary says how many results wait in the
      spool and where. No comparison with history is printed (the store is down).
    - After Redis restarts on the same port (its append-only file brings `first/linux` back),
      the next `testlooper run` on the same store, here of another repository, replays the
      spool first ("recorded 3 results that an earlier run kept in ..."), removes it, and every
      result of the first run is in Redis with its cases.
    """
    env = cli_env(tmp_path)
    project = make_repo(tmp_path / "project", REDIS_DEFINITIONS)
    other = make_repo(tmp_path / "other", DEFINITIONS, {"value.txt": "v\n", "names.py": NAMES_SCRIPT})
    with RedisServer(persistent=True) as server:
        env["TL_REDIS_PORT"] = str(server.port)
        completed = tl(run_args(project, tmp_path, "--json", store=server.url), env)
        assert completed.returncode == 1, explain(completed)
        document = json_document(completed)
        assert document["summary"] == {"passed": 3, "failed": 1, "timeout": 0, "error": 0, "blocked": 0,
                                       "cancelled": 0}
        warnings = [line for line in completed.stderr.splitlines() if "warning:" in line]
        assert len(warnings) == 1, completed.stderr
        assert f"history store {server.url} is unreachable" in warnings[0]
        spool = Path(re.search(r"Results are kept in (\S+\.jsonl)", warnings[0]).group(1))
        assert spool.parent == tmp_path / "xdg" / "testlooper"
        spooled = [json.loads(line) for line in spool.read_text().splitlines()]
        assert sorted(r["task"] for r in spooled) == ["bad/linux", "ok/linux", "stopper/linux"]

        server.start()  # the same port and directory
        assert [r.task for r in stored_runs(server.url, project, project.head())] == ["first/linux"]
        replay = tl(run_args(other, tmp_path, "--test", "pass/linux", store=server.url), env)
        assert replay.returncode == 0, explain(replay)
        assert f"recorded 3 results that an earlier run kept in {spool}" in replay.stderr
        assert not spool.exists()
        recorded = stored_runs(server.url, project, project.head(), with_cases=True)
        assert sorted((r.task, r.result, len(r.cases)) for r in recorded) == [
            ("bad/linux", "failed", 2), ("first/linux", "passed", 0), ("ok/linux", "passed", 2),
            ("stopper/linux", "passed", 0)]


# -- 12. Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_kills_the_tasks_and_records_them_cancelled(repo, tmp_path, env):
    # A shell's background jobs ignore SIGINT, and Python then keeps ignoring it: restore the
    # default, as an interactive terminal would have it.
    process = subprocess.Popen(
        [sys.executable, "-m", "testlooper", *run_args(repo, tmp_path, "--test", "sleeper/linux", "--jobs", "2",
                                                        "--json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        pids = wait_for(lambda: len(read_pids(scratch(env), "sleeper-*.pid")) == 2 and
                        read_pids(scratch(env), "sleeper-*.pid"), 30, "two sleepers to start")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, f"{stdout}\n{stderr}"
        for pid in pids:
            wait_for(lambda: not process_alive(pid), 5, f"the task process {pid} to be gone")
        document = json.loads(stdout)
        assert sorted((r["run_index"], r["result"]) for r in document["runs"]) == [
            (0, "cancelled"), (1, "cancelled"), (2, "cancelled")]
        assert document["summary"]["cancelled"] == 3 and sum(document["summary"].values()) == 3
        recorded = stored_runs(str(tmp_path / "history.db"), repo, repo.head())
        assert sorted((r.run_index, r.result) for r in recorded) == [(0, "cancelled"), (1, "cancelled"),
                                                                      (2, "cancelled")]
    finally:
        stop_process(process)
        kill_quietly(read_pids(scratch(env), "sleeper-*.pid"))


# -- 13. a worker dies -------------------------------------------------------------------------


def test_a_dead_worker_is_an_error_and_the_other_runs_go_on(repo, tmp_path, env):
    completed = tl(run_args(repo, tmp_path, "--test", "dies/linux", "--test", "pass/linux",
                                    "--test", "consume/linux", "--jobs", "2", "--json"), env)
    assert completed.returncode == 1, explain(completed)
    document = json_document(completed)
    dead = runs_of(document, "dies/linux")
    assert [r["result"] for r in dead] == ["error", "error"]
    for run in dead:
        assert run["message"].startswith("the worker exited with status -9 without reporting a result"), run
        assert "its own log: " in run["message"]
    assert [r["result"] for r in runs_of(document, "pass/linux")] == ["passed"]
    assert [r["result"] for r in runs_of(document, "consume/linux")] == ["passed"]
    assert document["summary"] == {"passed": 3, "failed": 0, "timeout": 0, "error": 2, "blocked": 0, "cancelled": 0}
    recorded = stored_runs(str(tmp_path / "history.db"), repo, repo.head())
    assert sorted((r.task, r.result) for r in recorded if r.task == "dies/linux") == [("dies/linux", "error")] * 2


# -- 14. containers ----------------------------------------------------------------------------

FAILING_DOCKER = """#!/bin/sh
echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?" >&2
exit 1
"""

# Logs every call (one argument per line), and runs `run ... IMAGE /bin/sh -c CMD` here.
FAKE_DOCKER = """#!/bin/sh
{ echo "--- call"; for arg in "$@"; do echo "$arg"; done; } >> "$TL_SCRATCH/docker-calls"
env > "$TL_SCRATCH/docker-env-$$"
case "$1" in
  info) echo "fake docker"; exit 0 ;;
  ps|rm) exit 0 ;;
  run) shift ;;
  *) echo "fake docker: unexpected $1" >&2; exit 1 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    --rm|--init) shift ;;
    --workdir) cd "$2" || exit 125; shift 2 ;;
    --network|--label|--volume|--env) shift 2 ;;
    -*) echo "fake docker: unknown option $1" >&2; exit 125 ;;
    *) break ;;
  esac
done
shift  # the image
exec "$@"
"""


def tool_dir(tmp_path: Path, name: str, scripts: dict[str, str]) -> str:
    """A folder of executables, plus git (the runner reads the repository with it)."""
    directory = tmp_path / name
    directory.mkdir()
    os.symlink(shutil.which("git"), directory / "git")
    for script_name, text in scripts.items():
        (directory / script_name).write_text(text)
        (directory / script_name).chmod(0o755)
    return str(directory)


@pytest.mark.parametrize("scripts, message", [
    ({}, "--isolation container needs docker or podman, and neither is installed"),
    ({"docker": FAILING_DOCKER}, "--isolation container: docker is installed but not usable (Cannot connect"),
], ids=["no-engine", "engine-not-running"])
def test_container_isolation_without_a_working_engine_is_a_usage_error(repo, tmp_path, env, scripts, message):
    env["PATH"] = tool_dir(tmp_path, "bin", scripts)
    completed = tl(run_args(repo, tmp_path, "--test", "pass/linux", "--isolation", "container"), env)
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr.splitlines()[-1].startswith(f"testlooper: error: {message}"), completed.stderr
    assert "Traceback" not in completed.stderr


def test_container_isolation_runs_each_stage_in_the_image(repo, tmp_path, env):
    env["PATH"] = tool_dir(tmp_path, "bin", {"docker": FAKE_DOCKER}) + os.pathsep + "/usr/bin:/bin"
    completed = tl(run_args(repo, tmp_path, "--test", "consume/linux", "--isolation", "container",
                                    "--json"), env)
    assert completed.returncode == 0, explain(completed)
    (consumer,) = runs_of(json_document(completed), "consume/linux")
    assert "greeting: hello" in Path(consumer["log"]).read_text()
    calls = [call.strip("\n").split("\n") for call in
             (scratch(env) / "docker-calls").read_text().split("--- call\n") if call]
    runs = [call[1:] for call in calls if call[0] == "run"]
    assert len(runs) == 2  # the build's command and the test's
    for args in runs:
        image = args.index("example/runner:1")
        assert args[image + 1:image + 3] == ["/bin/sh", "-c"]
        volume = args[args.index("--volume") + 1]
        workspace = volume.split(":")[0]
        assert volume == f"{workspace}:{workspace}" and workspace.startswith(str(tmp_path / "out" / "work"))
        assert args[args.index("--workdir") + 1] == f"{workspace}/inputs"
        passed = [args[i + 1] for i, arg in enumerate(args[:image]) if arg == "--env"]
        assert {"GREETING", "TEST_INPUTS", "TEST_OUTPUT_DIR", "TEST_BUILD_OUTPUT_DIR", "TEST_SRC_DIR"} <= set(passed)
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in passed), passed  # names, no values
    # No token: not on a command line (a token is 43 URL-safe characters), nor in the engine's
    # environment, from which a container could be handed it.
    for call in calls:
        assert not [arg for arg in call if re.fullmatch(r"[A-Za-z0-9_-]{43}", arg)], call
    for environment in scratch(env).glob("docker-env-*"):
        assert "TESTLOOPER_WORKER_TOKEN" not in environment.read_text()


# -- snapshots ---------------------------------------------------------------------------------


def test_working_tree_snapshot_is_what_git_would_commit_and_excludes_the_output(tmp_path, env):
    """Ignored files stay out of the copy, --output inside the tree is not copied into itself,
    and the snapshot is removed when the command ends."""
    definitions = DEFINITIONS.replace("  pass/linux:\n", "  look/linux:\n    dependencies: {src: HEAD}\n"
                                      "    command: ls -a src > \"$TL_SCRATCH/listing\"\n  pass/linux:\n")
    project = make_repo(tmp_path / "tree", definitions, {"value.txt": "v\n", ".gitignore": "venv/\n"})
    (project.path / "venv").mkdir()
    (project.path / "venv" / "big.bin").write_text("ignored")
    (project.path / "untracked.txt").write_text("not ignored")
    output = project.path / "out"
    completed = tl(["run", project.path, "--store", tmp_path / "h.db", "--output", output, "--test", "look/linux"],
                   env)
    assert completed.returncode == 0, explain(completed)
    listing = (scratch(env) / "listing").read_text().split()
    assert "untracked.txt" in listing and "value.txt" in listing
    assert "venv" not in listing and "out" not in listing and ".git" not in listing
    assert list((output / "sources").iterdir()) == []


def test_two_runs_of_different_trees_at_once_keep_their_own_sources(tmp_path, env):
    """Each command snapshots into a folder of its own (they once shared one and mixed code)."""
    definitions = DEFINITIONS.replace("  pass/linux:\n", "  which/linux:\n    dependencies: {src: HEAD}\n"
                                      "    runs: 4\n    command: sleep 0.3; cat src/value.txt\n  pass/linux:\n")
    first = make_repo(tmp_path / "first", definitions, {"value.txt": "FIRST\n"})
    second = make_repo(tmp_path / "second", definitions, {"value.txt": "SECOND\n"})
    output = tmp_path / "shared-out"
    commands = [start_tl(["run", project.path, "--store", tmp_path / f"{name}.db", "--output", output,
                          "--test", "which/linux", "--jobs", "1", "--json"], env)
                for name, project in (("first", first), ("second", second))]
    documents = []
    for process in commands:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        documents.append(json.loads(out))
    for document, expected in zip(documents, ("FIRST", "SECOND")):
        for run in runs_of(document, "which/linux"):
            assert expected in Path(run["log"]).read_text()


# -- running a commit again, and hard stops -------------------------------------------------------


def test_running_a_commit_again_adds_runs_to_its_history(repo, tmp_path, env):
    first = json_document(tl(run_args(repo, tmp_path, "--test", "pass/linux", "--json"), env))
    second = json_document(tl(run_args(repo, tmp_path, "--test", "pass/linux", "--json"), env))
    assert [r["run_index"] for r in first["runs"]] == [0]
    assert [r["run_index"] for r in second["runs"]] == [1]
    recorded = stored_runs(str(tmp_path / "history.db"), repo, repo.head())
    assert sorted(r.run_index for r in recorded if r.task == "pass/linux") == [0, 1]


def test_a_hard_stop_kills_the_tasks_left_by_a_killed_agent(tmp_path):
    """Task commands run in sessions of their own, so killing an agent's process group misses
    them; they are found by the run id every command inherits."""
    from testlooper.local.runner import kill_task_processes

    environment = {**os.environ, "TEST_LOOPER_TEST_ID": "run-to-kill"}
    orphan = subprocess.Popen(["sleep", "300"], env=environment, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], env={**os.environ, "TEST_LOOPER_TEST_ID": "another-run"},
                                 start_new_session=True)
    try:
        kill_task_processes("run-to-kill", str(tmp_path))
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        kill_quietly([orphan.pid, bystander.pid])
        orphan.wait(timeout=5)
        bystander.wait(timeout=5)


def test_a_commit_with_no_finished_run_is_not_called_all_passed():
    from testlooper import terminal
    from testlooper.cli.run_cmd import _render_comparison

    lines = _render_comparison({"previous": None, "classes": {}, "counts": {}}, terminal.Styler(False))
    assert lines == ["", "no run of this commit finished, so there is nothing to compare"]


def test_working_tree_snapshot_keeps_nested_repositories(tmp_path, env):
    """git lists a submodule (or an embedded repository) as one entry: its files are copied."""
    definitions = DEFINITIONS.replace("  pass/linux:\n", "  nested/linux:\n    dependencies: {src: HEAD}\n"
                                      "    command: cat src/vendor/lib.txt\n  pass/linux:\n")
    project = make_repo(tmp_path / "outer", definitions, {"value.txt": "v\n"})
    vendor = GitRepo(project.path / "vendor")
    vendor.commit({"lib.txt": "vendored library\n"})
    project.git("add", "vendor")
    project.git("commit", "-q", "-m", "Add vendor")
    completed = tl(["run", project.path, "--store", tmp_path / "h.db", "--output", tmp_path / "out",
                    "--test", "nested/linux", "--json"], env)
    assert completed.returncode == 0, explain(completed)
    (run,) = runs_of(json_document(completed), "nested/linux")
    assert "vendored library" in Path(run["log"]).read_text()
