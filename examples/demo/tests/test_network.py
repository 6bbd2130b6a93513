"""A test with a race condition: whether it passes depends on timing (here, on the run)."""

import os
import random
import sys
from xml.sax.saxutils import quoteattr

# The "race": seeded by the run number so the demo is repeatable; a real race is not.
lost_the_race = random.Random(int(os.environ.get("TEST_LOOPER_RUN_INDEX", "0"))).random() < 0.4
cases = [("test_connect", True), ("test_reconnect", not lost_the_race)]
with open(os.path.join(os.environ["TEST_OUTPUT_DIR"], "junit.xml"), "w") as out:
    out.write('<testsuite name="network">\n')
    for name, passed in cases:
        failure = "" if passed else "<failure message='timed out waiting for the server'/>"
        out.write(f"  <testcase classname='network' name={quoteattr(name)}>{failure}</testcase>\n")
    out.write("</testsuite>\n")
print("reconnect:", "lost the race" if lost_the_race else "ok")
sys.exit(1 if lost_the_race else 0)
