"""Individual test results a task reports: testSummary.json and JUnit XML.

The parsers live in ``testlooper.worker.agent`` (section "Individual test results"), so that the
agent is one module that runs alone on a bare machine. This module re-exports them for the code
that imports them from here.
"""

from __future__ import annotations

from testlooper.worker.agent import (  # noqa: F401 - re-exported
    JUNIT_ROOT_TAGS,
    MAX_ERRORS_PER_FILE,
    MAX_TEST_SUMMARY_BYTES,
    TEST_SUMMARY_FILE,
    XML_READ_BLOCK_BYTES,
    collect_results,
    merge_duplicate_cases,
    parse_junit,
    parse_test_summary,
)

__all__ = ["JUNIT_ROOT_TAGS", "MAX_ERRORS_PER_FILE", "MAX_TEST_SUMMARY_BYTES", "TEST_SUMMARY_FILE",
           "XML_READ_BLOCK_BYTES", "collect_results", "merge_duplicate_cases", "parse_junit",
           "parse_test_summary"]
