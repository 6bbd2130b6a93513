"""`testlooper logs TESTRUN [--run N] [-f]`: a TestRun's run logs, from the operator's Redis.

The worker API keeps each run's log in a capped Redis stream keyed by its run id
`{namespace}.{testrun}.{index}.{attempt}` (store/logstream.py). Which runs and attempts exist
is read from the TestRun (status `startedRuns`, `active`, `attempts`) and the history store's
records of the runs that ended; a run's log is its latest attempt's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from testlooper.errors import UserError

POLL_SECONDS = 1.0  # how often -f reads the TestRun again (new runs, new attempts, its end)
NOTE = b"[testlooper logs] "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "logs",
        help="show the logs of a TestRun's runs in the cluster",
        description="Print the logs of a TestRun's runs, as their agents streamed them to the operator "
        "(each run's latest attempt). Reads the TestRun like kubectl (KUBECONFIG, else the in-cluster "
        "service account) and the logs from the operator's Redis.",
    )
    parser.add_argument("testrun", metavar="TESTRUN", help="the TestRun's name (kubectl get testruns)")
    parser.add_argument("-n", "--namespace", metavar="NS", help="its namespace (default: the kubeconfig's)")
    parser.add_argument("--run", dest="run_index", metavar="N", type=int, help="only run N (1 to spec.runs), its latest attempt")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing as the log grows, until the run (or, without --run, the TestRun) ends")
    parser.add_argument("--store", default=os.environ.get("TESTLOOPER_STORE", ""), metavar="URL",
                        help="the operator's store, redis://HOST:PORT/DB (default: $TESTLOOPER_STORE)")
    parser.set_defaults(run=run)


@dataclass
class RunState:
    """What the TestRun says of one run index."""

    index: int
    attempt: int | None  # its latest attempt; None while it has not started
    ended: bool
    lost: dict[int, str] = field(default_factory=dict)  # attempt -> why it ended without a RESULT


def run(args: argparse.Namespace) -> int:
    from testlooper.cli.cluster_access import connect, read_testrun
    from testlooper.store import is_redis_url

    if not args.store:
        raise UserError("the logs are in the operator's Redis: pass --store redis://HOST:PORT/DB "
                        "(or set $TESTLOOPER_STORE)")
    if not is_redis_url(args.store):
        raise UserError(f"--store must be the operator's redis:// URL, not {args.store!r}")
    api, namespace = connect(args.namespace)
    testrun = read_testrun(api, namespace, args.testrun)
    runs = int(testrun["spec"].get("runs") or 1)
    if args.run_index is not None and not 1 <= args.run_index <= runs:
        raise UserError(f"TestRun {args.testrun} has {runs} run{'s' if runs != 1 else ''}: "
                        f"--run must be from 1 to {runs}, not {args.run_index}")
    logs = StoreLogs(args.store, namespace, testrun)
    try:
        if args.follow:
            return Follower(logs, api, namespace, args.testrun, args.run_index).follow(testrun)
        return show(logs, testrun, args.run_index)
    finally:
        logs.close()


class StoreLogs:
    """The operator's Redis, as this command reads it: the log streams and the history store."""

    def __init__(self, url: str, namespace: str, testrun: dict):
        import redis

        from testlooper.store import store_identity
        from testlooper.store.logstream import LogStreams

        self.identity = store_identity(url)
        self.namespace = namespace
        self.name = testrun["metadata"]["name"]
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        self.streams = LogStreams(self._client)
        self.call(self._client.ping)
        self._history = None
        self._url = url

    def call(self, method, *args, **kwargs):
        """A Redis call; the store down is one line, said as such."""
        import redis

        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise UserError(f"cannot reach the store {self.identity}: {_one_line(exc)}") from None
        except redis.ResponseError as exc:
            raise UserError(f"the store {self.identity} refused: {_one_line(exc)}") from None

    def run_id(self, index: int, attempt: int) -> str:
        from testlooper.kube.pods import run_id

        return run_id(self.namespace, self.name, index, attempt)

    def recorded_attempts(self, testrun: dict) -> dict[int, int]:
        """{run index: its latest attempt with a recorded RESULT}, from the history store."""
        from testlooper.store import StoreError, StoreUnavailable, open_store

        spec = testrun["spec"]
        if self._history is None:
            self._history = open_store(self._url)
        try:
            records = self._history.runs(f"{self.namespace}/{spec.get('repo', '')}", spec.get("commit", ""))
        except StoreUnavailable as exc:  # said as the log streams' own calls say it
            raise UserError(f"cannot reach the store {self.identity}: {_one_line(exc.__cause__ or exc)}") from None
        except StoreError as exc:
            raise UserError(f"cannot read the store {self.identity}: {exc}") from None
        latest: dict[int, int] = {}
        for record in records:
            if record.task == spec.get("task"):
                latest[record.run_index] = max(record.attempt, latest.get(record.run_index, 0))
        return latest

    def states(self, testrun: dict, only: int | None = None) -> list[RunState]:
        """The runs (or run ``only``), each on its latest attempt."""
        from testlooper.decisions.repo import ENDED_PHASES

        spec, status = testrun.get("spec") or {}, testrun.get("status") or {}
        runs = int(spec.get("runs") or 1)
        started = int(status.get("startedRuns") or 0)
        active = {int(key): value for key, value in (status.get("active") or {}).items() if value}
        testrun_ended = status.get("phase") in ENDED_PHASES
        recorded = self.recorded_attempts(testrun)
        lost: dict[int, dict[int, str]] = {}
        for entry in status.get("attempts") or ():
            lost.setdefault(int(entry.get("run") or 0), {})[int(entry.get("attempt") or 0)] = str(entry.get("reason") or "")
        states = []
        for index in ([only] if only is not None else range(1, runs + 1)):
            if index > started and index not in active and index not in recorded:
                states.append(RunState(index, None, testrun_ended))
                continue
            attempt = max([1, int((active.get(index) or {}).get("attempt") or 0), recorded.get(index, 0),
                           *lost.get(index, {})])
            # An attempt the status has not caught up with yet (or has forgotten: it keeps the
            # last 20 attempts) may have logged already.
            while (index in active or index not in recorded) and self.call(
                    self.streams.exists, self.run_id(index, attempt + 1)):
                attempt += 1
            states.append(RunState(index, attempt, testrun_ended or index not in active, lost.get(index, {})))
        return states

    def close(self) -> None:
        if self._history is not None:
            self._history.close()
        self._client.close()


