"""Shared helpers for the end-to-end tests of `testlooper run` and `testlooper watch`.

Every command runs as a real `python -m testlooper` subprocess with its own XDG_DATA_HOME (the
default store and the spool live there), so no test touches the user's history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gitrepo import GitRepo

ROOT_DIR = Path(__file__).resolve().parents[1]
OPERATOR_DIR = ROOT_DIR / "operator"
DEMO_SCRIPT = ROOT_DIR / "examples" / "make-demo-repo.sh"

# Everything `testlooper run --json` promises per run, and in the summary (docs: the JSON contract).
RUN_KEYS = {"task", "kind", "run_index", "attempt", "result", "duration_seconds", "exit_code", "cases",
            "failed_cases", "log", "artifacts"}
SUMMARY_KEYS = {"passed", "failed", "timeout", "error", "blocked", "cancelled"}


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a testlooper subprocess: isolated data home, no colour, the package on
    the path. `TL_SCRATCH` (a directory outside every repo) is where tasks leave pids and stamps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTLOOPER_")}
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env.update({
        "XDG_DATA_HOME": str(tmp_path / "xdg"),
        "NO_COLOR": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(OPERATOR_DIR), os.environ.get("PYTHONPATH")) if p),
        "TL_SCRATCH": str(scratch),
    })
    env.update(extra)
    return env


def tl_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "testlooper", *[str(a) for a in args]]


def tl(args: list, env: dict, timeout: float = 90, cwd=None) -> subprocess.CompletedProcess:
    """Runs `testlooper ARGS` to its end and returns it (stdout and stderr as text)."""
    return subprocess.run(tl_command(args), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def start_tl(args: list, env: dict, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(tl_command(args), env=env, stdout=stdout, stderr=stderr, text=True,
                            stdin=subprocess.DEVNULL)


def run_args(repo, tmp_path: Path, *more, store: str | None = None) -> list:
    """`run REPO --store S --output O ...` with the store and output under tmp_path."""
    return ["run", str(getattr(repo, "path", repo)), "--store", store or str(tmp_path / "history.db"),
            "--output", str(tmp_path / "out"), *more]


def json_document(completed: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(f"stdout is not JSON (exit {completed.returncode}):\n{completed.stdout}\n"
                             f"stderr:\n{completed.stderr}") from None


def runs_of(document: dict, task: str) -> list[dict]:
    return sorted((r for r in document["runs"] if r["task"] == task), key=lambda r: (r["run_index"], r["attempt"]))


def explain(completed: subprocess.CompletedProcess) -> str:
    return f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"


def make_repo(path: Path, definitions: str, files: dict[str, str] | None = None,
              definitions_name: str = "testlooper.yml") -> GitRepo:
    repo = GitRepo(path)
    repo.commit({definitions_name: definitions, **(files or {})}, message="First commit\n\nWith a body.")
    return repo


def repo_id(repo) -> str:
    """How the history store names a local repository: its resolved path."""
    return str(Path(getattr(repo, "path", repo)).resolve())


def stored_runs(store_url: str, repo, sha: str, with_cases: bool = False):
    from testlooper.store import open_store

    store = open_store(store_url)
    try:
        return store.runs(repo_id(repo), sha, with_cases=with_cases)
    finally:
        store.close()


def wait_for(predicate, timeout: float = 20, what="the condition", interval: float = 0.05):
    """Polls `predicate` until it returns something true; fails naming `what` after `timeout`
    (a callable `what` is asked then, so it can say what was seen last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (the machine's init may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_pids(directory: Path, pattern: str) -> list[int]:
    pids = []
    for path in sorted(directory.glob(pattern)):
        text = path.read_text().strip()
        if text:
            pids.append(int(text))
    return pids


def kill_quietly(pids) -> None:
    """Test cleanup: leave no stray process behind even when an assertion failed."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
