"""`testlooper run` under a hostile user: commands racing on one commit, output folders in the
working tree, stores and spools that cannot be written, bad `--store` and `--output` paths, a
disk that fills up. Each fault ends in a clear line (or a clear `error` result) and loses no
result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fs_helpers import read_only, small_disk
from redis_server import RedisServer
from run_helpers import cli_env, explain, json_document, make_repo, runs_of, start_tl, stored_runs, tl

DEFINITIONS = r"""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
tests:
  pass/linux:
    runs: 2
    command: |
      echo '{"one": true, "two": true}' > "$TEST_OUTPUT_DIR/testSummary.json"
  fail/linux:
    command: |
      echo '{"one": false}' > "$TEST_OUTPUT_DIR/testSummary.json"
      exit 1
  big/linux:
    command: |
      echo "first line of the log"
      head -c 3000000 /dev/zero | tr '\0' x
      echo "last line of the log"
"""

# Each run waits (up to 10 s) until runs of both commands have started, so the two commands
# surely overlap: each has asked the store for its run indexes before either records a run.
RACING_DEFINITIONS = r"""
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "example/runner:1"}}
tests:
  race/linux:
    runs: 3
    command: |
      touch "$TL_SCRATCH/started.$TEST_LOOPER_TEST_ID"
      i=0
      while [ "$(ls "$TL_SCRATCH" | grep -c '^started\.')" -lt 6 ] && [ $i -lt 200 ]; do
        sleep 0.05; i=$((i + 1))
      done
      echo "{\"case\": true}" > "$TEST_OUTPUT_DIR/testSummary.json"
