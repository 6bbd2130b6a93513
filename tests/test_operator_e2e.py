"""The operator end to end: the real `testlooper operator` process against the Kubernetes
emulator, driven from the user's side with the real kubectl, with git repositories over file://.

1. a WorkerPool and a Repo are applied, then a commit is pushed: its TestRuns appear;
2. `kubectl get` shows them with the printer columns;
3. a signed push webhook creates the next commit's TestRuns without waiting for the poll;
4. a force push cancels the TestRuns of the commit no branch contains any more;
5. a second replica stands by while the first runs, takes over when it stops, and creates
   nothing twice;
and the RBAC the chart grants is exactly what the operator used.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from chart_helpers import rbac_triples, render_chart
from cluster_helpers import NAMESPACE, list_testruns, repo_object, signed_push, writes
from gitrepo import GitRepo
from operator_process import OperatorProcess
from run_helpers import wait_for
from testlooper.kube.objects import testrun_name

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "cluster"
DEMO = ROOT / "examples" / "demo"
DEMO_TASKS = ["calc/linux", "network/linux", "unit/linux"]


@pytest.fixture
def origin(tmp_path):
    """The demo project in a working clone, pushing to a bare repository served over file://."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on the PATH (these machines have v1.32 in /usr/bin)")
    work = GitRepo(tmp_path / "work")
    shutil.copytree(DEMO, work.path, dirs_exist_ok=True)
    bare = tmp_path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("remote", "add", "origin", str(bare))
    return work, bare


def apply_examples(kube, tmp_path: Path, url: str, **spec) -> None:
    """The shipped examples, as a user applies them, with the Repo pointed at `url`."""
    kube.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", str(EXAMPLES / "01-secrets.yaml"),
                 "-f", str(EXAMPLES / "02-workerpool.yaml"))
    repo = yaml.safe_load((EXAMPLES / "03-repo.yaml").read_text())
    repo["spec"].update(url=url, **spec)
    repo["spec"].pop("credentialsSecret")  # file:// needs none (credentials are tested over HTTP)
    path = tmp_path / "repo.yaml"
    path.write_text(yaml.safe_dump(repo))
    assert "created" in kube.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", str(path)).stdout


