"""Individual test results a task reports: testSummary.json and JUnit XML.

Standard library only: the worker agent imports this module, and both files must run on a bare
machine with nothing but Python. Every parser returns ``(cases, errors)``: ``cases`` is a list of
``{"name": str, "success": bool, "duration_seconds": float | None}`` and ``errors`` a list of
human-readable messages naming the file and the reason. A malformed file never raises: its
problems become messages, and whatever could be read from it is kept.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ElementTree

TEST_SUMMARY_FILE = "testSummary.json"

# The whole JSON document is held in memory, so refuse absurd ones instead of exhausting RAM.
MAX_TEST_SUMMARY_BYTES = 512 * 1024 * 1024

# XML is fed to the parser in blocks of this size, so memory stays flat whatever the file size.
XML_READ_BLOCK_BYTES = 64 * 1024

# A file with thousands of bad entries reports the first few and a count, not thousands of lines.
MAX_ERRORS_PER_FILE = 20

JUNIT_ROOT_TAGS = ("testsuites", "testsuite", "testcase")


def collect_results(output_dir):
    """Collects every case reported under ``output_dir``: its testSummary.json and all JUnit files.

    A missing directory reports nothing. Cases from all files are concatenated, so a runner that
    writes the same test into two files reports it twice.
    """
    cases, errors = [], []
    if not os.path.isdir(output_dir):
        return cases, errors
    summary_path = os.path.join(output_dir, TEST_SUMMARY_FILE)
    if os.path.isfile(summary_path):
        _extend(cases, errors, parse_test_summary(summary_path, label=TEST_SUMMARY_FILE))
    for path in _xml_files(output_dir):
        label = os.path.relpath(path, output_dir).replace(os.sep, "/")
        _extend(cases, errors, parse_junit(path, label=label))
    return cases, errors


def parse_test_summary(path, label=None):
    """Parses a testSummary.json: a dict ``{name: bool | {"success", "logs"}}`` or a list of
    ``{"testName", "success", "logs", "elapsed", "startTimestamp"}``."""
    label = label or path
    try:
        document = _load_json(path)
    except (OSError, ValueError) as error:
        return [], [f"{label}: cannot read test results: {error}"]
    if isinstance(document, dict):
        parsed = [_case_from_summary_item(name, value) for name, value in document.items()]
    elif isinstance(document, list):
        parsed = [_case_from_summary_entry(index, entry) for index, entry in enumerate(document)]
    else:
        return [], [f"{label}: expected a JSON object or list of test results, got {type(document).__name__}"]
    cases = [case for case in parsed if isinstance(case, dict)]
    problems = [problem for problem in parsed if isinstance(problem, str)]
    return cases, _bounded_errors(label, problems)


def parse_junit(path, label=None):
    """Parses a JUnit XML file. A case with ``<failure>`` or ``<error>`` fails, a ``<skipped>``
    one is left out, any other passes. A file whose root is not a JUnit element is not a result
    file and reports nothing. A JUnit file declaring a DOCTYPE is refused, so no entity is ever
    defined (the "billion laughs" expansion and external entities cannot happen)."""
    label = label or path
    collector = _JUnitCollector()
    # A target parser, not iterparse: iterparse cannot be told to refuse a DOCTYPE, a target's
    # doctype() hook can, before the parser reads a single entity declaration. It keeps no tree.
    parser = ElementTree.XMLParser(target=collector)
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(XML_READ_BLOCK_BYTES), b""):
                parser.feed(block)
        parser.close()
    except _NotJUnit:
        return [], []
    except _DoctypeRefused:
        collector.problems.append("refused: the file declares a DOCTYPE (entity declarations are not allowed)")
    except ElementTree.ParseError as error:
        collector.problems.append(f"not well-formed XML: {error}")
    except OSError as error:
        collector.problems.append(f"cannot read: {error}")
    return collector.cases, _bounded_errors(label, collector.problems)


class _NotJUnit(Exception):
    """The document's root element shows it is some other kind of XML file."""


class _DoctypeRefused(Exception):
    """The document declares a DOCTYPE, the only place entities can be defined."""


