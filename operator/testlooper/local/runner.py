"""Run a plan's tasks as local processes: worker agents (one per job slot, kept from run to run)
talking to a worker API served on loopback, exactly as agents in pods and on EC2 talk to the
operator.

Decisions (what starts when, retries, blocking) come from `schedule.Schedule`; this module
only does the I/O: starting agents, waiting for them, recording results.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import testlooper
from testlooper.local import containers
from testlooper.local.machine import available_cores, total_ram_gb
from testlooper.local.schedule import Capacity, Run, Schedule
from testlooper.worker.agent import kill_processes_of_run
from testlooper.workerapi.local import WorkerApiServer, safe_file_name

# An agent enforces its task's timeout itself; past it plus this margin the runner assumes the
# worker is dead, kills it and reports an error.
WORKER_DEADLINE_MARGIN_SECONDS = 60
# How long interrupted agents get to kill their tasks and report `cancelled`: longer than the
# time an agent gives a stage's cleanup after a stop (agent.CLEANUP_SECONDS_AFTER_STOP).
CANCEL_GRACE_SECONDS = 40


@dataclass
class RunnerOptions:
    output_dir: str  # logs and artifacts of every run land under OUTPUT_DIR/runs
    jobs: int = 0  # 0: one per core
    isolation: str = "host"  # or "container"
    keep_workspaces: bool = False
    heartbeat_seconds: float = 2.0
    max_log_mb: int | None = None  # every task's log limit, instead of its own `max_log_mb`


@dataclass
class RunOutcome:
    """One attempt of one run, as `testlooper run --json` reports it."""

    task: str
    kind: str
    run_index: int
    attempt: int
    result: str
    duration_seconds: float
    exit_code: int | None
    started_at: float
    cases: list[dict] = field(default_factory=list)  # {"name", "success", "duration_seconds"}
    log: str = ""
    artifacts: str = ""
    message: str = ""  # why a run was blocked, cancelled or is an error

    def to_json(self) -> dict:
        failed = [c["name"] for c in self.cases if not c["success"]]
        return {
            "task": self.task, "kind": self.kind, "run_index": self.run_index, "attempt": self.attempt,
            "result": self.result, "duration_seconds": round(self.duration_seconds, 3),
            "exit_code": self.exit_code,
            "cases": {"total": len(self.cases), "passed": len(self.cases) - len(failed), "failed": len(failed)},
            "failed_cases": failed, "log": self.log, "artifacts": self.artifacts, "message": self.message,
        }


class Interrupted(Exception):
    """The run was stopped (Ctrl-C or SIGTERM); the outcomes so far are attached."""

    def __init__(self, outcomes: list[RunOutcome]):
        super().__init__("interrupted")
        self.outcomes = outcomes


class LocalRunner:
    """Runs one plan of one commit. `on_event(kind, run, outcome)` reports progress;
    `on_outcome(outcome)` receives every finished attempt (to record it) as it happens;
    `on_tick()` is called about once a second while waiting."""

    def __init__(self, definitions: dict, plan: dict, source_dir: str, commit: str, commit_message: str,
                 options: RunnerOptions, on_event=None, on_outcome=None, on_tick=None, pinned=None):
        # Other repositories' builds the plan needs are tasks too, named `pin/build`.
        self.tasks = {**definitions["builds"], **definitions["tests"], **definitions.get("external_builds", {})}
        self.pinned = pinned  # target.PinnedSources: other repositories' pinned commits
        self.plan = plan
        self.source_dir = os.path.abspath(source_dir)
        self.commit = commit
        self.commit_message = commit_message
        self.options = options
        self.on_event = on_event or (lambda kind, run, outcome: None)
        self.on_outcome = on_outcome or (lambda outcome: None)
        self.on_tick = on_tick or (lambda: None)
        jobs = options.jobs or available_cores()
        self.schedule = Schedule(plan["tasks"], self.tasks, Capacity(jobs, available_cores(), total_ram_gb()))
        self.build_outputs: dict[str, dict[str, str]] = {}  # build -> artifact name -> path
        self.finished: "queue.Queue[tuple[Run, RunOutcome, _Agent | None]]" = queue.Queue()
        self.processes: dict[str, subprocess.Popen] = {}  # run id -> agent
        self.run_ids: dict[int, str] = {}
        self.outcomes: list[RunOutcome] = []
        self.engine = containers.find_engine() if options.isolation == "container" else None
        self.server: WorkerApiServer | None = None
        self.jobs = jobs
        self.pending_announcements: list[tuple[Run, RunOutcome, Run | None]] = []
        self.images: dict[str, str] = {}  # image spec -> container image to run
        self.workdirs: dict[str, str] = {}  # run id -> its workspace
        self.agents: list[_Agent] = []  # alive, busy or idle
        self.idle_agents: list[_Agent] = []
        self.watchers: list[threading.Thread] = []

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> list[RunOutcome]:
        os.makedirs(self.runs_dir, exist_ok=True)
        self.server = WorkerApiServer(artifact_root=self.runs_dir)
        self.server.start(wait=False)  # aiohttp loads in its thread while the first agents start
        announcements = self.pending_announcements
        try:
            while True:
                actions = self.schedule.next_actions(time.time())
                for run in actions.blocked:
                    announcements.append(self.settle(run, self.outcome_without_running(run, "blocked", run.reason)))
                for run in actions.start:
                    self.start(run)
                # Recording and printing come after the next runs started, so they never hold a slot idle.
                while announcements:
                    self.announce(*announcements.pop(0))
                if self.schedule.done:
                    break
                wait = min(self.schedule.seconds_until_next_retry(time.time()), 1.0)
                try:
                    run, outcome, agent = self.finished.get(timeout=max(wait, 0.01))
                except queue.Empty:
                    self.on_tick()
                    continue
                if agent is not None:
                    self.agent_free(agent)
                announcements.append(self.settle(run, outcome))
        except KeyboardInterrupt:
            while announcements:  # finished before the interrupt: they keep their results
                self.announce(*announcements.pop(0))
            self.cancel_everything()
            raise Interrupted(self.outcomes) from None
        finally:
            self.release_agents()
            for watcher in self.watchers:  # they finish cleaning up after handing over results
                watcher.join(timeout=60)
            self.server.stop()
        return self.outcomes

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.options.output_dir, "runs")

    @property
    def agent_logs_dir(self) -> str:
        return os.path.join(self.options.output_dir, "work", "agents")

    def settle(self, run: Run, outcome: RunOutcome) -> tuple[Run, RunOutcome, Run | None]:
        """The scheduler learns the result (fast); returns what `announce` reports later."""
        retry = self.schedule.finished(run, outcome.result, time.time())
        if run.kind == "build" and outcome.result == "passed":
            self.build_outputs[run.task] = self.artifacts_of(run)
        return run, outcome, retry

    def announce(self, run: Run, outcome: RunOutcome, retry: Run | None) -> None:
        self.outcomes.append(outcome)
        self.on_outcome(outcome)
        self.on_event("finished", run, outcome)
        if retry is not None:
            self.on_event("retry", retry, outcome)

    def complete(self, run: Run, outcome: RunOutcome) -> None:
        self.announce(*self.settle(run, outcome))

    def cancel_everything(self) -> None:
        """Ctrl-C: stop what runs (each agent kills its task's process tree), record all as cancelled."""
        for run in self.schedule.cancel_waiting("interrupted before it started"):
            self.complete(run, self.outcome_without_running(run, "cancelled", run.reason))
        for run in self.schedule.running:
            run_id = self.run_ids.get(id(run))
            process = self.processes.get(run_id)
            if process is None:  # chosen to start, but the interrupt came first
                self.complete(run, self.outcome_without_running(run, "cancelled", "interrupted before it started"))
                continue
            self.server.cancel(run_id)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.time() + CANCEL_GRACE_SECONDS
        try:
            while self.schedule.running and time.time() < deadline:
                try:
                    run, outcome, _agent = self.finished.get(timeout=max(0.01, deadline - time.time()))
                except queue.Empty:
                    break
                self.complete(run, outcome)  # a run that finished just before the signal keeps its result
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting for clean-ups
        for run in self.schedule.running:  # agents that did not stop in time
            run_id = self.run_ids[id(run)]
            self.kill_run(run_id, self.processes[run_id])
            self.complete(run, self.outcome_without_running(run, "cancelled", "interrupted; the worker was killed"))

    def kill_run(self, run_id: str, agent_process: subprocess.Popen) -> None:
        """A hard stop: the agent, and its task's processes, which run in sessions of their own."""
        _kill_group(agent_process)
        kill_task_processes(run_id, self.workdirs.get(run_id, ""))

    # -- one run -----------------------------------------------------------------------------

    def start(self, run: Run) -> None:
        run_id = f"{safe_file_name(run.task).replace('%2F', '.')}.{run.run_index}.{run.attempt}.{secrets.token_hex(3)}"
        self.run_ids[id(run)] = run_id
        task = self.tasks[run.task]
        try:
            assignment = self.assignment(run, run_id, task)
        except _CannotRun as exc:
            self.finished.put((run, self.outcome_without_running(run, "error", str(exc)), None))
            return
        token = self.server.register_run(run_id, assignment)
        workdir = os.path.join(self.options.output_dir, "work", safe_file_name(run_id))
        self.workdirs[run_id] = workdir
        shell = ""
        if self.engine:
            try:
                image = self.image_for(task, assignment["source"]["path"])
            except containers.ContainerError as exc:
                self.finished.put((run, self.outcome_without_running(run, "error", str(exc)), None))
                return
            shell = containers.shell_prefix(self.engine, image, task, workdir, run_id)
        try:
            agent = self.idle_agents.pop() if self.idle_agents else self.start_agent()
            self.processes[run_id] = agent.process  # from here on, an interrupt stops it rather than forgets it
            # The run and its token go down a pipe: never in an environment or on a command line.
            agent.process.stdin.write(json.dumps({"run_id": run_id, "workdir": workdir, "token": token,
                                                  "shell": shell}) + "\n")
            agent.process.stdin.flush()
        except OSError as exc:
            self.finished.put((run, self.outcome_without_running(run, "error", f"cannot start the worker: {exc}"),
                               None))
            return
        started = time.time()
        self.on_event("started", run, None)
        deadline = started + float(task.get("timeout_seconds") or 0) + WORKER_DEADLINE_MARGIN_SECONDS
        watcher = threading.Thread(target=self.watch, args=(run, run_id, agent, started, deadline, workdir),
                                   name=f"watch-{run_id}", daemon=True)
        watcher.start()
        self.watchers.append(watcher)
        self.warm_up()

    def start_agent(self) -> _Agent:
        """An agent process that loads Python once and then runs what its stdin hands it."""
        os.makedirs(self.agent_logs_dir, exist_ok=True)
        log_path = os.path.join(self.agent_logs_dir, f"agent-{os.getpid()}-{len(self.agents) + 1}.log")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TESTLOOPER_")}
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(testlooper.__file__)))
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        # -S: the agent needs only the standard library, and skipping site-packages starts it faster.
        command = [sys.executable, "-S", "-m", "testlooper.worker.agent", "--api", self.server.url,
                   "--from-stdin", "--heartbeat-seconds", str(self.options.heartbeat_seconds)]
        with open(log_path, "wb") as log:
            # Its own process group: Ctrl-C reaches the runner, which then cancels each agent
            # in order, rather than every process at once.
            process = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, text=True)
        agent = _Agent(process, log_path)
        self.agents.append(agent)
        return agent

    def warm_up(self) -> None:
        """Starts agents ahead of need, up to --jobs, so that Python's start-up overlaps the runs
        in progress; agents are kept for later runs."""
        waiting, running = self.schedule.queue_counts()
        while len(self.agents) < min(waiting + running, self.jobs):
            try:
                self.idle_agents.append(self.start_agent())
            except OSError:
                return  # starting one when a run needs it will report the error

    def agent_free(self, agent: _Agent) -> None:
        """A run's result arrived: its agent can take the next run (unless it died meanwhile)."""
        if agent.process.poll() is None:
            self.idle_agents.append(agent)

    def release_agents(self) -> None:
        for agent in self.agents:
            try:
                agent.process.stdin.close()  # end of input: the agent exits
                agent.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                _kill_group(agent.process)
            try:
                if os.path.getsize(agent.log_path) == 0:
                    os.remove(agent.log_path)  # kept when the agent had something to say
            except OSError:
                pass
        self.agents, self.idle_agents = [], []

    def watch(self, run: Run, run_id: str, agent: _Agent, started: float, deadline: float, workdir: str) -> None:
        """Waits for one run's result; a worker that dies, or outlives its task's deadline, is an error."""
        process = agent.process
        result = None
        message = ""
        alive = True
        while result is None:
            result = self.server.wait_result(run_id, timeout=0.2)
            if result is not None:
                break
            if process.poll() is not None:
                result = self.server.wait_result(run_id, timeout=2.0)  # posted just before it exited?
                alive = False
                break
            if time.time() > deadline:
                self.kill_run(run_id, process)
                alive = False
                message = "the worker stopped responding and was killed after the task's timeout"
                break
        if result is None:
            process.wait()
            message = message or (f"the worker exited with status {process.returncode} without reporting a result "
                                  f"(its own log: {agent.log_path})")
            result = {"result": "error", "exit_code": None, "duration_seconds": time.time() - started,
                      "error": message, "cases": []}
        status = self.server.status(run_id)
        outcome = RunOutcome(
            task=run.task, kind=run.kind, run_index=run.run_index, attempt=run.attempt, result=result["result"],
            duration_seconds=float(result.get("duration_seconds") or time.time() - started),
            exit_code=result.get("exit_code"), started_at=started, cases=list(result.get("cases") or []),
            log=status.log_path, artifacts=os.path.join(os.path.dirname(status.log_path), "artifacts"),
            message=result.get("error") or "",
        )
        if status.storage_error:
            # The disk filled: the log is cut, so the result is no verdict on the code.
            _keep_longer_log(os.path.join(workdir, "log.txt"), status.log_path)
            if outcome.result != "cancelled":
                outcome.result = "error"
                outcome.message = f"{status.storage_error}: the log is kept up to that point in {status.log_path}"
        # The workspace goes before the agent is free again: the agent wrote its last there
        # before posting the result, and a slot must not be reused before its disk is back.
        if self.engine:
            containers.remove_run_containers(self.engine, run_id)
        if not self.options.keep_workspaces:
            shutil.rmtree(workdir, ignore_errors=True)
        self.finished.put((run, outcome, agent if alive else None))

    def image_for(self, task: dict, source_dir: str) -> str:
        """Each image once per command: a Dockerfile is built for the first run that needs it."""
        key = json.dumps([task.get("image") or {}, source_dir if (task.get("image") or {}).get("dockerfile") else ""],
                         sort_keys=True)
        if key not in self.images:
            self.images[key] = containers.image_for(task, self.engine, source_dir)
        return self.images[key]

    def pinned_checkout(self, pin: str, what: str) -> str:
        """The folder of another repository's pinned commit (exported on first use)."""
        if self.pinned is None:
            raise _CannotRun(f"{what} comes from the repository pinned as {pin!r}, which this run cannot read")
        try:
            return self.pinned.checkout(pin)
        except Exception as exc:  # the lookup's and git's errors: the run cannot start, the others go on
            raise _CannotRun(f"{what}: cannot export the commit pinned as {pin!r}: {exc}") from None

    def assignment(self, run: Run, run_id: str, task: dict) -> dict:
        from testlooper.planning.planner import build_key

        task_repo = task.get("repo", "HEAD")
        if task_repo == "HEAD":
            source_dir, commit, message = self.source_dir, self.commit, self.commit_message
        else:  # another repository's build runs in a checkout of its own pinned commit
            source_dir = self.pinned_checkout(task_repo, "this build")
            commit = self.pinned.where(task_repo)[1]
            message = self.pinned.commit_message(task_repo)
        inputs = {}
        for key, dependency in task["dependencies"].items():
            if dependency["kind"] == "source":
                root = self.source_dir if dependency["repo"] == "HEAD" else \
                    self.pinned_checkout(dependency["repo"], f"input {key!r}")
                path = os.path.join(root, *dependency["path"].split("/")) if dependency["path"] else root
                if not os.path.isdir(path):
                    raise _CannotRun(f"input {key!r}: the source folder {dependency['path']!r} does not exist")
                inputs[key] = {"kind": "source", "path": path}
            else:
                name = build_key(dependency["repo"], dependency["build"])
                produced = self.build_outputs.get(name, {})
                if dependency["artifact"] not in produced:
                    raise _CannotRun(f"input {key!r}: build {name!r} produced no artifact "
                                     f"{dependency['artifact'] or '(its whole output)'!r}")
                inputs[key] = {"kind": "build", "path": produced[dependency["artifact"]]}
        if self.options.max_log_mb:
            task = {**task, "max_log_mb": self.options.max_log_mb}
        return {
            "run_id": run_id, "task": task, "commit": commit, "commit_message": message,
            "source": {"path": source_dir}, "inputs": inputs, "run_index": run.run_index,
            "attempt": run.attempt, "cores": run.cores or max(1, available_cores() // self.jobs),
            "ram_gb": run.ram_gb,
        }

    def artifacts_of(self, run: Run) -> dict[str, str]:
        status = self.server.status(self.run_ids[id(run)])
        return {name: record.path for name, record in status.artifacts.items()}

    def outcome_without_running(self, run: Run, result: str, message: str) -> RunOutcome:
        return RunOutcome(task=run.task, kind=run.kind, run_index=run.run_index, attempt=run.attempt,
                          result=result, duration_seconds=0.0, exit_code=None, started_at=time.time(),
                          message=message)


class _CannotRun(Exception):
    pass


@dataclass
class _Agent:
    process: subprocess.Popen
    log_path: str  # its own stdout and stderr (not the tasks': those are in each run's log)


def _keep_longer_log(workspace_log: str, shipped_log: str) -> None:
    """The agent's own copy of a run's log holds what was written before its disk filled, which
    may be more than reached the output folder: it takes the shipped log's place. A rename on
    one file system needs no free space."""
    try:
        if os.path.getsize(workspace_log) > os.path.getsize(shipped_log):
            os.replace(workspace_log, shipped_log)
    except OSError:
        pass  # on another file system, or gone: the shipped log stays as it is


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_task_processes(run_id: str, workdir: str) -> None:
    """Kills what is left of a run whose agent was killed. On Linux, every process whose
    environment carries the run's TEST_LOOPER_TEST_ID (all its commands inherit it); elsewhere,
    the process groups the agent listed in WORKDIR/agent/process-groups."""
    if os.path.isdir("/proc/self"):
        kill_processes_of_run(run_id)
        return
    try:
        with open(os.path.join(workdir, "agent", "process-groups")) as listed:
            groups = [int(line) for line in listed if line.strip().isdigit()]
    except OSError:
        return
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def summarize(outcomes: list[RunOutcome]) -> dict[str, int]:
    summary = {name: 0 for name in ("passed", "failed", "timeout", "error", "blocked", "cancelled")}
    for outcome in final_attempts(outcomes):
        summary[outcome.result] += 1
    return summary


def final_attempts(outcomes: list[RunOutcome]) -> list[RunOutcome]:
    """The last attempt of each run: a build that passed on retry counts as passed."""
    last: dict[tuple[str, int], RunOutcome] = {}
    for outcome in outcomes:
        key = (outcome.task, outcome.run_index)
        if key not in last or outcome.attempt >= last[key].attempt:
            last[key] = outcome
    return list(last.values())
