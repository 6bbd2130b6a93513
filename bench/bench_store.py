"""Benchmark both history stores; prints one JSON object.

    PYTHONPATH=operator python3 bench/bench_store.py

For each store: `ingest` times `record_run` of one run with 100,000 cases (target <= 3 s);
`classify` records 200 commits x 10,000 cases on a line that also has untested commits, then
times reading and classifying: the head commit against the previous one; the newest 20 tested
commits, as `testlooper history` shows them (`history_view`); and all 2,000,000 results of the
whole line at once (target <= 0.5 s). For Redis, `raw_hset_seconds` times 100,000 plain HSETs in
pipelines of 10,000 on the same server, the yardstick ingest is compared with
(`ingest_to_raw_rate_ratio`, target >= 0.5). Each timing is the median of REPEATS.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import redis

from testlooper import stats
from testlooper.history import load_shown_history
from testlooper.store import CaseResult, RunRecord, open_store

INGEST_CASES = 100_000
RAW_PIPELINE = 10_000
LINE_COMMITS = 200
LINE_CASES = 10_000
HISTORY_SHOWN = 20  # the default --limit of `testlooper history`
UNTESTED_EVERY = 4  # after every 4th tested commit, one with no results (skipped or queued)
REPEATS = 3
REPO = "bench/repo"


def load_redis_server_helper():
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "redis_server.py")
    spec = importlib.util.spec_from_file_location("redis_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_name(index: int) -> str:
    return f"tests/unit/test_module_{index // 100:04d}.py::TestThing::test_case_{index % 100:03d}"


def make_run(commit: str, cases: int, commit_index: int = 0) -> RunRecord:
    # About 1% of cases fail on any commit, at places that move from commit to commit, so
    # the line has good, bad, broken and fixed cases to classify.
    results = [CaseResult(case_name(i), (i * 7 + commit_index) % 97 != 0, 0.01)
               for i in range(cases)]
    return RunRecord(REPO, commit, "unit", "test", 0, 0, "failed", 12.5, 1, time.time(),
                     "main", results)


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_time(action, repeats: int = REPEATS) -> float:
    return round(statistics.median(timed(action) for _ in range(repeats)), 4)


def bench_ingest(store) -> dict:
    runs = iter([make_run(f"ingest{i}", INGEST_CASES) for i in range(REPEATS)])
    seconds = median_time(lambda: store.record_run(next(runs)))
    return {"ingest_cases": INGEST_CASES, "ingest_seconds": seconds,
            "ingest_cases_per_second": round(INGEST_CASES / seconds)}


def bench_raw_hset(url: str) -> float:
    client = redis.Redis.from_url(url)

    def write():
        with client.pipeline(transaction=False) as pipe:
            for i in range(INGEST_CASES):
                pipe.hset("bench:raw", case_name(i), "1")
                if (i + 1) % RAW_PIPELINE == 0:
                    pipe.execute()
            pipe.execute()
        client.delete("bench:raw")

    seconds = median_time(write)
    client.close()
    return seconds


def bench_classify(store) -> dict:
    tested = [f"tested{i:04d}" for i in range(LINE_COMMITS)]
    line = []
    for i, sha in enumerate(tested):
        line.append(sha)
        if i % UNTESTED_EVERY == UNTESTED_EVERY - 1:
            line.append(f"untested{i:04d}")
    line.reverse()  # newest first, as git lists it
    populate = timed(lambda: [store.record_run(make_run(sha, LINE_CASES, i))
                              for i, sha in enumerate(tested)])

    def classify_head():
        tested_now = store.tested_commits(REPO, line)
        head, previous = [sha for sha in line if sha in tested_now][:2]
        counts = store.case_counts(REPO, [head, previous])
        return stats.classify_commit(counts[head], counts[previous])

    def history_view():  # what `testlooper history` reads and classifies by default
        return load_shown_history(store, REPO, line, limit=HISTORY_SHOWN, globs=[])

    fetched = {}
    full_fetch = median_time(lambda: fetched.update(counts=store.case_counts(REPO, line)))
    full_classify = median_time(lambda: stats.classify_line(line, fetched["counts"]))
    classes = stats.classify_line(line, fetched["counts"])
    return {
        "line_commits": len(line), "tested_commits": len(tested), "cases_per_commit": LINE_CASES,
        "populate_seconds": round(populate, 2),
        "head_seconds": median_time(classify_head),
        "history_view_commits": HISTORY_SHOWN,
        "history_view_seconds": median_time(history_view),
        "full_line_fetch_seconds": full_fetch,
        "full_line_classify_seconds": full_classify,
        "full_line_seconds": round(full_fetch + full_classify, 4),
        "classes_on_newest_tested": count_classes(classes[tested[-1]]),
    }


def count_classes(classes: dict) -> dict:
    tally = {}
    for value in classes.values():
        tally[value] = tally.get(value, 0) + 1
    return dict(sorted(tally.items()))


def main() -> None:
    report = {"python": platform.python_version(), "cpus": os.cpu_count(),
              "targets": {"ingest_seconds": 3, "ingest_to_raw_rate_ratio": 0.5,
                          "classify_seconds": 0.5}}
    with tempfile.TemporaryDirectory() as directory:
        store = open_store(os.path.join(directory, "history.db"))
        report["sqlite"] = {**bench_ingest(store), **bench_classify(store)}
        store.close()
    with load_redis_server_helper().RedisServer() as server:
        store = open_store(server.url)
        redis_report = bench_ingest(store)
        raw_seconds = bench_raw_hset(server.url)
        redis_report["raw_hset_seconds"] = raw_seconds
        redis_report["raw_hset_per_second"] = round(INGEST_CASES / raw_seconds)
        redis_report["ingest_to_raw_rate_ratio"] = round(
            redis_report["ingest_cases_per_second"] / redis_report["raw_hset_per_second"], 2)
        redis_report.update(bench_classify(store))
        report["redis"] = redis_report
        store.close()
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
