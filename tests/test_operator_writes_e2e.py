"""The operator writes only where its image lets it (Dockerfile: a read-only root filesystem, the
/var/cache/testlooper volume and /tmp): the real `testlooper operator` process, with a Python
audit hook recording every file it opens for writing and every path it creates, renames,
removes or changes, does real work (a push polled, a build whose artifact a test consumes, run
as pods by the test kubelet, a webhook) and is stopped; every path is under --cache-dir or
$TMPDIR. (The hook sees Python's own file calls; git, which the operator runs with --git-dir in
the mirror, is not audited.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster_helpers import NAMESPACE
from operator_process import OPERATOR_DIR, OperatorProcess
from redis_server import free_port
from run_cluster import Kubelet, apply_repo, ended_testruns, push_project, redis_url  # noqa: F401
from run_helpers import wait_for
from test_operator_runs_e2e import BUILD, CHECK, DEFINITIONS, POOL

AUDIT_HOOK = r'''
import os, sys

_LOG = os.environ.get("TESTLOOPER_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir": 2, "os.remove": 1, "os.rmdir": 1, "os.truncate": None, "os.chmod": 2,
                "os.chown": 3, "os.utime": 3, "os.rename": 2, "os.symlink": 2, "os.link": 2,
                "shutil.rmtree": 1, "shutil.copyfile": None, "shutil.copytree": None}


def _install():
    log = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(event, path):
        if isinstance(path, int):
            return  # an open descriptor: its opening was noted
        text = os.fsdecode(path)
        os.write(log, f"{event}\t{os.path.abspath(text)}\n".encode("utf-8", "surrogateescape"))

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode is not None else bool((flags or 0) & _WRITE_FLAGS)
            if writes and path is not None:
                note(event, path)
        elif event in _PATH_EVENTS:
            dir_fd_at = _PATH_EVENTS[event]
            # CPython passes -1 when no dir_fd was given.
            if dir_fd_at is not None and len(args) > dir_fd_at and args[dir_fd_at] not in (None, -1):
                return  # relative to a directory descriptor (rmtree's walk): its top was noted
            note(event, args[0])
            if event in ("os.rename", "os.symlink", "os.link", "shutil.copyfile", "shutil.copytree"):
                note(event, args[1])

    sys.addaudithook(hook)


if _LOG:
    _install()
'''


def test_the_operator_writes_only_to_its_cache_dir_and_tmp(kube, tmp_path, redis_url):
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "writes.log"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    url, _ = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "build.sh": BUILD, "check.sh": CHECK})
    kube.create_namespace(NAMESPACE)
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/workerpools", POOL)
    port = free_port()
    operator = OperatorProcess(kube, tmp_path / "operator", namespaces=[NAMESPACE], port=port, args=[
        "--store", redis_url, "--api-url", f"http://127.0.0.1:{port}", "--worker-image", "testlooper/worker:test"],
        env={"PYTHONPATH": os.pathsep.join([str(OPERATOR_DIR), str(audit)]), "TESTLOOPER_WRITE_AUDIT": str(log),
             "TMPDIR": str(temporary), "HOME": str(temporary), "PYTHONDONTWRITEBYTECODE": "1"})
    operator.directory.mkdir()
    with operator, Kubelet(kube, tmp_path / "node") as kubelet:
        apply_repo(kube, url)
        try:
            by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=90, interval=0.3, what="both TestRuns ended")
        finally:
            assert kubelet.errors == [], kubelet.errors
        assert {task: item["status"]["result"] for task, item in by_task.items()} == {
            "app/linux": "passed", "check/linux": "passed"}
        status, _ = operator.webhook("/webhooks/github", json.dumps({"repository": {"clone_url": url}}).encode(),
                                     {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=00"})
        assert status == 401
        assert operator.stop() == 0
    written = [line.split("\t", 1) for line in log.read_text().splitlines()]
    assert written, "the audit hook saw no write: it did not run"
    allowed = (Path(operator.cache_dir).resolve(), temporary.resolve())
    outside = sorted({(event, path) for event, path in written
                      if path != os.devnull and not any(Path(path).resolve().is_relative_to(root) for root in allowed)})
    assert outside == [], outside
    # It did write: the mirror and the build's artifact are in the cache directory.
    cache = Path(operator.cache_dir).resolve()
    assert any(Path(path).resolve().is_relative_to(cache / "mirrors") for _, path in written)
    assert any(Path(path).resolve().is_relative_to(cache / "artifacts") for _, path in written)


def test_the_audit_hook_sees_what_a_process_writes(tmp_path):
    """The check above can fail: the hook records a write, a folder made, a rename and a removal,
    and not a read."""
    import subprocess
    import sys
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "writes.log"
    work = tmp_path / "work"
    work.mkdir()
    (work / "read-only.txt").write_text("x")
    script = ("import os\nopen('read-only.txt').read()\nopen('new.txt', 'w').write('y')\nos.mkdir('folder')\n"
              "os.replace('new.txt', 'folder/moved.txt')\nos.remove('folder/moved.txt')\n")
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True, timeout=30,
                   env={**os.environ, "PYTHONPATH": str(audit), "TESTLOOPER_WRITE_AUDIT": str(log)})
    seen = {tuple(line.split("\t", 1)) for line in log.read_text().splitlines()}
    assert seen == {("open", str(work / "new.txt")), ("os.mkdir", str(work / "folder")),
                    ("os.rename", str(work / "new.txt")), ("os.rename", str(work / "folder" / "moved.txt")),
                    ("os.remove", str(work / "folder" / "moved.txt"))}
