"""What the worker protocol says, without HTTP: the limits, the outcomes, what a valid RESULT is,
and the `Backend` interface behind it. No aiohttp here, so that the local runner can load it
before the server's thread has imported aiohttp (workerapi/local.py)."""

from __future__ import annotations

import abc
import urllib.parse
from dataclasses import dataclass
from typing import AsyncIterator

OUTCOMES = ("passed", "failed", "timeout", "error", "cancelled")
ARTIFACT_FORMATS = {"Tar": ".tar.gz", "Zip": ".zip", "Files": ""}

MAX_LOG_CHUNK_BYTES = 4 * 1024 * 1024
MAX_ARTIFACT_BYTES = 2 * 1024 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024  # a RESULT with 100,000 cases is ~10 MB
MAX_CASE_NAME_CHARS = 4096
COPY_BLOCK_BYTES = 1024 * 1024
PIPE_BUFFER_BYTES = 4 * 1024 * 1024
class ApiError(Exception):
    """An answer other than success; ``details`` join ``{"error": message}`` in the body."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status = status
        self.details = details


@dataclass(frozen=True)
class Served:
    """What ``GET source`` or ``GET inputs/{key}`` streams: a ``file`` as it is, a ``directory``
    as an uncompressed tar, or ``git``: ``git archive`` of ``commit`` from the bare ``path``.
    ``tee`` (``write(block)``, ``finish()``, ``abort()``) also receives a streamed archive: a
    source cache keeps it that way."""

    kind: str
    path: str
    commit: str = ""
    tee: object = None


class Backend(abc.ABC):
    """Where a worker API keeps its runs. ``run`` is whatever `authorize` returned."""

    @abc.abstractmethod
    async def authorize(self, run_id: str, token: str):
        """The run ``run_id`` names, if ``token`` opens it; raises ApiError 401 or 404 otherwise."""

    @abc.abstractmethod
    async def assignment(self, run) -> dict:
        """The ASSIGNMENT handed to the agent."""

    @abc.abstractmethod
    async def served(self, run, route: str) -> Served | None:
        """What is streamed at ``source`` or ``inputs/<percent-encoded key>``, or None."""

    @abc.abstractmethod
    async def heartbeat(self, run, phase: str) -> bool:
        """Records a heartbeat; True asks the agent to cancel."""

    @abc.abstractmethod
    async def append_log(self, run, offset: int, data: bytes) -> int:
        """Writes ``data`` at ``offset`` of the run's log and returns its size. A chunk sent again
        changes nothing; one past the end raises ApiError 409 with ``size``."""

    @abc.abstractmethod
    async def store_artifact(self, run, name: str, archive_format: str, body: AsyncIterator[bytes],
                             length: int) -> None:
        """Stores an upload of ``length`` bytes, read from ``body`` as it arrives."""

    @abc.abstractmethod
    async def record_result(self, run, result: dict) -> None:
        """Records a valid RESULT. The first one counts; one posted again changes nothing, and
        the answer `ok` is given only once it is kept."""


@dataclass(frozen=True)
class Limits:
    max_log_chunk_bytes: int = MAX_LOG_CHUNK_BYTES
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES
    max_result_bytes: int = MAX_JSON_BYTES


def result_problem(result: dict) -> str:
    """Why a RESULT cannot be recorded, or "". The agent's parsers refuse bad cases already; an
    agent of another version must not slip them in: a case named "" would take the place of the
    task's own result in the history, and a name that is not text could not be stored."""
    if result.get("result") not in OUTCOMES:
        return f"\"result\" must be one of {', '.join(OUTCOMES)}"
    cases = result.get("cases", [])
    if not isinstance(cases, list):
        return "\"cases\" must be a list"
    for index, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or not case["name"]:
            return f"case {index}: \"name\" must be a non-empty string"
        name = case["name"]
        if len(name) > MAX_CASE_NAME_CHARS or "\x00" in name or not _encodable(name):
            return f"case {index}: \"name\" must be at most {MAX_CASE_NAME_CHARS} characters of text"
        if not isinstance(case.get("success"), bool):
            return f"case {index} ({name!r}): \"success\" must be true or false"
        duration = case.get("duration_seconds")
        if duration is not None and (not isinstance(duration, (int, float)) or isinstance(duration, bool)
                                     or not 0 <= duration < 1e9):
            return f"case {index} ({name!r}): \"duration_seconds\" must be a number of seconds or null"
    return ""


def _encodable(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")  # a lone surrogate from a "\ud800" escape is not text
    except UnicodeEncodeError:
        return False
    return True


def input_route(key: str) -> str:
    return "inputs/" + urllib.parse.quote(key, safe="")


def artifact_name_from_segment(segment: str) -> str:
    """Reverses the agent's ``artifact_url_segment``: ``_`` is the whole-output artifact ``""``."""
    return "" if segment == "_" else urllib.parse.unquote(segment)
