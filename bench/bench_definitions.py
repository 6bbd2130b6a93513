"""Resolve and plan a generated 5,000-test definitions file; print the figures as JSON.

Targets (issue 2): resolve <= 1 s, plan <= 0.3 s, peak memory < 200 MB, identical output on
every run. Each measurement runs in a fresh subprocess so peak RSS is the resolver's own.

Issue 6 adds a case across 3 git repositories: the file pins B, reaches C through B with
`import: b/c` (two hops), bases its root environment on C's and has 50 tests that consume C's
builds. It must resolve in at most 1.5 times the same file with everything in one repository
(the same 5,000 tests and 50 builds, the builds local).

    python3 bench/bench_definitions.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(os.path.dirname(HERE), "operator")

VARIABLES = 20


CROSS_REPOSITORY_BUILDS = 50


def generate(outer: int = 50, inner: int = 100, cross: str = "") -> str:
    """Nested foreach over outer x inner tests, three-level inheritance, 20 variables each.

    `cross` "single" or "three" replaces 50 of the tests by tests consuming one build each: in
    this file ("single"), or in repository C reached through B ("three")."""
    lines = ["looper_version: 5"]
    if cross == "three":
        lines.append("repos:\n  b: B/B_SHA\n  c: {import: b/c}")
    lines.append("environments:")
    if cross == "three":
        lines.append("  root_env:\n    base: c/root_env")
    else:
        lines.append("  root_env:\n    platform: linux\n    image: {name: 'debian:12'}\n    variables:")
        lines += [f"      R{i}: root-{i}" for i in range(VARIABLES)]
    lines.append("  mid_env:\n    base: root_env\n    setup_script_contents: 'echo mid'\n    variables:")
    lines += [f"      M{i}: mid-${{R{i}}}" for i in range(VARIABLES)]
    lines.append("  linux:\n    base: mid_env\n    test_timeout: 600\n    variables:")
    lines += [f"      L{i}: leaf-${{M{i}}}" for i in range(VARIABLES)]
    lines.append("builds:\n  build/linux:\n    command: 'make > $TEST_BUILD_OUTPUT_DIR/out'")
    if cross == "single":
        lines += [f"  lib/b{i}/linux: {{command: 'make {i}'}}" for i in range(CROSS_REPOSITORY_BUILDS)]
    outer_items = ", ".join(f"{{group: g{i}}}" for i in range(outer))
    inner_items = ", ".join(f"{{case: c{i}}}" for i in range(inner - (1 if cross else 0)))
    lines.append("tests:")
    if cross:
        prefix = "c/" if cross == "three" else ""
        numbers = ", ".join(str(i) for i in range(CROSS_REPOSITORY_BUILDS))
        lines.append(f"  - foreach: {{i: [{numbers}]}}")
        lines.append("    repeat:")
        lines.append("      extra/${i}/linux:")
        lines.append("        command: 'use ${i}'")
        lines.append(f"        dependencies: {{lib: '{prefix}lib/b${{i}}/linux'}}")
        lines.append("  - foreach: [" + outer_items + "]")
        lines.append("    repeat:")
        lines.append(f"      foreach: [{inner_items}]")
        lines.append("      repeat:")
        lines.append("        suite/${group}/${case}/linux:")
        lines.append("          command: 'run ${group} ${case} ${T0} ${L3}'")
        lines.append("          dependencies: {build: build/linux, src: HEAD}")
        lines.append("          variables:")
        lines += [f"            T{i}: '${{group}}-${{case}}-{i}-${{L{i}}}'" for i in range(VARIABLES)]
        lines.append("test_sets:\n  half: ['suite/g1*']")
        lines.append("triggers:\n  - {name: source, paths: ['HEAD/src/*'], test_sets: [half]}")
        return "\n".join(lines) + "\n"
    lines.append(f"  foreach: [{outer_items}]")
    lines.append("  repeat:")
    lines.append(f"    foreach: [{inner_items}]")
    lines.append("    repeat:")
    lines.append("      suite/${group}/${case}/linux:")
    lines.append("        command: 'run ${group} ${case} ${T0} ${L3}'")
    lines.append("        dependencies: {build: build/linux, src: HEAD}")
    lines.append("        variables:")
    lines += [f"          T{i}: '${{group}}-${{case}}-{i}-${{L{i}}}'" for i in range(VARIABLES)]
    lines.append("test_sets:\n  half: ['suite/g1*']")
    lines.append("triggers:\n  - {name: source, paths: ['HEAD/src/*'], test_sets: [half]}")
    return "\n".join(lines) + "\n"


REPOSITORY_C = """looper_version: 5
environments:
  root_env:
    platform: linux
    image: {name: 'debian:12'}
    variables:
""" + "".join(f"      R{i}: root-{i}\n" for i in range(VARIABLES)) + "builds:\n" + "".join(
    f"  lib/b{i}/linux: {{command: 'make {i}', environment: root_env}}\n" for i in range(CROSS_REPOSITORY_BUILDS))
REPOSITORY_B = "looper_version: 5\nrepos:\n  c: C/C_SHA\n"


def make_repository(path: str, definitions: str) -> str:
    """A git repository at `path` with one commit holding `definitions`; returns its sha."""
    environment = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
                   "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                   "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    os.makedirs(path)
    with open(os.path.join(path, "testlooper.yml"), "w") as f:
        f.write(definitions)
    for command in (["init", "--quiet"], ["add", "testlooper.yml"], ["commit", "--quiet", "-m", "definitions"]):
        subprocess.run(["git", "-C", path, *command], check=True, env=environment, capture_output=True)
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


MEASURE = r"""
import hashlib, json, resource, sys, time
sys.path.insert(0, SOURCE)
from testlooper.definitions import resolve_text
from testlooper.planning import plan
from testlooper.repos.lookup import GitRepositories
import git  # imported before the clock starts, as in any long-running process
text = open(PATH).read()
repositories = GitRepositories(MAPPING)
start = time.perf_counter()
resolved = resolve_text(text, "testlooper.yml", repositories=repositories)
resolve_seconds = time.perf_counter() - start
start = time.perf_counter()
planned = plan(resolved, ["src/a.py"])
plan_seconds = time.perf_counter() - start
digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()
print(json.dumps({"resolve_seconds": resolve_seconds, "plan_seconds": plan_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tests": len(resolved["tests"]), "planned_tasks": len(planned["tasks"]),
                  "output_sha256": digest}))
"""


def measure(path: str, mapping: dict | None = None) -> dict:
    code = MEASURE.replace("SOURCE", repr(SOURCE)).replace("PATH", repr(path)).replace("MAPPING", repr(mapping or {}))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "testlooper.yml")
        with open(path, "w") as f:
            f.write(generate())
        runs = [measure(path) for _ in range(args.repeat)]
        single_path = os.path.join(tmp, "single.yml")
        with open(single_path, "w") as f:
            f.write(generate(cross="single"))
        c_sha = make_repository(os.path.join(tmp, "C"), REPOSITORY_C)
        b_sha = make_repository(os.path.join(tmp, "B"), REPOSITORY_B.replace("C_SHA", c_sha))
        three_path = os.path.join(tmp, "three.yml")
        with open(three_path, "w") as f:
            f.write(generate(cross="three").replace("B_SHA", b_sha))
        mapping = {"B": os.path.join(tmp, "B"), "C": os.path.join(tmp, "C")}
        single = [measure(single_path) for _ in range(args.repeat)]
        three = [measure(three_path, mapping) for _ in range(args.repeat)]
    single_best = min(r["resolve_seconds"] for r in single)
    three_best = min(r["resolve_seconds"] for r in three)
    print(json.dumps({
        "tests": runs[0]["tests"],
        "planned_tasks": runs[0]["planned_tasks"],
        "resolve_seconds_best": round(min(r["resolve_seconds"] for r in runs), 3),
        "resolve_seconds_worst": round(max(r["resolve_seconds"] for r in runs), 3),
        "plan_seconds_best": round(min(r["plan_seconds"] for r in runs), 4),
        "plan_seconds_worst": round(max(r["plan_seconds"] for r in runs), 4),
        "peak_rss_mb_worst": round(max(r["peak_rss_mb"] for r in runs), 1),
        "identical_output_every_run": len({r["output_sha256"] for r in runs}) == 1,
        "cross_repository": {
            "repositories": 3, "import_hops": 2, "cross_repository_dependencies": CROSS_REPOSITORY_BUILDS,
            "tests": three[0]["tests"], "planned_tasks": three[0]["planned_tasks"],
            "single_repository_resolve_seconds_best": round(single_best, 3),
            "three_repositories_resolve_seconds_best": round(three_best, 3),
            "ratio_best": round(three_best / single_best, 2),
            "identical_output_every_run": len({r["output_sha256"] for r in three}) == 1,
        },
        "targets": {"resolve_seconds": 1.0, "plan_seconds": 0.3, "peak_rss_mb": 200, "cross_repository_ratio": 1.5},
    }, indent=2))


if __name__ == "__main__":
    main()