"""


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


# -- two commands on one commit at once ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_runs_of_one_commit_at_once_keep_both_commands_runs(tmp_path, env, backend, request):
    store = (str(tmp_path / "history.db") if backend == "sqlite"
             else request.getfixturevalue("redis_server").url)
    if backend == "redis":
        import redis
        with redis.Redis.from_url(store) as client:
            client.flushdb()
    project = make_repo(tmp_path / "project", RACING_DEFINITIONS)
    commands = [start_tl(["run", project.path, "--rev", "HEAD", "--store", store, "--output",
                          tmp_path / f"out{n}", "--jobs", "3", "--json"], env) for n in (1, 2)]
    documents, stderrs = [], []
    for process in commands:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        assert "warning" not in err, err
        documents.append(json.loads(out))
        stderrs.append(err)
    assert len(list(Path(env["TL_SCRATCH"]).glob("started.*"))) == 6
    indexes = [sorted(r["run_index"] for r in document["runs"]) for document in documents]
    assert sorted(indexes) == [[0, 1, 2], [3, 4, 5]], "\n".join(stderrs)
    recorded = stored_runs(store, project, project.head(), with_cases=True)
    assert sorted(r.run_index for r in recorded) == [0, 1, 2, 3, 4, 5]
    assert all(r.result == "passed" and len(r.cases) == 1 for r in recorded)


# -- the command's own files inside the working tree ------------------------------------------------


def test_output_spool_and_store_inside_the_working_tree_are_no_uncommitted_change(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    inside = ["--store", "history.db", "--spool", "spool", "--output", "tlout"]
    for attempt in range(2):  # the second run finds the first one's files there
        completed = tl(["run", ".", *inside, "--test", "pass/linux"], env, cwd=project.path)
        assert completed.returncode == 0, explain(completed)
        assert "uncommitted" not in completed.stderr
        assert "results are not kept" not in completed.stderr
    recorded = stored_runs(str(project.path / "history.db"), project, project.head())
    assert sorted(r.run_index for r in recorded) == [0, 1, 2, 3]
    # A real change is still one.
    (project.path / "new-file.txt").write_text("uncommitted\n")
    completed = tl(["run", ".", *inside, "--test", "pass/linux"], env, cwd=project.path)
    assert "with uncommitted changes" in completed.stderr, explain(completed)
    assert len(stored_runs(str(project.path / "history.db"), project, project.head())) == 4


# -- the store down and no spool folder to write ---------------------------------------------------


@pytest.mark.parametrize("unwritable", ["--spool", "default spool"])
def test_store_down_and_spool_unwritable_keeps_results_in_the_output_folder(tmp_path, env, unwritable):
    """Said before the first run starts; the results wait in OUTPUT, and `history --spool OUTPUT`
    (or the next run with that --output) records them once the store is back."""
    project = make_repo(tmp_path / "project", DEFINITIONS)
    (tmp_path / "a-file").write_text("")
    spool_option = []
    if unwritable == "--spool":
        spool_option = ["--spool", str(tmp_path / "a-file" / "spool")]
    else:
        env["XDG_DATA_HOME"] = str(tmp_path / "a-file" / "data")  # the default spool's folder
    server = RedisServer(persistent=True)  # on its port, nothing listens yet
    output = tmp_path / "out"
    try:
        completed = tl(["run", project.path, "--rev", "HEAD", "--store", server.url, "--output", output,
                        "--test", "*/linux", *spool_option], env)
        assert completed.returncode == 1, explain(completed)  # fail/linux failed; nothing crashed
        assert "Traceback" not in completed.stderr
        lines = completed.stderr.splitlines()
        first_start = next(i for i, line in enumerate(lines) if "] start " in line)
        warning = next(i for i, line in enumerate(lines) if "cannot write a spool in" in line)
        assert warning < first_start
        spool = Path(re.search(r"will be kept in (\S+\.jsonl)", lines[warning]).group(1))
        assert spool.parent == output
        assert f"Results are kept in {spool}" in completed.stderr
        assert len(spool.read_text().splitlines()) == 4  # pass twice, fail and big: nothing lost
        assert f"4 results could not reach the history store and wait in {spool}" in completed.stdout

        server.start()
        shown = tl(["history", project.path, "--store", server.url, "--spool", output], env)
        assert shown.returncode == 0, explain(shown)
        assert f"recorded 4 results that an earlier run kept in {spool}" in shown.stderr
        assert "pass/linux" in shown.stdout
        assert not spool.exists()
        recorded = stored_runs(server.url, project, project.head())
        assert sorted((r.task, r.result) for r in recorded) == [
            ("big/linux", "passed"), ("fail/linux", "failed"), ("pass/linux", "passed"), ("pass/linux", "passed")]
    finally:
        server.__exit__(None, None, None)


def test_the_next_run_with_the_same_output_records_what_an_earlier_one_kept_there(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    (tmp_path / "a-file").write_text("")
    server = RedisServer()
    common = ["--store", server.url, "--output", tmp_path / "out", "--spool", tmp_path / "a-file" / "spool",
              "--test", "pass/linux"]
    try:
        kept = tl(["run", project.path, "--rev", "HEAD", *common], env)
        assert kept.returncode == 0, explain(kept)
        server.start()
        later = tl(["run", project.path, "--rev", "HEAD", *common], env)
        assert later.returncode == 0, explain(later)
        assert "recorded 2 results that an earlier run kept in" in later.stderr
        assert sorted(r.run_index for r in stored_runs(server.url, project, project.head())) == [0, 1, 2, 3]
    finally:
        server.__exit__(None, None, None)


# -- faults the user can fix: one line, exit 2 ------------------------------------------------------


def assert_one_line_error(completed, *fragments):
    assert completed.returncode == 2, explain(completed)
    assert completed.stderr.startswith("testlooper: error: "), explain(completed)
    assert completed.stderr.count("\n") == 1, explain(completed)
    for fragment in fragments:
        assert fragment in completed.stderr, explain(completed)


@pytest.mark.parametrize("command", ["run", "watch"])
def test_output_naming_a_file_is_a_usage_error(tmp_path, env, command):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    (tmp_path / "a-file").write_text("")
    more = ["--metrics-port", "0", "--max-polls", "1"] if command == "watch" else []
    completed = tl([command, project.path, "--store", tmp_path / "h.db", "--output", tmp_path / "a-file", *more],
                   env)
    assert_one_line_error(completed, f"cannot write the output folder {tmp_path / 'a-file'}", "not a folder")


def test_a_read_only_output_folder_is_a_usage_error(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    output = tmp_path / "out"
    output.mkdir()
    with read_only(output):
        completed = tl(["run", project.path, "--store", tmp_path / "h.db", "--output", output], env)
    assert_one_line_error(completed, f"cannot write the output folder {output}")
    assert not (tmp_path / "h.db").exists()


def test_a_store_that_is_no_database_is_a_usage_error(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    store = tmp_path / "notes.txt"
    store.write_text("my shopping list\n" * 100)
    for command in (["run", project.path, "--rev", "HEAD", "--output", tmp_path / "out"], ["history", project.path]):
        completed = tl([*command, "--store", store], env)
        assert_one_line_error(completed, f"history store sqlite://{store} is not a SQLite database")
    assert store.read_text() == "my shopping list\n" * 100


def test_a_damaged_store_is_a_usage_error(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    store = tmp_path / "h.db"
    assert tl(["run", project.path, "--rev", "HEAD", "--store", store, "--output", tmp_path / "out",
               "--test", "pass/linux"], env).returncode == 0
    with open(store, "r+b") as database:  # the schema's page, after the 100-byte header
        database.seek(100)
        database.write(b"\xff" * 3000)
    for command in (["run", project.path, "--rev", "HEAD", "--output", tmp_path / "out"], ["history", project.path]):
        completed = tl([*command, "--store", store], env)
        assert_one_line_error(completed, f"history store sqlite://{store} is damaged", "move it aside")


def test_a_read_only_store_is_refused_by_run_and_read_by_history(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    folder = tmp_path / "store"
    folder.mkdir()
    store = folder / "h.db"
    first = tl(["run", project.path, "--rev", "HEAD", "--store", store, "--output", tmp_path / "out",
                "--test", "pass/linux"], env)
    assert first.returncode == 0, explain(first)
    before = store.read_bytes()
    with read_only(folder):
        completed = tl(["run", project.path, "--rev", "HEAD", "--store", store, "--output", tmp_path / "out"], env)
        assert_one_line_error(completed, f"history store sqlite://{store} is read-only")
        shown = tl(["history", project.path, "--store", store], env)
        assert shown.returncode == 0, explain(shown)
        assert "passed 2/2" in shown.stdout
        flaky = tl(["flaky", project.path, "--store", store], env)
        assert flaky.returncode == 0, explain(flaky)
    assert store.read_bytes() == before


def test_a_store_whose_folder_does_not_exist_is_a_usage_error(tmp_path, env):
    project = make_repo(tmp_path / "project", DEFINITIONS)
    store = tmp_path / "typo" / "h.db"
    for command in (["run", project.path, "--rev", "HEAD", "--output", tmp_path / "out"], ["history", project.path]):
        completed = tl([*command, "--store", store], env)
        assert_one_line_error(completed, f"its folder {tmp_path / 'typo'} does not exist")
    assert not (tmp_path / "typo").exists()


# -- the output disk filling up mid-run ------------------------------------------------------------


def test_the_output_disk_filling_up_ends_the_run_in_error_and_keeps_its_log(tmp_path, env):
    """A real full disk: OUTPUT is a 1 MiB tmpfs, and big/linux prints 3 MB."""
    project = make_repo(tmp_path / "project", DEFINITIONS)
    output = tmp_path / "out"
    with small_disk(output, "1m"):
        completed = tl(["run", project.path, "--rev", "HEAD", "--store", tmp_path / "h.db", "--output", output,
                        "--test", "big/linux", "--test", "pass/linux", "--jobs", "1", "--json"], env)
        assert completed.returncode == 1, explain(completed)
        assert "Traceback" not in completed.stderr
        document = json_document(completed)
        (big,) = runs_of(document, "big/linux")
        assert big["result"] == "error"
        assert "no space left on device" in big["message"].lower()
        log = Path(big["log"])
        assert log.parent.parent == output / "runs"
        assert big["log"] in big["message"]
        with open(log, "rb") as kept:
            head = kept.read(4096)
        assert b"first line of the log" in head
        assert log.stat().st_size > 500_000  # kept up to where the disk filled
    recorded = stored_runs(str(tmp_path / "h.db"), project, project.head())
    assert ("big/linux", "error") in [(r.task, r.result) for r in recorded]
