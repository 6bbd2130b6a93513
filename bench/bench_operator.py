"""The operator's own cost, beside a bare kopf operator doing the same Kubernetes work in the same
emulator process (the emulator's cost grows with the requests it has served, so absolute figures
measure it as much as us; ratios to the bare operator do not).

    python bench/bench_operator.py [--tasks 500] [--webhooks 10] [--repos 100 --idle 120]
                                   [--present 5000] [--skip NAME ...]

Prints JSON with, for each measure, our figure, the bare operator's and their ratio:
- fan_out: one commit with --tasks tests -> all its TestRuns created (wall time from the Repo's
  creation, and the operator's CPU per TestRun), against the bare operator creating as many
  objects of the same shape from one handler;
- webhook: a signed push -> the new commit's first TestRun, median of --webhooks pushes;
- idle: --repos Repos polled every 60 s with nothing new, the operator's CPU share over --idle
  seconds, beside the bare operator idling with its objects;
- memory: the operator's resident memory with --present TestRuns in its namespace.
CPU is the operator process's own (/proc), never the emulator's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "operator"))
NAMESPACE = "bench"
GROUP, VERSION = "testlooper.dev", "v1alpha1"
# The bare operator does the Repo handler's work: one Repo in, TestRuns out.
os.environ.setdefault("BARE_TRIGGER", f"{GROUP}/{VERSION}/repos/Repo")
os.environ.setdefault("BARE_TARGET", f"{GROUP}/{VERSION}/testruns/TestRun")

import bare_operator  # noqa: E402
from cluster_helpers import signed_push  # noqa: E402
from gitrepo import GitRepo  # noqa: E402
from kube_bench_support import Emulator, cpu_seconds, resident_bytes  # noqa: E402
from operator_process import OperatorProcess
from run_helpers import wait_for  # noqa: E402


def definitions(tests: int) -> str:
    """`tests` tests from a foreach, with a shared environment and a build each consumes."""
    return f"""looper_version: 5
environments:
  linux:
    platform: linux
    image: {{name: "registry.example.com/team/build-env:2026.11"}}
    variables: {{PYTHONHASHSEED: "0"}}
builds:
  build/linux: {{command: "make"}}
tests:
  foreach: {{n: [{", ".join(str(i) for i in range(tests))}]}}
  repeat:
    suite${{n}}/linux:
      command: "pytest -q tests/test_${{n}}.py"
      dependencies: {{build: build/linux, src: HEAD}}