@dataclass
class Cursor:
    """Where the reading of one run's log stands."""

    index: int
    attempt: int
    run_id: str
    after: str = "0-0"  # the stream entry read last
    offset: int = 0  # the bytes of the log printed (or said missing) so far
    ended: bool = False  # its end marker was read: its RESULT came
    partial: bytes = b""  # a line begun and not ended, while lines are prefixed


class Printer:
    """Writes the chunks read to stdout: as they are for one run, each line prefixed with its
    run when several runs' logs are interleaved (-f without --run). Gaps (the oldest part of a
    long log dropped by the stream's cap) are said where they are."""

    def __init__(self, prefixed: bool):
        self.prefixed = prefixed
        self.out = sys.stdout.buffer
        self._at_line_start = True

    def chunks(self, cursor: Cursor, chunks) -> None:
        for chunk in chunks:
            if chunk.offset > cursor.offset:
                self.note(cursor, f"{chunk.offset - cursor.offset} bytes of this log are missing here "
                                  "(bytes {0}-{1}): the operator keeps only the latest part of a long log"
                          .format(cursor.offset, chunk.offset - 1))
            self.data(cursor, chunk.data)
            cursor.offset = chunk.offset + len(chunk.data)
        self.out.flush()

    def data(self, cursor: Cursor, data: bytes) -> None:
        if not data:
            return
        if not self.prefixed:
            self.out.write(data)
            self._at_line_start = data.endswith(b"\n")
            return
        lines = (cursor.partial + data).split(b"\n")
        cursor.partial = lines.pop()
        prefix = self._prefix(cursor)
        for line in lines:
            self.out.write(prefix + line + b"\n")

    def finish(self, cursor: Cursor) -> None:
        """The run's log is over: a last line without its newline is printed with one."""
        if self.prefixed and cursor.partial:
            self.out.write(self._prefix(cursor) + cursor.partial + b"\n")
            cursor.partial = b""
        elif not self.prefixed and not self._at_line_start:
            self.out.write(b"\n")
            self._at_line_start = True
        self.out.flush()

    def note(self, cursor: Cursor | None, text: str) -> None:
        """A line of ours among the log's (marked as such)."""
        if self.prefixed and cursor is not None:
            self.finish(cursor)
            self.out.write(self._prefix(cursor) + NOTE + text.encode() + b"\n")
        else:
            if not self._at_line_start:
                self.out.write(b"\n")
            self.out.write(NOTE + text.encode() + b"\n")
            self._at_line_start = True
        self.out.flush()

    def header(self, text: str) -> None:
        if not self._at_line_start:
            self.out.write(b"\n")
        self.out.write(f"==> {text} <==\n".encode())
        self._at_line_start = True
        self.out.flush()

    @staticmethod
    def _prefix(cursor: Cursor) -> bytes:
        return f"[run {cursor.index}] ".encode()


