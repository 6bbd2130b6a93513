"""Resolve and plan a generated 5,000-test definitions file; print the figures as JSON.

Targets (issue 2): resolve <= 1 s, plan <= 0.3 s, peak memory < 200 MB, identical output on
every run. Each measurement runs in a fresh subprocess so peak RSS is the resolver's own.

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


def generate(outer: int = 50, inner: int = 100) -> str:
    """Nested foreach over outer x inner tests, three-level inheritance, 20 variables each."""
    lines = ["looper_version: 5", "environments:"]
    lines.append("  root_env:\n    platform: linux\n    image: {name: 'debian:12'}\n    variables:")
    lines += [f"      R{i}: root-{i}" for i in range(VARIABLES)]
    lines.append("  mid_env:\n    base: root_env\n    setup_script_contents: 'echo mid'\n    variables:")
    lines += [f"      M{i}: mid-${{R{i}}}" for i in range(VARIABLES)]
    lines.append("  linux:\n    base: mid_env\n    test_timeout: 600\n    variables:")
    lines += [f"      L{i}: leaf-${{M{i}}}" for i in range(VARIABLES)]
    lines.append("builds:\n  build/linux:\n    command: 'make > $TEST_BUILD_OUTPUT_DIR/out'")
    outer_items = ", ".join(f"{{group: g{i}}}" for i in range(outer))
    inner_items = ", ".join(f"{{case: c{i}}}" for i in range(inner))
    lines.append("tests:")
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


MEASURE = r"""
import hashlib, json, resource, sys, time
sys.path.insert(0, SOURCE)
from testlooper.definitions import resolve_text
from testlooper.planning import plan
text = open(PATH).read()
start = time.perf_counter()
resolved = resolve_text(text, "testlooper.yml")
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


def measure(path: str) -> dict:
    code = MEASURE.replace("SOURCE", repr(SOURCE)).replace("PATH", repr(path))
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
    print(json.dumps({
        "tests": runs[0]["tests"],
        "planned_tasks": runs[0]["planned_tasks"],
        "resolve_seconds_best": round(min(r["resolve_seconds"] for r in runs), 3),
        "resolve_seconds_worst": round(max(r["resolve_seconds"] for r in runs), 3),
        "plan_seconds_best": round(min(r["plan_seconds"] for r in runs), 4),
        "plan_seconds_worst": round(max(r["plan_seconds"] for r in runs), 4),
        "peak_rss_mb_worst": round(max(r["peak_rss_mb"] for r in runs), 1),
        "identical_output_every_run": len({r["output_sha256"] for r in runs}) == 1,
        "targets": {"resolve_seconds": 1.0, "plan_seconds": 0.3, "peak_rss_mb": 200},
    }, indent=2))


if __name__ == "__main__":
    main()