def test_push_to_testruns_end_to_end(kube, origin, tmp_path):
    work, bare = origin
    url = f"file://{bare}"
    kube.create_namespace(NAMESPACE)
    operator = OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE], priority=10).start()
    standby = OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE], priority=1, client="operator-b")
    try:
        # 1. Apply a WorkerPool and a Repo, then push a commit: its TestRuns appear within seconds.
        apply_examples(kube, tmp_path, url, pollIntervalSeconds=10, retention={"keepCommits": 1})
        work.git("add", "--all")
        work.git("commit", "--quiet", "-m", "first")
        first = work.head()
        work.git("push", "--quiet", "origin", "main")
        pushed = time.monotonic()
        created = wait_for(lambda: len(list_testruns(kube, **{"testlooper.dev/commit": first})) == 3 and
                           list_testruns(kube, **{"testlooper.dev/commit": first}), timeout=25, what="first TestRuns")
        print(f"push to 3 TestRuns by poll: {time.monotonic() - pushed:.1f}s")
        repo = repo_object(kube)
        by_task = {item["spec"]["task"]: item for item in created}
        assert sorted(by_task) == DEMO_TASKS
        for task, item in by_task.items():
            metadata = item["metadata"]
            assert metadata["name"] == testrun_name("demo", first, task)
            assert len(metadata["name"]) <= 63
            assert metadata["labels"]["testlooper.dev/repo"] == "demo"
            assert metadata["labels"]["testlooper.dev/commit"] == first
            assert metadata["labels"]["testlooper.dev/kind"] == item["spec"]["kind"]
            assert metadata["annotations"]["testlooper.dev/task"] == task
            assert metadata["annotations"]["testlooper.dev/branch"] == "main"
            owner, = metadata["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Repo", "demo", repo["metadata"]["uid"], True)
            assert item["spec"]["definition"]["name"] == task
            assert item["spec"]["workerPool"] == "linux"
        assert by_task["network/linux"]["spec"]["runs"] == 6
        assert by_task["calc/linux"]["spec"]["kind"] == "build"
        assert by_task["unit/linux"]["spec"]["dependsOn"] == [testrun_name("demo", first, "calc/linux")]
        wait_for(lambda: all((t.get("status") or {}).get("phase") == "Pending" for t in list_testruns(kube)),
                 what="TestRuns Pending")

        # 2. kubectl shows them as the local `run` table reads.
        table = kube.kubectl("get", "testruns", "-n", NAMESPACE).stdout.splitlines()
        assert table[0].split() == ["NAME", "REPO", "COMMIT", "TASK", "PHASE", "RESULT", "RUNS", "CASES", "AGE"]
        network_row = next(line.split() for line in table if "network/linux" in line)
        assert network_row[1:6] == ["demo", first[:12], "network/linux", "Pending", "0/6"]
        wait_for(lambda: "3 running" in kube.kubectl("get", "repos", "-n", NAMESPACE).stdout, what="repo tally")
        repos = kube.kubectl("get", "repos", "-n", NAMESPACE).stdout.splitlines()
        assert repos[0].split()[:5] == ["NAME", "URL", "BRANCHES", "READY", "LAST"]
        assert f"main@{first[:8]} 3 running" in repos[1] and " True " in repos[1]
        wait_for(lambda: kube.kubectl("get", "workerpools", "-n", NAMESPACE, "-o",
                                      "jsonpath={.items[0].status.queued}").stdout == "8",
                 what="the pool counts 8 queued runs (1 + 6 + 1)")
        pools = kube.kubectl("get", "workerpools", "-n", NAMESPACE).stdout.splitlines()
        assert pools[0].split() == ["NAME", "PROVIDER", "WORKERS", "CORES", "QUEUED", "AGE"]
        assert pools[1].split()[:5] == ["linux", "kubernetes", "0/20", "0", "8"]

        # 3. A webhook push creates the next commit's TestRuns without waiting for the poll
        #    (the poll interval goes up to an hour first: that edit itself is picked up at once).
        kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge",
                     "-p", '{"spec": {"pollIntervalSeconds": 3600}}')
        wait_for(lambda: repo_object(kube)["status"].get("observedGeneration") == repo_object(kube)["metadata"]["generation"],
                 what="the spec edit observed")
        second = work.commit({"calc.py": (work.path / "calc.py").read_text() + "\n# second\n"}, "second")
        work.git("push", "--quiet", "origin", "main")
        body, headers = signed_push(url, second)
        sent = time.monotonic()
        status, answer = operator.webhook("/webhooks/github", body, headers)
        assert status == 202, answer
        wait_for(lambda: len(list_testruns(kube, **{"testlooper.dev/commit": second})) == 3, timeout=10,
                 interval=0.05, what="second commit's TestRuns")
        print(f"webhook to 3 TestRuns: {time.monotonic() - sent:.2f}s")
        assert operator.metric("testlooper_webhooks_total", provider="github", outcome="accepted") == 1

        # 4. A force push: the second commit is no longer on any tested branch, so its TestRuns
        #    are cancelled; the first commit's stay; the new head's are created. Retention
        #    (keepCommits: 1) then deletes the cancelled ones on the next poll, and keeps the
        #    first commit's: they have not ended, so their results are not in the store yet.
        work.git("reset", "--quiet", "--hard", first)
        third = work.commit({"README.md": "third\n"}, "third, rewritten history")
        work.git("push", "--quiet", "--force", "origin", "main")
        status, _ = operator.webhook("/webhooks/github", *signed_push(url, third))
        assert status == 202

        def cancelled_second():
            items = list_testruns(kube, **{"testlooper.dev/commit": second})
            return len(items) == 3 and all(i["spec"].get("cancel") and (i.get("status") or {}).get("phase") == "Cancelled"
                                           for i in items) and items
        for item in wait_for(cancelled_second, what="the orphaned TestRuns cancelled"):
            assert item["status"]["result"] == "cancelled"
        wait_for(lambda: len(list_testruns(kube, **{"testlooper.dev/commit": third})) == 3, what="third commit")
        status, _ = operator.webhook("/webhooks/github", *signed_push(url, third))
        assert status == 202
        wait_for(lambda: list_testruns(kube, **{"testlooper.dev/commit": second}) == [], what="retention")
        assert len(list_testruns(kube, **{"testlooper.dev/commit": first})) == 3

        # 5. A second replica (lower priority) stands by: it writes nothing while the first runs.
        #    When the first stops (SIGTERM, as a rolling update does), it takes over, polls, and
        #    creates nothing twice. The old hook path keeps working.
        before = {item["metadata"]["name"] for item in list_testruns(kube)}
        standby.start()
        time.sleep(2)
        assert writes(kube, "operator-b") == [], "a standby replica must not act"
        assert operator.stop() == 0, "SIGTERM must end the operator cleanly"
        mark = len(kube.requests(client="operator-b"))
        wait_for(lambda: any(r["resource"] == "repos/status" for r in writes(kube, "operator-b")), timeout=30,
                 what="the standby replica's first poll")
        status, _ = standby.webhook("/githubReceivedAPush", *signed_push(url, third))
        assert status == 202
        time.sleep(1.5)
        assert [r for r in kube.requests(client="operator-b")[mark:] if r["verb"] == "create"
                and r["resource"] == "testruns"] == []
        assert {item["metadata"]["name"] for item in list_testruns(kube)} == before
        assert standby.stop() == 0

        check_rbac(kube.permissions(client="operator") | kube.permissions(client="operator-b"),
                   not_used_here=RUN_PERMISSIONS)
        assert "Traceback" not in operator.log() + standby.log()
    finally:
        operator.stop()
        standby.stop()