class _JUnitCollector:
    """ElementTree parser target that turns ``<testcase>`` elements into cases as they stream by."""

    def __init__(self):
        self.cases = []
        self.problems = []
        self._depth = 0
        self._seen_root = False
        self._case_attributes = None
        self._case_depth = 0
        self._case_outcome = "passed"

    def doctype(self, name, pubid, system):
        # The declaration names the root element: a coverage report's DOCTYPE is not our business.
        if _local_name(name) not in JUNIT_ROOT_TAGS:
            raise _NotJUnit()
        raise _DoctypeRefused()

    def start(self, tag, attributes):
        self._depth += 1
        tag = _local_name(tag)
        if not self._seen_root:
            self._seen_root = True
            if tag not in JUNIT_ROOT_TAGS:
                raise _NotJUnit()
        if tag == "testcase" and self._case_attributes is None:
            self._case_attributes = dict(attributes)
            self._case_depth = self._depth
            self._case_outcome = "passed"
        elif self._case_attributes is not None and self._depth == self._case_depth + 1:
            self._note_child(tag)

    def end(self, tag):
        if self._case_attributes is not None and self._depth == self._case_depth:
            self._finish_case()
        self._depth -= 1

    def close(self):
        return None

    def _note_child(self, tag):
        if tag in ("failure", "error"):
            self._case_outcome = "failed"
        elif tag == "skipped" and self._case_outcome == "passed":
            self._case_outcome = "skipped"

    def _finish_case(self):
        attributes, self._case_attributes = self._case_attributes, None
        name = attributes.get("name", "")
        if not name:
            self.problems.append(f"a <testcase> has no name attribute (case {len(self.cases) + 1})")
            return
        if self._case_outcome == "skipped":
            return
        classname = attributes.get("classname", "")
        self.cases.append({
            "name": f"{classname}.{name}" if classname else name,
            "success": self._case_outcome == "passed",
            "duration_seconds": _seconds(attributes.get("time")),
        })


def _case_from_summary_item(name, value):
    """One ``name: value`` pair of the dict shape; returns a case, or a problem message."""
    if isinstance(value, bool):
        return {"name": name, "success": value, "duration_seconds": None}
    if isinstance(value, dict) and isinstance(value.get("success"), bool):
        return {"name": name, "success": value["success"], "duration_seconds": _seconds(value.get("elapsed"))}
    return f"test {name!r}: expected true, false or {{\"success\": true|false}}, got {_json_preview(value)}"


def _case_from_summary_entry(index, entry):
    """One entry of the list shape; returns a case, or a problem message."""
    if not isinstance(entry, dict):
        return f"entry {index}: expected an object, got {_json_preview(entry)}"
    name, success = entry.get("testName"), entry.get("success")
    if not isinstance(name, str) or not name:
        return f"entry {index}: \"testName\" must be a non-empty string"
    if not isinstance(success, bool):
        return f"entry {index} ({name!r}): \"success\" must be true or false"
    return {"name": name, "success": success, "duration_seconds": _seconds(entry.get("elapsed"))}


def _load_json(path):
    size = os.path.getsize(path)
    if size > MAX_TEST_SUMMARY_BYTES:
        raise ValueError(f"{size} bytes is more than the {MAX_TEST_SUMMARY_BYTES} bytes allowed")
    # utf-8-sig: Windows tools (PowerShell's Out-File) like to start files with a BOM.
    with open(path, encoding="utf-8-sig") as stream:
        return json.load(stream)


def _seconds(value):
    """A duration from JSON or an XML attribute; None when absent or not a finite, non-negative number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _xml_files(directory):
    found = []
    for root, _dirs, files in os.walk(directory):
        found.extend(os.path.join(root, name) for name in files if name.lower().endswith(".xml"))
    return sorted(found)


def _local_name(tag):
    """``{namespace}testcase`` -> ``testcase``: some runners put JUnit elements in a namespace."""
    return tag.rsplit("}", 1)[-1]


def _json_preview(value):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded_errors(label, problems):
    messages = [f"{label}: {problem}" for problem in problems[:MAX_ERRORS_PER_FILE]]
    if len(problems) > MAX_ERRORS_PER_FILE:
        messages.append(f"{label}: ... and {len(problems) - MAX_ERRORS_PER_FILE} more problems")
    return messages


def _extend(cases, errors, parsed):
    cases.extend(parsed[0])
    errors.extend(parsed[1])