def show(logs: StoreLogs, testrun: dict, only: int | None) -> int:
    """The logs as they are now: one run's (its attempt said on stderr), or every started run's
    under a header each."""
    name = testrun["metadata"]["name"]
    phase = (testrun.get("status") or {}).get("phase") or "Pending"
    states = logs.states(testrun, only)
    printer = Printer(prefixed=False)
    if only is not None:
        state = states[0]
        if state.attempt is None:
            raise UserError(f"run {only} of TestRun {name} has not started yet (the TestRun is {phase}): "
                            "follow it with -f")
        cursor = Cursor(only, state.attempt, logs.run_id(only, state.attempt))
        if not logs.call(logs.streams.exists, cursor.run_id):
            raise UserError(f"run {only} of TestRun {name} (attempt {state.attempt}) {_no_log(state)}")
        print(f"testlooper: run {only} of {name}, attempt {state.attempt}{_lost_note(state)}", file=sys.stderr)
        _drain(logs, printer, [cursor])
        printer.finish(cursor)
        return 0
    started = [state for state in states if state.attempt is not None]
    if not started:
        raise UserError(f"no run of TestRun {name} has started yet (the TestRun is {phase}): follow it with -f")
    for state in started:
        cursor = Cursor(state.index, state.attempt, logs.run_id(state.index, state.attempt))
        printer.header(f"run {state.index}, attempt {state.attempt}{_lost_note(state)}")
        if not logs.call(logs.streams.exists, cursor.run_id):
            printer.note(None, _no_log(state))
            continue
        _drain(logs, printer, [cursor])
        printer.finish(cursor)
    waiting = [state.index for state in states if state.attempt is None]
    if waiting:
        printer.header(f"{_runs_text(waiting)} of {len(states)}: not started yet")
    return 0


def _drain(logs: StoreLogs, printer: Printer, cursors: list[Cursor]) -> None:
    """Prints what the cursors' streams hold now, without waiting for more."""
    open_cursors = {cursor.run_id: cursor for cursor in cursors if not cursor.ended}
    while open_cursors:
        news = logs.call(logs.streams.read_many, {run_id: c.after for run_id, c in open_cursors.items()})
        if not news:
            return
        for run_id, (chunks, ended, after) in news.items():
            cursor = open_cursors[run_id]
            printer.chunks(cursor, chunks)
            cursor.after = after
            if ended:
                cursor.ended = True
                printer.finish(cursor)
                del open_cursors[run_id]


