"""Unit tests of the built library, reported case by case in testSummary.json."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ["TEST_INPUTS"], "calc", "lib"))
import calc  # noqa: E402  (the build's output, not the source tree)

CASES = {
    "test_add": lambda: calc.add(2, 3) == 5,
    "test_subtract": lambda: calc.subtract(5, 3) == 2,
    "test_multiply": lambda: calc.multiply(4, 3) == 12,
}

results = {name: bool(check()) for name, check in CASES.items()}
for name, passed in results.items():
    print(("PASS " if passed else "FAIL ") + name)
with open(os.path.join(os.environ["TEST_OUTPUT_DIR"], "testSummary.json"), "w") as out:
    json.dump(results, out)
sys.exit(0 if all(results.values()) else 1)
