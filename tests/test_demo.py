"""The README's quick start on the demo repository (examples/demo, made by
examples/make-demo-repo.sh): the first commit is green apart from a flaky test, the second
breaks `unit/linux :: test_subtract`."""

from __future__ import annotations

import random
import re
import subprocess

import pytest

from run_helpers import DEMO_SCRIPT, cli_env, explain, stored_runs, tl

NETWORK_RUNS = 6


def network_failures() -> list[int]:
    """The run indexes on which the demo's flaky test loses its "race": it seeds its random
    generator with TEST_LOOPER_RUN_INDEX and fails below 0.4 (examples/demo/tests/test_network.py)."""
    return [i for i in range(NETWORK_RUNS) if random.Random(i).random() < 0.4]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    made = subprocess.run(["sh", str(DEMO_SCRIPT), str(base / "demo")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return base / "demo"


def test_quick_start_on_the_demo(demo, tmp_path):
    env = cli_env(tmp_path)
    assert network_failures() == [1, 3, 4]  # so "flaky 3/6", as the README shows
    head = subprocess.run(["git", "rev-parse", "HEAD", "HEAD~1"], cwd=demo, capture_output=True, text=True,
                          check=True).stdout.split()
    second, first = head
    common = ["--output", str(tmp_path / "out")]  # the store: the default one, under XDG_DATA_HOME
    store = str(tmp_path / "xdg" / "testlooper" / "history.db")

    # The first commit: the build passes, the unit tests consume it, the network test is flaky.
    # Some of its runs fail, so the command exits 1.
    completed = tl(["run", str(demo), "--rev", "HEAD~1", *common], env)
    assert completed.returncode == 1, explain(completed)
    rows = {
        "calc/linux": r"build\s+passed\s+1/1\s+-",
        "unit/linux": r"test\s+passed\s+1/1\s+3/3",
        "network/linux": r"test\s+flaky\s+3/6\s+9/12",
    }
    for task, row in rows.items():
        assert re.search(rf"^{task}\s+{row}\s", completed.stdout, re.MULTILINE), completed.stdout
    assert "8 runs: 5 passed, 3 failed" in completed.stdout
    assert "first tested commit of this branch in the history: nothing to compare with yet" in completed.stdout
    assert re.search(r"^\s+new, flaky\s+network/linux :: network.test_reconnect \(3/6 runs passed\)",
                     completed.stdout, re.MULTILINE), completed.stdout
    recorded = stored_runs(store, demo, first, with_cases=True)
    assert sorted((r.task, r.result) for r in recorded if r.task != "network/linux") == [
        ("calc/linux", "passed"), ("unit/linux", "passed")]
    network = sorted((r for r in recorded if r.task == "network/linux"), key=lambda r: r.run_index)
    assert [r.run_index for r in network] == list(range(NETWORK_RUNS))
    assert [r.run_index for r in network if r.result == "failed"] == network_failures()
    assert all(r.result == "passed" for r in network if r.run_index not in network_failures())
    for run in network:
        assert {c.name: c.success for c in run.cases} == {
            "network.test_connect": True, "network.test_reconnect": run.run_index not in network_failures()}

    # The working tree (the second commit, clean, so recorded): test_subtract is newly broken.
    completed = tl(["run", str(demo), *common], env)
    assert completed.returncode == 1, explain(completed)
    assert re.search(r"^\s+broken\s+unit/linux :: test_subtract\b", completed.stdout, re.MULTILINE), completed.stdout
    assert re.search(r"^unit/linux\s+test\s+failed\s+0/1\s+2/3\b", completed.stdout, re.MULTILINE), completed.stdout
    assert f"compared with the nearest earlier tested commit ({first[:12]})" in completed.stdout
    assert len(stored_runs(store, demo, first)) == 8 and len(stored_runs(store, demo, second)) == 8
    unit_runs = [r for r in stored_runs(store, demo, second, with_cases=True) if r.task == "unit/linux"]
    assert {c.name: c.success for c in unit_runs[0].cases} == {"test_add": True, "test_subtract": False,
                                                              "test_multiply": True}