class Follower:
    """`-f`: prints as the logs grow, reading the TestRun every POLL_SECONDS for new runs, new
    attempts and its end. Ends (0) once the run followed (or, without --run, the TestRun) has
    ended and what its log holds is printed."""

    def __init__(self, logs: StoreLogs, api, namespace: str, name: str, only: int | None):
        self.logs = logs
        self.api = api
        self.namespace = namespace
        self.name = name
        self.only = only
        self.printer = Printer(prefixed=only is None)
        self.cursors: dict[int, Cursor] = {}  # run index -> its latest attempt's

    def follow(self, testrun: dict) -> int:
        from testlooper.decisions.repo import ENDED_PHASES

        said_waiting = False
        while True:
            states = self.logs.states(testrun, self.only)
            for state in states:
                if state.attempt is not None:
                    self._on_attempt(state)
            testrun_ended = (testrun.get("status") or {}).get("phase") in ENDED_PHASES
            if self.only is not None:
                state = states[0]
                cursor = self.cursors.get(self.only)
                if cursor is None and not said_waiting and not testrun_ended:
                    print(f"testlooper: run {self.only} of {self.name} has not started yet: waiting for it",
                          file=sys.stderr)
                    said_waiting = True
                if (cursor is not None and cursor.ended) or state.ended:
                    return self._end(testrun)
            elif testrun_ended:
                return self._end(testrun)
            self._read_for(POLL_SECONDS)
            testrun = self._read_testrun()
            if testrun is None:
                self.printer.note(None, f"TestRun {self.name} was deleted")
                return 0

    def _on_attempt(self, state: RunState) -> None:
        cursor = self.cursors.get(state.index)
        if cursor is not None and cursor.attempt >= state.attempt:
            return
        if cursor is None:
            if self.only is not None:
                print(f"testlooper: run {state.index} of {self.name}, attempt {state.attempt}{_lost_note(state)}",
                      file=sys.stderr)
        else:
            _drain(self.logs, self.printer, [cursor])
            why = state.lost.get(cursor.attempt) or "it ended without a result"
            self.printer.note(cursor, f"attempt {cursor.attempt} ended without a result ({why}); "
                                      f"attempt {state.attempt} follows")
        self.cursors[state.index] = Cursor(state.index, state.attempt, self.logs.run_id(state.index, state.attempt))

    def _read_for(self, seconds: float) -> None:
        """Prints what comes within ``seconds`` (returns as soon as something came)."""
        open_cursors = {cursor.run_id: cursor for cursor in self.cursors.values() if not cursor.ended}
        if not open_cursors:
            time.sleep(seconds)
            return
        news = self.logs.call(self.logs.streams.read_many, {run_id: c.after for run_id, c in open_cursors.items()},
                              block_seconds=seconds)
        for run_id, (chunks, ended, after) in news.items():
            cursor = open_cursors[run_id]
            self.printer.chunks(cursor, chunks)
            cursor.after = after
            if ended:
                cursor.ended = True
                self.printer.finish(cursor)

    def _end(self, testrun: dict) -> int:
        cursors = list(self.cursors.values())
        _drain(self.logs, self.printer, cursors)
        for cursor in cursors:
            self.printer.finish(cursor)
        status = testrun.get("status") or {}
        if self.only is None or status.get("phase") in ("Cancelled",):
            print(f"testlooper: TestRun {self.name} ended: {status.get('phase')}"
                  f"{', ' + status['result'] if status.get('result') else ''}", file=sys.stderr)
        return 0

    def _read_testrun(self) -> dict | None:
        from testlooper.cli.cluster_access import read_testrun

        try:
            return read_testrun(self.api, self.namespace, self.name)
        except UserError as error:
            if str(error).startswith("no TestRun "):
                return None
            raise


def _no_log(state: RunState) -> str:
    if state.ended:
        return "has no log: it logged nothing, or its log has expired (the operator keeps logs 14 days)"
    return "has no log yet: its pod has not started logging"


def _lost_note(state: RunState) -> str:
    earlier = [f"attempt {attempt}: {why}" for attempt, why in sorted(state.lost.items()) if attempt < state.attempt]
    return f" (earlier {'; '.join(earlier)})" if earlier else ""


def _runs_text(indexes: list[int]) -> str:
    if len(indexes) == 1:
        return f"run {indexes[0]}"
    if indexes == list(range(indexes[0], indexes[-1] + 1)):
        return f"runs {indexes[0]}-{indexes[-1]}"
    return "runs " + ", ".join(map(str, indexes))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
