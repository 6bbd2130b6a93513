"""`testlooper run` under a hostile user: commands racing on one commit, output folders in the
working tree, stores and spools that cannot be written, bad `--store` and `--output` paths, a
disk that fills up. Each fault ends in a clear line (or a clear `error` result) and loses no
result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redis_server import RedisServer
from run_helpers import cli_env, explain, json_document, make_repo, start_tl, stored_runs, tl

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
    documents = []
    for process in commands:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        documents.append(json.loads(out))
    assert len(list(Path(env["TL_SCRATCH"]).glob("started.*"))) == 6
    indexes = [sorted(r["run_index"] for r in document["runs"]) for document in documents]
    assert sorted(indexes) == [[0, 1, 2], [3, 4, 5]]
    recorded = stored_runs(store, project, project.head(), with_cases=True)
    assert sorted(r.run_index for r in recorded) == [0, 1, 2, 3, 4, 5]
    assert all(r.result == "passed" and len(r.cases) == 1 for r in recorded)
