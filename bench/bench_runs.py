"""Runs becoming pods, the operator beside a bare kopf operator on the same emulator process.

    python bench/bench_runs.py [--runs 500] [--repeat 3] [--present 5000] [--skip NAME ...]

Prints JSON. In each repeat, on one emulator (reset between), one after the other so that both
see the same machine load:
- `many`: --runs TestRuns of one commit (runs: 1 each) created at once by the bench, the real
  `testlooper operator` (--store, --api-url, a WorkerPool of --runs workers) turning them into
  token Secrets and pods. `pods_seconds`: from the first TestRun's creation to the last pod
  stored. Then a fake kubelet in the bench takes each pod: it patches it Running, posts a
  RESULT through the worker API with the run's real token (read through the pod's annotations
  from its token Secret), and patches it Succeeded. `recorded_seconds`: until every TestRun has
  ended and the store holds every run. The operator's CPU (its process alone, /proc; the
  emulator, Redis and this bench are other processes) over that whole span, per run.
- `one`: the same with one TestRun of `runs: --runs`.
- `bare`: bench/bare_operator.py with BARE_MODE=pods turning the same --runs TestRun bodies
  (created the same way) into one pod each: the time to the last pod, its CPU per object.
- `memory` (once): --present TestRuns of one commit and a pool of --runs workers: once --runs
  pods exist, every TestRun has a phase and the kubelet has the pods Running, the operator's
  resident memory, and its CPU share over the next 20 s (admission rounds with that many
  TestRuns queued, and the WorkerPool's usage timer).
Ratios are taken within a repeat; the JSON gives each repeat's and their spread.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "operator"))
NAMESPACE = "bench"
GROUP, VERSION = "testlooper.dev", "v1alpha1"
os.environ["BARE_TARGET"] = f"{GROUP}/{VERSION}/testruns/TestRun"
os.environ["BARE_MODE"] = "pods"

from kube_bench_support import Emulator, OperatorProcess as BareProcess, cpu_seconds, resident_bytes  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402
from testlooper.definitions import resolve_text  # noqa: E402
from testlooper.kube import pods as pod_builder  # noqa: E402
from testlooper.kube.objects import build_testrun  # noqa: E402

COMMIT = "c0ffee" + "0" * 34
ENDED = ("Succeeded", "Failed", "Error", "Cancelled")
CREATE_THREADS = 8


def testrun_bodies(repo: dict, count: int, runs: int) -> list[dict]:
    """`count` TestRuns of one commit, from resolved definitions as the Repo handler makes them."""
    numbers = ", ".join(str(n) for n in range(count))
    resolved = resolve_text(f"""looper_version: 5
environments:
  linux:
    platform: linux
    image: {{name: "busybox:1.36"}}
    variables: {{PYTHONHASHSEED: "0"}}
tests:
  foreach: {{n: [{numbers}]}}
  repeat:
    suite${{n}}/linux:
      command: "sh src/test_${{n}}.sh"
      dependencies: {{src: HEAD}}
      runs: {runs}