"""


def make_origin(directory: Path, tests: int) -> tuple[GitRepo, Path]:
    work = GitRepo(directory / f"work-{tests}")
    work.commit({"testlooper.yml": definitions(tests)}, "first")
    bare = directory / f"origin-{tests}.git"
    work.git("clone", "--quiet", "--bare", str(work.path), str(bare))
    work.git("remote", "add", "origin", str(bare))
    return work, bare


def repo_body(name: str, url: str, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Repo", "metadata": {"name": name},
            "spec": {"url": url, "branches": ["main"], "pollIntervalSeconds": 3600, **spec}}


def create(kube, plural: str, body: dict) -> None:
    kube.api("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{plural}", body)


def start_operator(kube, directory: Path) -> OperatorProcess:
    return OperatorProcess(kube, directory, namespaces=[NAMESPACE], client="testlooper").start()


def fan_out(kube, directory: Path, tasks: int) -> dict:
    kube.reset()  # keeps the namespace the emulator started with
    directory.mkdir(parents=True, exist_ok=True)
    _work, bare = make_origin(directory, tasks - 1)  # the build plus tasks - 1 tests
    operator = start_operator(kube, directory)
    try:
        time.sleep(2)  # kopf's start-up (discovery, watches) is not the fan-out
        cpu_before, emulator_before = cpu_seconds(operator.process.pid), kube.cpu_seconds()
        started = time.perf_counter()
        create(kube, "repos", repo_body("fanout", f"file://{bare}"))
        kube.wait_for_count(GROUP, VERSION, "testruns", tasks, NAMESPACE)
        wall = time.perf_counter() - started
        cpu = cpu_seconds(operator.process.pid) - cpu_before
        emulator_cpu = kube.cpu_seconds() - emulator_before
    finally:
        operator.stop()
    return {"testruns": tasks, "wall_seconds": wall, "operator_cpu_seconds": cpu,
            "operator_cpu_ms_per_object": cpu / tasks * 1000, "emulator_cpu_seconds": emulator_cpu}


def bare_fan_out(kube, count: int) -> dict:
    result = bare_operator._fan_out_once(kube, count, NAMESPACE, 0)
    result["operator_cpu_ms_per_object"] = result["operator_cpu_seconds"] / count * 1000
    return result


def webhook_latency(kube, directory: Path, pushes: int) -> dict:
    kube.reset()  # keeps the namespace the emulator started with
    work, bare = make_origin(directory / "webhook", 2)
    url = f"file://{bare}"
    kube.api("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets",
             {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hook"},
              "data": {"secret": "YmVuY2g="}})  # "bench"
    operator = start_operator(kube, directory)
    latencies = []
    try:
        create(kube, "repos", repo_body("hooked", url, webhookSecret="hook"))
        kube.wait_for_count(GROUP, VERSION, "testruns", 3, NAMESPACE)
        for index in range(pushes):
            sha = work.commit({f"change-{index}.txt": str(index)}, f"change {index}")
            work.git("push", "--quiet", "origin", "main")
            body, headers = signed_push(url, sha, secret="bench")
            started = time.perf_counter()
            status, answer = operator.webhook("/webhooks/github", body, headers)
            assert status == 202, answer
            kube.wait_for_count(GROUP, VERSION, "testruns", 1, NAMESPACE,
                                label_selector=f"testlooper.dev/commit={sha}", timeout=60)
            latencies.append(time.perf_counter() - started)
    finally:
        operator.stop()
    return {"pushes": pushes, "median_seconds": statistics.median(latencies),
            "max_seconds": max(latencies), "all_seconds": [round(x, 3) for x in latencies]}


def idle_polling(kube, directory: Path, repos: int, seconds: float) -> dict:
    kube.reset()  # keeps the namespace the emulator started with
    _work, bare = make_origin(directory / "idle", 1)
    operator = start_operator(kube, directory)
    try:
        for index in range(repos):
            create(kube, "repos", repo_body(f"idle-{index:03d}", f"file://{bare}", pollIntervalSeconds=60))
        kube.wait_for_count(GROUP, VERSION, "testruns", repos * 2, NAMESPACE)
        time.sleep(5)  # the first polls' status patches and the TestRuns' first status
        before = cpu_seconds(operator.process.pid)
        time.sleep(seconds)
        share = (cpu_seconds(operator.process.pid) - before) / seconds * 100
        polls = operator.metric("testlooper_git_poll_duration_seconds_count", namespace=NAMESPACE, repo="idle-000")
    finally:
        operator.stop()
    return {"repos": repos, "poll_interval_seconds": 60, "measured_seconds": seconds,
            "operator_cpu_percent_of_one_core": share, "polls_of_one_repo_so_far": polls}


def bare_idle(kube, seconds: float) -> dict:
    result = bare_operator._fan_out_once(kube, 100, NAMESPACE, seconds)
    return {"objects": 100, "measured_seconds": seconds, "operator_cpu_percent_of_one_core": result["idle_cpu_percent"]}


def memory_with(kube, directory: Path, present: int) -> dict:
    kube.reset()  # keeps the namespace the emulator started with
    _work, bare = make_origin(directory / "memory", present - 1)
    operator = start_operator(kube, directory)
    try:
        started = time.perf_counter()
        create(kube, "repos", repo_body("big", f"file://{bare}"))
        kube.wait_for_count(GROUP, VERSION, "testruns", present, NAMESPACE, timeout=3600)
        created = time.perf_counter() - started
        wait_for(lambda: operator.metric("testlooper_testruns_created_total", namespace=NAMESPACE, repo="big") == present,
                 timeout=600, what="the operator's own count")
        time.sleep(10)  # the TestRuns' first status patches
        rss = resident_bytes(operator.process.pid)
    finally:
        operator.stop()
    return {"testruns": present, "seconds_to_create": created, "operator_rss_mb": rss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="fan-out runs of each operator (the median)")
    parser.add_argument("--webhooks", type=int, default=10)
    parser.add_argument("--repos", type=int, default=100)
    parser.add_argument("--idle", type=float, default=120, metavar="SECONDS")
    parser.add_argument("--present", type=int, default=5000)
    parser.add_argument("--skip", action="append", default=[], choices=["fan_out", "webhook", "idle", "memory"])
    args = parser.parse_args()
    results: dict = {"bench": "operator", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as scratch, Emulator(namespaces=[NAMESPACE]) as kube:
        directory = Path(scratch)
        if "fan_out" not in args.skip:
            # Alternate ours and the bare operator's, so both see the same machine load.
            pairs = [(fan_out(kube, directory / f"fan-{i}", args.tasks), bare_fan_out(kube, args.tasks))
                     for i in range(args.repeat)]
            ours, bare = (_median_run([pair[k] for pair in pairs]) for k in (0, 1))
            results["fan_out"] = {
                "repeats": args.repeat, "ours": _rounded(ours), "bare": _rounded(bare),
                "wall_ratio": round(ours["wall_seconds"] / bare["wall_seconds"], 2),
                "cpu_per_object_ratio": round(ours["operator_cpu_ms_per_object"] / bare["operator_cpu_ms_per_object"], 2),
                "targets": {"wall_ratio": 1.5, "cpu_per_object_ratio": 1.5},
            }
        if "webhook" not in args.skip:
            results["webhook"] = _rounded({**webhook_latency(kube, directory, args.webhooks), "target_median_seconds": 2})
        if "idle" not in args.skip:
            ours = idle_polling(kube, directory, args.repos, args.idle)
            bare = bare_idle(kube, args.idle)
            results["idle"] = {"ours": _rounded(ours), "bare": _rounded(bare), "target_percent": 20}
        if "memory" not in args.skip:
            results["memory"] = _rounded({**memory_with(kube, directory, args.present), "target_mb": 300})
    print(json.dumps(results, indent=2))
    return 0


def _median_run(runs: list[dict]) -> dict:
    """Each figure's median over the runs."""
    return {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float) else runs[0][key]
            for key in runs[0]}


def _rounded(values: dict) -> dict:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in values.items()}


if __name__ == "__main__":
    sys.exit(main())