# A TestRun read as stored now: the decisions start from the watch's copy, and read afresh only
# when it cannot be trusted (a write conflicted, our own write not back yet). A happy path may
# never need it; tests/test_operator_runs_faults.py (writes racing ours) shows it used.
TESTRUN_FRESH_READ = ("testlooper.dev", "testruns", "get")
# What only running runs as pods uses (tests/test_operator_runs_e2e.py, which checks it uses
# every one of them but TESTRUN_FRESH_READ): the operator above runs without --api-url, so it
# never does. (It lists pods all the same: a WorkerPool's status counts what its pods hold.)
RUN_PERMISSIONS = frozenset({
    ("", "pods", "create"), ("", "pods", "delete"), ("", "pods", "watch"),
    ("", "secrets", "create"), ("", "secrets", "delete"), ("", "secrets", "list"),
    ("testlooper.dev", "testruns", "get"),
})


def granted_permissions() -> set[tuple[str, str, str]]:
    """What the chart grants an operator watching NAMESPACE, as these tests run it (the rules
    are written once, in charts/testlooper/templates/_helpers.tpl): every rule of the rendered
    ClusterRole and Roles expanded to (group, resource, verb) triples."""
    return rbac_triples(render_chart({"watchNamespaces": [NAMESPACE]}, namespace=NAMESPACE))


def check_rbac_subset(used: set[tuple[str, str, str]]) -> None:
    granted = granted_permissions()
    assert used - granted == set(), f"used but not granted: {sorted(used - granted)}"


def check_rbac(used: set[tuple[str, str, str]], not_used_here: frozenset = frozenset()) -> None:
    """The chart's ClusterRole grants exactly what the operator used: nothing missing, nothing
    unused but `not_used_here` (which another test shows used)."""
    check_rbac_subset(used)
    granted = granted_permissions()
    assert granted - used == set(not_used_here), f"granted but never used in the tests: {sorted(granted - used)}"