""", "testlooper.yml")
    return [build_testrun(repo, commit=COMMIT, branch="main", task=task, kind="test", runs=runs, depends_on=[],
                          worker_pool=None, priority=0)
            for task in resolved["tests"].values()]


def prepare(kube, redis_url: str, workers: int) -> dict:
    """A clean emulator and store, a WorkerPool of `workers`, and a suspended Repo (it owns the
    TestRuns; suspended, it polls nothing). Returns the Repo as stored."""
    kube.reset()
    import redis
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}"
    kube.api("POST", f"{base}/workerpools", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkerPool", "metadata": {"name": "linux"},
        "spec": {"provider": "kubernetes", "platform": "linux", "defaultImage": "busybox:1.36",
                 "maxWorkers": workers}})
    return kube.api("POST", f"{base}/repos", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Repo", "metadata": {"name": "bench"},
        "spec": {"url": "https://git.example.com/bench.git", "branches": ["main"], "suspend": True}})


def create_all(kube, bodies: list[dict]) -> None:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/testruns"
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(lambda body: kube.api("POST", path, body), bodies))


def wait_for_pods(kube, count: int, timeout: float = 900) -> None:
    kube.wait_for_count("", "v1", "pods", count, NAMESPACE, timeout=timeout)


class FakeKubelet:
    """Takes each run pod once: Running, its RESULT posted with the run's own token, Succeeded
    (or, with `finish=False`, only Running)."""

    def __init__(self, kube, finish: bool = True, threads: int = 8):
        self.kube = kube
        self.finish = finish
        self.taken: set[str] = set()
        self.finished = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self):
        while not self._stop.is_set():
            pods = self.kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
            for pod in pods:
                name = pod["metadata"]["name"]
                if name not in self.taken and not pod["metadata"].get("deletionTimestamp"):
                    self.taken.add(name)
                    self._pool.submit(self._run, pod)
            self._stop.wait(0.2)

    def _run(self, pod):
        try:
            self._drive(pod)
        except Exception as error:  # said in the JSON, not lost in a thread
            self.errors.append(f"{pod['metadata']['name']}: {type(error).__name__}: {error}")

    def _drive(self, pod):
        name = pod["metadata"]["name"]
        path = f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        containers = [c["name"] for c in pod["spec"]["containers"]]
        self.kube._call("PATCH", path, {"status": {
            "phase": "Running", "startTime": now,
            "containerStatuses": [{"name": c, "image": "", "imageID": "", "ready": True, "restartCount": 0,
                                   "started": True, "state": {"running": {"startedAt": now}}}
                                  for c in containers]}}, content_type="application/merge-patch+json")
        if not self.finish:
            return
        annotations = pod["metadata"]["annotations"]
        secret = self.kube.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/"
                                      f"{annotations[pod_builder.TOKEN_SECRET_ANNOTATION]}")
        token = base64.b64decode(secret["data"][pod_builder.TOKEN_KEY]).decode()
        api_url = next(variable["value"] for variable in pod["spec"]["initContainers"][0]["env"]
                       if variable["name"] == pod_builder.API_URL_ENV)
        run_id = annotations[pod_builder.RUN_ID_ANNOTATION]
        result = {"result": "passed", "exit_code": 0, "duration_seconds": 0.5, "error": "",
                  "cases": [{"name": "first", "success": True, "duration_seconds": 0.1},
                            {"name": "second", "success": True, "duration_seconds": 0.2}],
                  "case_parse_errors": [], "artifacts": []}
        request = urllib.request.Request(f"{api_url}/runs/{run_id}/result", data=json.dumps(result).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {token}"})
        for attempt in range(20):
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
                break
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 19:
                    raise
                time.sleep(0.5)
        ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status, answer = self.kube._call("PATCH", path, {"status": {
            "phase": "Succeeded",
            "containerStatuses": [{"name": c, "image": "", "imageID": "", "ready": False, "restartCount": 0,
                                   "started": False, "state": {"terminated": {
                                       "exitCode": 0, "reason": "Completed", "startedAt": now,
                                       "finishedAt": ended}}} for c in containers]}},
            content_type="application/merge-patch+json")
        if status not in (200, 404):  # the operator may have deleted it once its RESULT counted
            raise AssertionError(f"pod status patch answered {status}: {answer}")
        self.finished += 1


def testruns_ended(kube) -> tuple[int, int]:
    items = kube.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/testruns")["items"]
    return sum(1 for item in items if (item.get("status") or {}).get("phase") in ENDED), len(items)


def stored_runs(redis_url: str) -> int:
    from testlooper.store import open_store
    store = open_store(redis_url)
    try:
        return len(store.runs(f"{NAMESPACE}/bench", COMMIT))
    finally:
        store.close()


def start_operator(kube, directory: Path, redis_url: str) -> OperatorProcess:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return OperatorProcess(kube, directory, namespaces=[NAMESPACE], port=port, client="testlooper", env=OPERATOR_ENV, args=[
        "--store", redis_url, "--api-url", f"http://127.0.0.1:{port}", "--worker-image", "testlooper/worker:bench"]
    ).start()


PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR", "")
OPERATOR_ENV = {key: os.environ[key] for key in ("MALLOC_ARENA_MAX",) if key in os.environ}


def _profile(pid: int, name: Path):
    """With BENCH_PROFILE_DIR set, py-spy records the operator (collapsed stacks, one file per
    measure) while it is measured."""
    if not PROFILE_DIR:
        return None
    import subprocess
    out = Path(PROFILE_DIR) / f"{name.parent.name}.txt"
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--format", "raw", "--rate", "200", "--gil", "--nonblocking", "-p", str(pid),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ours_once(kube, redis_url: str, directory: Path, testruns: int, runs: int) -> dict:
    repo = prepare(kube, redis_url, testruns * runs)
    bodies = testrun_bodies(repo, testruns, runs)
    operator = start_operator(kube, directory, redis_url)
    try:
        time.sleep(2)  # kopf's start-up (discovery, watches) is not what is measured
        pid = operator.process.pid
        profiler = _profile(pid, directory / "profile.txt")
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        create_all(kube, bodies)
        wait_for_pods(kube, testruns * runs)
        pods_seconds = time.perf_counter() - started
        pods_cpu = cpu_seconds(pid) - cpu_before
        with FakeKubelet(kube) as kubelet:
            deadline = time.monotonic() + 900
            while testruns_ended(kube)[0] < testruns:
                if time.monotonic() > deadline or kubelet.errors:
                    raise AssertionError(f"not all ended: {testruns_ended(kube)}; {kubelet.errors[:3]}")
                time.sleep(0.2)
            recorded_seconds = time.perf_counter() - started
            cpu = cpu_seconds(pid) - cpu_before
            rss = resident_bytes(pid)
        requests = _request_counts(kube, "testlooper")
        recorded = stored_runs(redis_url)
        if recorded != testruns * runs:
            raise AssertionError(f"the store holds {recorded} runs of {testruns * runs}")
        if "Traceback" in operator.log():
            raise AssertionError(operator.log()[-3000:])
    finally:
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=60)
        operator.stop()
    total = testruns * runs
    return {"pods_seconds": pods_seconds, "pods_cpu_ms_per_run": pods_cpu / total * 1000,
            "recorded_seconds": recorded_seconds, "cpu_ms_per_run": cpu / total * 1000, "rss_mb": rss / 2**20,
            "requests_per_run": {key: round(count / total, 2) for key, count in requests.items()}}


def _request_counts(kube, client: str) -> dict[str, int]:
    """The operator's API requests by resource and verb, as the emulator recorded them."""
    counts: dict[str, int] = {}
    for request in kube.requests(client=client):
        key = f"{request.get('resource')} {request.get('verb')}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def bare_once(kube, redis_url: str, count: int) -> dict:
    repo = prepare(kube, redis_url, count)
    bodies = testrun_bodies(repo, count, 1)
    arguments = ["-m", "kopf", "run", "--standalone", "--namespace", NAMESPACE, str(ROOT / "bench" / "bare_operator.py")]
    with BareProcess(kube, arguments, client="bare-operator") as operator:
        operator.wait_until_watching(GROUP, "testruns")
        time.sleep(1)
        cpu_before = operator.cpu_seconds()
        started = time.perf_counter()
        create_all(kube, bodies)
        wait_for_pods(kube, count)
        seconds = time.perf_counter() - started
        cpu = operator.cpu_seconds() - cpu_before
    return {"pods_seconds": seconds, "cpu_ms_per_object": cpu / count * 1000}


