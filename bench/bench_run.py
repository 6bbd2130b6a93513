"""`testlooper run` of 50 trivial tests (`true`) with --jobs 2; prints the figures as JSON.

Target (issue 3): within 5 s wall. Also reports the per-run overhead against a bare
`sh -c true`, measured in the same process.

    python3 bench/bench_run.py [--tests 50] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def make_repo(path: str, tests: int) -> None:
    os.makedirs(path)
    lines = ["looper_version: 5", "environments:", "  linux: {platform: linux, image: {name: 'debian:12'}}", "tests:"]
    lines += [f"  t{i:03d}/linux: {{command: 'true'}}" for i in range(tests)]
    with open(os.path.join(path, "testlooper.yml"), "w") as out:
        out.write("\n".join(lines) + "\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@x"}
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=path, check=True, env=env)


def bare_shell_seconds(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(["sh", "-c", "true"], check=True)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "repo")
        make_repo(repo, args.tests)
        command = [sys.executable, "-m", "testlooper", "run", repo, "--jobs", str(args.jobs),
                   "--store", os.path.join(tmp, "history.db"), "--output", os.path.join(tmp, "out"), "--json"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"testlooper run failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
    run_seconds = [r["duration_seconds"] for r in report["runs"]]
    bare = bare_shell_seconds(20)
    per_run_wall = wall * args.jobs / args.tests  # wall time each job slot spent per run
    print(json.dumps({
        "tests": args.tests, "jobs": args.jobs, "wall_seconds": round(wall, 2), "target_wall_seconds": 5.0,
        "passed": report["summary"]["passed"],
        "mean_agent_reported_seconds_per_run": round(sum(run_seconds) / len(run_seconds), 4),
        "wall_seconds_per_run_per_job_slot": round(per_run_wall, 4),
        "bare_sh_c_true_seconds": round(bare, 4),
        "overhead_seconds_per_run_vs_bare_sh": round(per_run_wall - bare, 4),
    }, indent=2))


if __name__ == "__main__":
    main()
