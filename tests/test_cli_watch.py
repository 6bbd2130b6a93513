"""`testlooper watch` end to end: a real watcher process polling a real repository, its
metrics endpoint, SIGTERM, and a reader (`testlooper history`) on the same SQLite store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from redis_server import free_port
from run_helpers import (
    cli_env, explain, kill_quietly, make_repo, start_tl, stop_process, stored_runs, tl, wait_for,
)

WATCH_DEFINITIONS = """
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
tests:
  a/linux:
    dependencies: {src: HEAD}
    command: test ! -e src/a/fail
  b/linux:
    dependencies: {src: HEAD}
    command: test ! -e src/b/fail
test_sets:
  seta: ["a/*"]
  setb: ["b/*"]
triggers:
  - {name: a-changed, paths: ["HEAD/a/*"], test_sets: [seta]}
  - {name: b-changed, paths: ["HEAD/b/*"], test_sets: [setb]}
"""


class Watcher:
    """A `testlooper watch` subprocess whose stderr is collected line by line as it comes."""

    def __init__(self, args: list, env: dict):
        self.process = start_tl(["watch", *args], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        with self.lock:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for line in self.lines:
                    found = re.search(pattern, line)
                    if found:
                        return found
            if self.process.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"watch exited with {self.process.returncode} before {pattern!r}:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.stderr}")
            time.sleep(0.05)

    def tested(self, sha: str, branch: str, timeout: float = 30) -> str:
        """Waits for the watcher's summary of `sha` on `branch`; returns it (`1 passed, 1 failed`)."""
        return self.wait_for_line(rf"\] {sha[:12]} on {re.escape(branch)}: (.*)$", timeout).group(1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.reader.join(timeout=5)
        return self.process.returncode

    def close(self) -> None:
        stop_process(self.process)


def metrics(port: int) -> dict[tuple[str, str], float]:
    """{(metric name, labels text): value} from the Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        found = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if found:
            samples[(found.group(1), found.group(2) or "")] = float(found.group(3))
    return samples


def test_watch_tests_new_heads_by_their_triggers_and_stops_on_sigterm(tmp_path):
    env = cli_env(tmp_path)
    repo = make_repo(tmp_path / "project", WATCH_DEFINITIONS, {"a/x": "1\n", "b/x": "1\n"})
    main_root = repo.head()
    repo.git("checkout", "--quiet", "-b", "feature")
    feature_head = repo.commit({"b/x": "2\n", "b/fail": "yes\n"}, "Break b")
    store = str(tmp_path / "history.db")
    port = free_port()
    watcher = Watcher([str(repo.path), "--interval", "0.5", "--metrics-port", port, "--store", store,
                       "--output", tmp_path / "out"], env)
    try:
        serving = watcher.wait_for_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
        assert int(serving.group(1)) == port
        # Both heads: the root commit counts every path as changed, the feature commit only b/.
        assert watcher.tested(main_root, "main") == "2 passed"
        assert watcher.tested(feature_head, "feature") == "1 failed"
        assert sorted((r.task, r.result) for r in stored_runs(store, repo, main_root)) == [
            ("a/linux", "passed"), ("b/linux", "passed")]
        assert [(r.task, r.result) for r in stored_runs(store, repo, feature_head)] == [("b/linux", "failed")]

        # A new commit on main touching a/ runs a/linux only.
        repo.git("checkout", "--quiet", "main")
        main_next = repo.commit({"a/x": "2\n"}, "Change a")
        assert watcher.tested(main_next, "main") == "1 passed"
        assert [r.task for r in stored_runs(store, repo, main_next)] == ["a/linux"]

        # An untestable commit is reported and skipped; the watcher goes on with the next one.
        repo.git("checkout", "--quiet", "feature")
        untestable = repo.commit({"testlooper.yml": "looper_version: 5\ntests: [unclosed\n", "a/x": "3\n"},
                                 "Break the definitions")
        found = watcher.wait_for_line(rf"{untestable[:12]} is untestable: (.*)$")
        assert re.match(r"testlooper\.yml:\d+:\d+: ", found.group(1)), found.group(0)
        assert stored_runs(store, repo, untestable) == []
        fixed = repo.commit({"testlooper.yml": WATCH_DEFINITIONS, "a/y": "1\n"}, "Fix the definitions")
        assert watcher.tested(fixed, "feature") == "1 passed"
        assert [r.task for r in stored_runs(store, repo, fixed)] == ["a/linux"]

        samples = metrics(port)
        assert samples[("testlooper_runs_total", 'kind="test",result="passed"')] == 4
        assert samples[("testlooper_runs_total", 'kind="test",result="failed"')] == 1
        assert samples[("testlooper_commits_total", 'outcome="tested"')] == 4
        assert samples[("testlooper_commits_total", 'outcome="untestable"')] == 1
        assert samples[("testlooper_runs_in_progress", "")] == 0

        # SIGTERM while it waits for the next poll: a clean stop, status 0.
        assert watcher.stop() == 0, watcher.stderr
        assert watcher.stderr.splitlines()[-1].endswith("] stopped")
        assert "Traceback" not in watcher.stderr
    finally:
        watcher.close()


CONCURRENT_DEFINITIONS = """
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
tests:
  many/linux:
    runs: 10
    command: |
      sleep 0.1
      echo "{\\"case_$TEST_LOOPER_RUN_INDEX\\": true, \\"shared\\": true}" > "$TEST_OUTPUT_DIR/testSummary.json"
"""


def test_watch_records_while_history_reads_the_same_sqlite_store(tmp_path):
    """Two processes on one SQLite file: the watcher writes every run as it finishes while
    `testlooper history` reads again and again. Every read succeeds (WAL: readers never wait),
    and every write lands."""
    env = cli_env(tmp_path)
    repo = make_repo(tmp_path / "project", CONCURRENT_DEFINITIONS)
    heads = {"main": repo.head()}
    for branch in ("b1", "b2", "b3"):
        repo.git("checkout", "--quiet", "-b", branch, "main")
        heads[branch] = repo.commit({f"{branch}.txt": branch}, f"Commit on {branch}")
    repo.git("checkout", "--quiet", "main")
    store = str(tmp_path / "history.db")
    watcher = Watcher([str(repo.path), "--interval", "0.5", "--metrics-port", free_port(), "--store", store,
                       "--output", tmp_path / "out", "--jobs", "2"], env)
    concurrent_rounds = 0  # rounds of reads that started while the watcher still had heads to test
    try:
        watcher.wait_for_line(r"\] start ")
        while True:
            writing = not all(re.search(rf"\] {sha[:12]} on {branch}: ", watcher.stderr)
                              for branch, sha in heads.items())
            for branch in ("main", "b3"):
                read = tl(["history", str(repo.path), "--branch", branch, "--store", store, "--json"], env, timeout=60)
                assert read.returncode == 0, explain(read)
                json.loads(read.stdout)
            if not writing:
                break
            concurrent_rounds += 1
        assert concurrent_rounds >= 2, f"only {concurrent_rounds} rounds of reads while the watcher wrote"
        for branch, sha in heads.items():
            assert watcher.tested(sha, branch, timeout=1) == "10 passed"
            recorded = stored_runs(store, repo, sha, with_cases=True)
            assert sorted(r.run_index for r in recorded) == list(range(10))
            assert all(len(r.cases) == 2 for r in recorded)
        final = json.loads(tl(["history", str(repo.path), "--branch", "b3", "--store", store, "--json"], env).stdout)
        assert heads["b3"] in json.dumps(final)
        assert watcher.stop() == 0, watcher.stderr
        assert "database is locked" not in watcher.stderr and "warning" not in watcher.stderr
    finally:
        watcher.close()


def processes_with_environment(entry: str) -> list[int]:
    """The pids of this machine's processes whose environment holds `entry` (NAME=VALUE)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry.encode() in environ.read().split(b"\0"):
                    pids.append(int(name))
        except (OSError, ValueError):
            continue
    return [pid for pid in pids if pid != os.getpid()]


RESTART_DEFINITIONS = r"""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
builds:
  lib/linux:
    command: |
      echo "built" > "$TEST_BUILD_OUTPUT_DIR/lib.txt"
      echo built >> "$TL_SCRATCH/builds"
tests:
  slow/linux:
    runs: 2
    dependencies: {lib: lib/linux}
    command: |
      echo $$ > "$TL_SCRATCH/slow-$TEST_LOOPER_RUN_INDEX.pid"
      while [ ! -e "$TL_SCRATCH/go" ]; do sleep 0.05; done
      cat lib/lib.txt
      echo '{"works": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
"""


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_restarted_watch_runs_what_the_stopped_one_left_unfinished(tmp_path, stop):
    """A watch stopped while a commit's tests ran (its build had passed) left those runs
    cancelled (SIGTERM) or not recorded at all (SIGKILL). Started again, it runs them, with the
    build they need, so the commit is tested in full; a third watch finds nothing to do."""
    env = cli_env(tmp_path)
    scratch = Path(env["TL_SCRATCH"])
    repo = make_repo(tmp_path / "project", RESTART_DEFINITIONS)
    sha = repo.head()
    store = str(tmp_path / "history.db")
    args = [str(repo.path), "--interval", "0.2", "--metrics-port", "0", "--store", store,
            "--output", tmp_path / "out"]
    first = Watcher(args, env)
    try:
        first.wait_for_line(r"\] start    slow/linux #2")
        wait_for(lambda: len(list(scratch.glob("slow-*.pid"))) == 2, 30, "both test runs to start")
        if stop == "sigterm":
            assert first.stop() == 0, first.stderr
        else:
            first.process.kill()
            first.process.wait(timeout=10)
            # The orphaned agents and tasks (in sessions of their own), as a reboot would.
            kill_quietly(processes_with_environment(f"TL_SCRATCH={scratch}"))
    finally:
        first.close()
    recorded = stored_runs(store, repo, sha)
    assert [(r.task, r.result) for r in recorded if r.task == "lib/linux"] == [("lib/linux", "passed")]
    assert all(r.result == "cancelled" for r in recorded if r.task == "slow/linux")
    assert len([r for r in recorded if r.task == "slow/linux"]) == (2 if stop == "sigterm" else 0)
    if stop == "sigterm":  # what history can know of it: the cancelled runs
        shown = tl(["history", str(repo.path), "--store", store], env)
        assert "Every case passed" not in shown.stdout, explain(shown)
        assert "2 runs ended cancelled or in error: it is not tested in full" in shown.stdout

    (scratch / "go").write_text("")
    second = Watcher(args, env)
    try:
        found = second.wait_for_line(rf"{sha[:12]} was tested only in part: (.*)$")
        assert "running the 3 of its 3 planned runs" in found.group(1)  # the build runs again
        assert second.tested(sha, "main") == "3 passed"
        assert second.stop() == 0, second.stderr
    finally:
        second.close()
    finals = [r for r in stored_runs(store, repo, sha) if r.task == "slow/linux" and r.result == "passed"]
    assert len(finals) == 2
    assert (scratch / "builds").read_text() == "built\nbuilt\n"
    history = json.loads(tl(["history", str(repo.path), "--store", store, "--json"], env).stdout)
    assert history["tasks"]["slow/linux"][""][0]["runs"] == 2
    assert history["tasks"]["slow/linux"]["works"][0]["runs"] == 2

    before = len(stored_runs(store, repo, sha))
    third = Watcher([*args, "--max-polls", "2"], env)
    try:
        assert third.process.wait(timeout=60) == 0, third.stderr
        third.reader.join(timeout=5)
        assert "new head" not in third.stderr
    finally:
        third.close()
    assert len(stored_runs(store, repo, sha)) == before
    assert (scratch / "builds").read_text() == "built\nbuilt\n"