def memory_once(kube, redis_url: str, directory: Path, present: int, running: int) -> dict:
    repo = prepare(kube, redis_url, running)
    bodies = testrun_bodies(repo, present, 1)
    operator = start_operator(kube, directory, redis_url)
    samples: list[float] = []
    sampling = threading.Event()

    def sample() -> None:  # the operator's resident memory every 5 s, to tell a peak from growth
        while not sampling.wait(5):
            samples.append(round(resident_bytes(operator.process.pid) / 2**20, 1))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with FakeKubelet(kube, finish=False):
            started = time.perf_counter()
            create_all(kube, bodies)
            wait_for_pods(kube, running, timeout=1800)
            seconds = time.perf_counter() - started
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not all(
                    (item.get("status") or {}).get("phase") for item in
                    kube.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/testruns")["items"]):
                time.sleep(1)
            decided = time.perf_counter() - started  # every TestRun decided on once
            time.sleep(10)  # the pods Running, their events handled
        pid = operator.process.pid
        before = cpu_seconds(pid)
        time.sleep(20)
        idle_percent = (cpu_seconds(pid) - before) / 20 * 100
        rss = resident_bytes(pid)
    finally:
        sampling.set()
        sampler.join()
        operator.stop()
    return {"rss_mb_every_5_seconds": samples, "testruns": present, "running_pods": running, "seconds_to_pods": seconds,
            "seconds_to_every_testrun_decided": decided, "rss_mb": rss / 2**20,
            "cpu_percent_of_one_core_after": idle_percent, "target_rss_mb": 300}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--present", type=int, default=5000)
    parser.add_argument("--skip", action="append", default=[], choices=["many", "one", "memory"])
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict = {"bench": "runs", "cpus": os.cpu_count(), "runs": args.runs,
                     "load_average_before": [round(x, 2) for x in load_before]}
    repeats = []
    redis_server = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-runs-") as scratch, Emulator(namespaces=[NAMESPACE]) as kube:
            directory = Path(scratch)
            for index in range(args.repeat):
                repeat: dict = {"bare": bare_once(kube, redis_server.url, args.runs)}
                if "many" not in args.skip:
                    repeat["many"] = ours_once(kube, redis_server.url, directory / f"many-{index}", args.runs, 1)
                if "one" not in args.skip:
                    repeat["one"] = ours_once(kube, redis_server.url, directory / f"one-{index}", 1, args.runs)
                for key in ("many", "one"):
                    if key in repeat:
                        repeat[f"{key}_pods_wall_ratio"] = repeat[key]["pods_seconds"] / repeat["bare"]["pods_seconds"]
                        repeat[f"{key}_cpu_per_run_ratio"] = (repeat[key]["cpu_ms_per_run"]
                                                              / repeat["bare"]["cpu_ms_per_object"])
                repeats.append(_rounded(repeat))
                print(json.dumps(repeats[-1]), file=sys.stderr, flush=True)
            if "memory" not in args.skip:
                results["memory"] = _rounded(memory_once(kube, redis_server.url, directory / "memory",
                                                         args.present, args.runs))
    finally:
        redis_server.stop()
    results["repeats"] = repeats
    results["summary"] = {key: _spread([r[key] for r in repeats]) for key in (repeats[0] if repeats else ())
                          if key.endswith("ratio")}
    results["targets"] = {"pods_wall_ratio": 1.5, "cpu_per_run_ratio": 2.5, "rss_mb": 300}
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    return 0


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def _rounded(values):
    if isinstance(values, dict):
        return {key: _rounded(value) for key, value in values.items()}
    return round(values, 3) if isinstance(values, float) else values


if __name__ == "__main__":
    sys.exit(main())
