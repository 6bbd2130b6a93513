"""The worker agent, run as a real process against a real WorkerApiServer on 127.0.0.1."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from testlooper.worker import agent
from worker_helpers import (AgentProcess, agent_environment, api_server, artifact, make_assignment,  # noqa: F401
                            make_source, make_task, run_agent, stage)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="these tests drive POSIX shells and signals")


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "checkout")


def read_trace(run):
    return (run.workdir / "scratch" / "trace").read_text().split()


# -- verdicts and stages -------------------------------------------------------------------------


def test_a_passing_task_is_reported_with_its_log_and_heartbeats(api_server, source, tmp_path):
    run = run_agent(api_server, make_assignment(make_task("echo hello-from-the-task"), source), tmp_path / "work")

    assert run.returncode == 0, run.stderr
    assert run.result["result"] == "passed"
    assert run.result["exit_code"] == 0 and run.result["error"] == ""
    assert "hello-from-the-task" in run.log_text
    assert run.log_text == (run.workdir / "log.txt").read_text()  # shipped completely
    assert json.loads((run.workdir / "result.json").read_text()) == run.result
    assert api_server.status(run.run_id).last_heartbeat is not None
    assert [entry["name"] for entry in run.result["artifacts"]] == [""]


def test_a_failing_task_reports_the_exit_code(api_server, source, tmp_path):
    run = run_agent(api_server, make_assignment(make_task("echo about to fail; exit 3"), source), tmp_path / "work")

    assert run.result["result"] == "failed"
    assert run.result["exit_code"] == 3
    assert run.returncode == 0  # the agent did its job: the result was delivered


def test_stages_run_in_order_with_cleanups_and_always_run(api_server, source, tmp_path):
    trace = 'echo {} >> "$TEST_SCRATCH_DIR/trace"'
    task = make_task(setup_script=trace.format("setup"), stages=[
        stage(trace.format("third"), order=3),
        stage(trace.format("first"), order=1, cleanup=trace.format("first-cleanup")),
        stage(trace.format("second") + "; exit 5", order=2, cleanup=trace.format("second-cleanup") + "; exit 9"),
        stage(trace.format("fourth"), order=4, always_run=True),
    ])

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert read_trace(run) == ["setup", "first", "first-cleanup", "second", "second-cleanup", "fourth"]
    assert run.result["result"] == "failed"
    assert run.result["exit_code"] == 5  # the command's, not the cleanup's
    assert "stage 3/4: skipped" in run.log_text


def test_a_failing_setup_script_leaves_only_always_run_stages(api_server, source, tmp_path):
    trace = 'echo {} >> "$TEST_SCRATCH_DIR/trace"'
    task = make_task(setup_script="exit 7", stages=[
        stage(trace.format("normal")), stage(trace.format("always"), order=1, always_run=True)])

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert read_trace(run) == ["always"]
    assert (run.result["result"], run.result["exit_code"]) == ("failed", 7)


def test_listed_tests_are_handed_to_the_run_command(api_server, source, tmp_path):
    task = make_task(stages=[stage(
        list_tests_command='printf "test_a\\ntest_b\\n" > "$TEST_LOOPER_TEST_LIST_OUTPUT"',
        run_tests_command='cp "$TEST_LOOPER_TESTS_TO_RUN" "$TEST_OUTPUT_DIR/ran.txt"')])

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert run.result["result"] == "passed"
    assert (run.workdir / "output" / "ran.txt").read_text() == "test_a\ntest_b\n"


LISTING_DEFINITIONS = r"""
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "debian:12"}
tests:
  listed/linux:
    stages:
      - list_tests_command: 'echo list >> "$TEST_SCRATCH_DIR/trace"; printf "test_a\ntest_b\n" > "$TEST_LOOPER_TEST_LIST_OUTPUT"'
        run_tests_command: 'if [ -s "$TEST_LOOPER_TESTS_TO_RUN" ]; then echo run-with-list; else echo run-without-list; fi >> "$TEST_SCRATCH_DIR/trace"; cp "$TEST_LOOPER_TESTS_TO_RUN" "$TEST_OUTPUT_DIR/ran.txt"'
"""


def test_a_listing_stage_as_the_definitions_engine_resolves_it_lists_then_runs_once(api_server, source, tmp_path):
    from testlooper.definitions import resolve_text

    task = resolve_text(LISTING_DEFINITIONS, "testlooper.yml")["tests"]["listed/linux"]
    [resolved_stage] = task["stages"]
    # The engine repeats run_tests_command as command, so tools showing one command per stage show it.
    assert resolved_stage["command"] == resolved_stage["run_tests_command"] != ""

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert read_trace(run) == ["list", "run-with-list"]  # the list exists when R runs, and R runs once
    assert run.result["result"] == "passed", run.log_text
    assert (run.workdir / "output" / "ran.txt").read_text() == "test_a\ntest_b\n"
    assert "stage 1/1 command" not in run.log_text


# -- what a running task sees --------------------------------------------------------------------


def test_environment_working_directory_and_source_inputs(api_server, source, tmp_path):
    build_output = tmp_path / "dep-build"
    build_output.mkdir()
    (build_output / "lib.so").write_text("binary")
    task = make_task(
        'src/script.sh > "$TEST_OUTPUT_DIR/script.out" && env > "$TEST_OUTPUT_DIR/env.txt" '
        '&& pwd > "$TEST_OUTPUT_DIR/pwd.txt" && cat dep/lib.so > "$TEST_OUTPUT_DIR/dep.txt"',
        variables={"GREETING": "hello world", "TEST_SRC_DIR": "a variable cannot hijack this"})
    inputs = {"src": {"kind": "source", "path": str(source)}, "dep": {"kind": "build", "path": str(build_output)}}

    run = run_agent(api_server, make_assignment(task, source, inputs=inputs), tmp_path / "work")

    assert run.result["result"] == "passed", run.log_text
    output, workdir = run.workdir / "output", run.workdir.resolve()
    environment = dict(line.split("=", 1) for line in (output / "env.txt").read_text().splitlines() if "=" in line)
    assert environment["TEST_SRC_DIR"] == str(workdir / "src")
    assert environment["TEST_INPUTS"] == str(workdir / "inputs")
    assert environment["TEST_OUTPUT_DIR"] == str(workdir / "output")
    assert environment["TEST_BUILD_OUTPUT_DIR"] == str(workdir / "build_output")
    assert environment["TEST_SCRATCH_DIR"] == str(workdir / "scratch")
    assert environment["TEST_CCACHE_DIR"] == str(workdir / "ccache")
    assert (environment["TEST_CORES_AVAILABLE"], environment["TEST_RAM_GB_AVAILABLE"]) == ("4", "8")
    assert environment["TEST_LOOPER_TEST_ID"] == run.run_id
    assert environment["GREETING"] == "hello world"
    assert "TESTLOOPER_WORKER_TOKEN" not in environment
    assert (output / "pwd.txt").read_text().strip() == str(workdir / "inputs")
    assert (output / "script.out").read_text() == "script-ran-from-src\n"
    assert (output / "dep.txt").read_text() == "binary"
    assert (workdir / "src" / ".git_commit").read_text() == "Fix the frobnicator\n"
    assert (workdir / "inputs" / "src" / ".git_commit").read_text() == "Fix the frobnicator\n"
    assert not (workdir / "inputs" / "dep" / ".git_commit").exists()  # a build output is no source tree


def test_the_token_is_never_visible_to_the_task_or_in_the_log(api_server, source, tmp_path):
    task = make_task('env > "$TEST_OUTPUT_DIR/env.txt"; '
                     'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" " " > "$TEST_OUTPUT_DIR/cmdlines.txt"')
    process = AgentProcess(api_server, make_assignment(task, source), tmp_path / "work")
    token = api_server.find_run(process.run_id).token
    run = process.finish()

    assert "testlooper.worker.agent" in (run.workdir / "output" / "cmdlines.txt").read_text()
    for seen in ("cmdlines.txt", "env.txt"):
        assert token not in (run.workdir / "output" / seen).read_text()
    assert token not in run.log_text and token not in run.stderr


# -- artifacts and inputs ------------------------------------------------------------------------


def test_build_artifacts_are_packed_in_each_format_with_include_and_exclude(api_server, source, tmp_path):
    make_tree = ('cd "$TEST_BUILD_OUTPUT_DIR" && mkdir -p bin lib/sub logs docs && echo app > bin/app '
                 '&& echo symbols > bin/app.debug && echo x > lib/x.so && echo y > lib/sub/y.so '
                 '&& echo notes > lib/notes.txt && echo noise > logs/build.log && echo read > docs/readme.txt')
    task = make_task(kind="build", stages=[stage(make_tree, artifacts=[
        artifact("binaries", "bin", exclude=["*.debug"], format="Tar"),
        artifact("libraries", "", include=["lib/**/*.so"], format="Zip"),
        artifact("docs", "docs", format="Files"),
        artifact("", "", exclude=["logs", "bin/*.debug"], format="Tar"),
    ])])

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert run.result["result"] == "passed", run.log_text
    stored = api_server.status(run.run_id).artifacts
    with tarfile.open(stored["binaries"].path) as packed:
        assert packed.getnames() == ["app"]
    with zipfile.ZipFile(stored["libraries"].path) as packed:
        assert sorted(packed.namelist()) == ["lib/sub/y.so", "lib/x.so"]
    assert sorted(os.listdir(stored["docs"].path)) == ["readme.txt"]
    with tarfile.open(stored[""].path) as packed:
        assert sorted(packed.getnames()) == [
            "bin/app", "docs/readme.txt", "lib/notes.txt", "lib/sub/y.so", "lib/x.so"]
    reported = {entry["name"]: entry for entry in run.result["artifacts"]}
    assert reported["binaries"] == {"name": "binaries", "format": "Tar", "size": stored["binaries"].size}
    assert reported["docs"]["format"] == "Files"


def test_a_missing_or_escaping_artifact_directory_fails_the_task(api_server, source, tmp_path):
    task = make_task(kind="build", stages=[stage("true", artifacts=[
        artifact("missing", "not-built"), artifact("escape", "../../..")])])

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert run.result["result"] == "failed"
    assert "'missing'" in run.result["error"] and "outside the output directory" in run.result["error"]
    assert run.result["artifacts"] == []


def test_build_inputs_arrive_from_packed_artifacts_and_directories(api_server, source, tmp_path):
    packed_tar, packed_zip, directory = tmp_path / "a.tar.gz", tmp_path / "b.zip", tmp_path / "c"
    with tarfile.open(packed_tar, "w:gz") as tar:
        add_bytes(tar, "a.txt", b"from a tar\n")
    with zipfile.ZipFile(packed_zip, "w") as zipped:
        zipped.writestr("nested/b.txt", "from a zip\n")
    directory.mkdir()
    (directory / "c.txt").write_text("from a directory\n")
    inputs = {name: {"kind": "build", "path": str(path)}
              for name, path in (("tarred", packed_tar), ("zipped", packed_zip), ("copied", directory))}
    task = make_task('cat tarred/a.txt zipped/nested/b.txt copied/c.txt > "$TEST_OUTPUT_DIR/all.txt"')

    run = run_agent(api_server, make_assignment(task, source, inputs=inputs), tmp_path / "work")

    assert run.result["result"] == "passed", run.log_text
    assert (run.workdir / "output" / "all.txt").read_text() == "from a tar\nfrom a zip\nfrom a directory\n"


def test_source_and_inputs_are_fetched_by_url(api_server, source, tmp_path):
    (source / "link-to-readme").symlink_to("README")
    packed = tmp_path / "build.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        add_bytes(tar, "tool", b"built tool\n")
    inputs = {"src": {"kind": "source", "path": str(source)}, "built": {"kind": "build", "path": str(packed)}}
    task = make_task('src/script.sh > "$TEST_OUTPUT_DIR/out.txt" && cat built/tool "$TEST_SRC_DIR/link-to-readme" '
                     '>> "$TEST_OUTPUT_DIR/out.txt"')
    assignment = make_assignment(task, source, inputs=inputs)

    run = run_agent(api_server, assignment, tmp_path / "work", inputs_by_url=True)

    assert api_server.find_run(run.run_id).assignment["source"] == {"url": "source"}
    assert run.result["result"] == "passed", run.log_text
    assert (run.workdir / "output" / "out.txt").read_text() == "script-ran-from-src\nbuilt tool\nthe project\n"
    assert os.path.islink(run.workdir / "src" / "link-to-readme")
    assert (run.workdir / "inputs" / "src" / ".git_commit").read_text() == "Fix the frobnicator\n"


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute-escape.txt", "through-link"])
def test_an_unsafe_input_archive_is_refused(api_server, source, tmp_path, member):
    hostile, outside = tmp_path / "hostile.tar", tmp_path / "outside"
    outside.mkdir()
    with tarfile.open(hostile, "w") as tar:
        if member == "through-link":  # the link alone is fine; writing through it is not
            add_link(tar, "link-out", str(outside))
            add_bytes(tar, "link-out/escaped.txt", b"should never be written\n")
        else:
            add_bytes(tar, member, b"should never be written\n")
    inputs = {"evil": {"kind": "build", "path": str(hostile)}}

    run = run_agent(api_server, make_assignment(make_task("true"), source, inputs=inputs), tmp_path / "work",
                    inputs_by_url=True)

    assert run.result["result"] == "error"
    assert "input 'evil'" in run.result["error"]
    assert not (tmp_path / "work" / "inputs" / "escaped.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert os.listdir(outside) == []


@pytest.mark.parametrize("inputs_by_url", [False, True], ids=["path", "url"])
def test_absolute_symlinks_in_a_build_output_reach_the_consumer_as_links(api_server, source, tmp_path,
                                                                          inputs_by_url):
    # What every virtualenv does: bin/python is a link to the system's interpreter.
    build = make_task('ln -s /usr/bin/python3 "$TEST_BUILD_OUTPUT_DIR/python" && '
                      'ln -s /no/such/file "$TEST_BUILD_OUTPUT_DIR/dangling" && '
                      'mkdir "$TEST_BUILD_OUTPUT_DIR/lib" && ln -s lib "$TEST_BUILD_OUTPUT_DIR/lib64" && '
                      'echo built > "$TEST_BUILD_OUTPUT_DIR/lib/tool"', kind="build")
    built = run_agent(api_server, make_assignment(build, source), tmp_path / "build")
    assert built.result["result"] == "passed", built.log_text
    inputs = {"venv": {"kind": "build", "path": api_server.status(built.run_id).artifacts[""].path}}
    consumer = make_task('readlink venv/python venv/dangling venv/lib64 > "$TEST_OUTPUT_DIR/links.txt" && '
                         'cat venv/lib64/tool >> "$TEST_OUTPUT_DIR/links.txt"')

    run = run_agent(api_server, make_assignment(consumer, source, inputs=inputs), tmp_path / "consumer",
                    inputs_by_url=inputs_by_url)

    assert run.result["result"] == "passed", run.result["error"] or run.log_text
    assert (run.workdir / "output" / "links.txt").read_text() == "/usr/bin/python3\n/no/such/file\nlib\nbuilt\n"
    assert os.path.islink(run.workdir / "inputs" / "venv" / "python")


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


def add_zip_link(zipped, name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the mode in external_attr is meaningful
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zipped.writestr(info, target)


def test_unpacking_keeps_symlinks_as_links_whatever_their_target(tmp_path):
    with tarfile.open(tmp_path / "links.tar.gz", "w:gz") as tar:
        add_link(tar, "bin/python", "/usr/bin/python3")
        add_link(tar, "up", "../../..")
        add_link(tar, "lib64", "lib")
        directory = tarfile.TarInfo("lib")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        add_bytes(tar, "lib64/through-an-inside-link.txt", b"fine\n")
        add_link(tar, "hard.txt", "lib64/through-an-inside-link.txt", tarfile.LNKTYPE)
    with zipfile.ZipFile(tmp_path / "links.zip", "w") as zipped:
        add_zip_link(zipped, "bin/python", "/usr/bin/python3")
        add_zip_link(zipped, "lib64", "lib")
        zipped.writestr("lib/", "")
        zipped.writestr("lib64/through-an-inside-link.txt", "fine\n")

    for archive in ("links.tar.gz", "links.zip"):
        destination = tmp_path / archive.replace(".", "-")
        agent.unpack_archive(str(tmp_path / archive), str(destination), "input 'x'")

        assert os.readlink(destination / "bin" / "python") == "/usr/bin/python3", archive
        assert os.readlink(destination / "lib64") == "lib"
        assert (destination / "lib" / "through-an-inside-link.txt").read_text() == "fine\n"
    assert os.readlink(tmp_path / "links-tar-gz" / "up") == "../../.."
    assert (tmp_path / "links-tar-gz" / "hard.txt").read_text() == "fine\n"


def write_through_absolute_link(tar, outside):
    add_link(tar, "escape", str(outside))
    add_bytes(tar, "escape/planted.txt", b"x")


def write_through_relative_link(tar, outside):
    add_link(tar, "dir/escape", "../../outside")
    add_bytes(tar, "dir/escape/planted.txt", b"x")


def overwrite_a_linked_file(tar, outside):
    add_link(tar, "victim", str(outside / "victim.txt"))
    add_bytes(tar, "victim", b"x")


def hard_link_to_an_absolute_path(tar, outside):
    add_link(tar, "hard", str(outside / "victim.txt"), tarfile.LNKTYPE)


def hard_link_upwards(tar, outside):
    add_link(tar, "hard", "../outside/victim.txt", tarfile.LNKTYPE)


def hard_link_through_a_symlink(tar, outside):
    add_link(tar, "soft", str(outside / "victim.txt"))
    add_link(tar, "hard", "soft", tarfile.LNKTYPE)


def device_file(tar, outside):
    info = tarfile.TarInfo("null")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    tar.addfile(info)


def fifo(tar, outside):
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    tar.addfile(info)


def absolute_name(tar, outside):
    add_bytes(tar, str(outside / "planted.txt"), b"x")


def dot_dot_name(tar, outside):
    add_bytes(tar, "../outside/planted.txt", b"x")


@pytest.mark.parametrize("build", [
    write_through_absolute_link, write_through_relative_link, overwrite_a_linked_file,
    hard_link_to_an_absolute_path, hard_link_upwards, hard_link_through_a_symlink, device_file, fifo,
    absolute_name, dot_dot_name])
def test_unpacking_a_tar_refuses_whatever_would_reach_outside(tmp_path, build):
    outside, destination = tmp_path / "outside", tmp_path / "inputs" / "dep"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    with tarfile.open(tmp_path / "hostile.tar", "w") as tar:
        build(tar, outside)

    with pytest.raises(agent.InfrastructureError, match="input 'dep': cannot unpack"):
        agent.unpack_archive(str(tmp_path / "hostile.tar"), str(destination), "input 'dep'")

    assert sorted(os.listdir(outside)) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (destination / "hard").exists() and not (destination / "null").exists()


@pytest.mark.parametrize("hostile", ["through-absolute-link", "through-relative-link", "overwrite-linked-file",
                                     "dot-dot", "absolute", "device"])
def test_unpacking_a_zip_refuses_whatever_would_reach_outside(tmp_path, hostile):
    outside, destination = tmp_path / "outside", tmp_path / "inputs" / "dep"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    with zipfile.ZipFile(tmp_path / "hostile.zip", "w") as zipped:
        if hostile == "through-absolute-link":
            add_zip_link(zipped, "escape", str(outside))
            zipped.writestr("escape/planted.txt", "x")
        elif hostile == "through-relative-link":
            add_zip_link(zipped, "dir/escape", "../../outside")
            zipped.writestr("dir/escape/planted.txt", "x")
        elif hostile == "overwrite-linked-file":
            add_zip_link(zipped, "victim", str(outside / "victim.txt"))
            with pytest.warns(UserWarning, match="Duplicate name"):
                zipped.writestr("victim", "x")
        elif hostile == "dot-dot":
            zipped.writestr("../outside/planted.txt", "x")
        elif hostile == "absolute":
            zipped.writestr(str(outside / "planted.txt"), "x")
        else:
            info = zipfile.ZipInfo("null")
            info.create_system, info.external_attr = 3, (stat.S_IFCHR | 0o666) << 16
            zipped.writestr(info, "")

    with pytest.raises(agent.InfrastructureError, match="input 'dep'"):
        agent.unpack_archive(str(tmp_path / "hostile.zip"), str(destination), "input 'dep'")

    assert sorted(os.listdir(outside)) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "untouched"


# -- time limits, cancellation, process trees ----------------------------------------------------


def test_a_timeout_kills_a_tree_that_ignores_sigterm(api_server, source, tmp_path):
    # The shell ignores SIGTERM and so does its grandchild (ignored signals survive exec).
    command = ("trap '' TERM; sleep 1000 & echo $! > \"$TEST_SCRATCH_DIR/grandchild.pid\"; "
               "while true; do sleep 0.1; done")
    started = time.monotonic()

    run = run_agent(api_server, make_assignment(make_task(command, timeout_seconds=1), source), tmp_path / "work")

    assert run.result["result"] == "timeout"
    assert run.result["exit_code"] is None and "timed out after 1 s" in run.result["error"]
    assert time.monotonic() - started < 10
    grandchild = int((run.workdir / "scratch" / "grandchild.pid").read_text())
    assert not process_is_running(grandchild)


def test_leftover_background_processes_live_until_the_task_ends(api_server, source, tmp_path):
    stages = [stage('sleep 1000 & echo $! > "$TEST_SCRATCH_DIR/daemon.pid"'),
              stage('kill -0 $(cat "$TEST_SCRATCH_DIR/daemon.pid")', order=1)]

    run = run_agent(api_server, make_assignment(make_task(stages=stages), source), tmp_path / "work")

    assert run.result["result"] == "passed", run.log_text  # still alive for the second stage
    assert not process_is_running(int((run.workdir / "scratch" / "daemon.pid").read_text()))


def test_processes_that_leave_their_group_are_killed_at_the_end_of_every_run(api_server, source, tmp_path):
    """`setsid` takes a process out of the command's process group and session, so killing the
    groups misses it; it still carries the run's TEST_LOOPER_TEST_ID, and dies by that."""
    command = ('setsid sleep 120 & echo $! > "$TEST_SCRATCH_DIR/escaped.pid"; '
               'setsid sh -c "sleep 130 & sleep 140" & sleep 0.3')
    try:
        run = run_agent(api_server, make_assignment(make_task(command), source), tmp_path / "work")
        escaped = int((run.workdir / "scratch" / "escaped.pid").read_text())

        assert run.result["result"] == "passed", run.log_text
        assert not process_is_running(escaped)
        line = next(line for line in run.log_text.splitlines() if "outlived the run" in line)
        assert line.startswith("[testlooper] killed 4 processes that outlived the run outside its process groups: ")
        assert f"{escaped} (sleep 120)" in line and "(sleep 130)" in line and "(sleep 140)" in line
    finally:
        for pid, name in list(sleepers_named(("sleep 120", "sleep 130", "sleep 140")).items()):
            os.kill(pid, signal.SIGKILL)


def sleepers_named(commands):
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                text = cmdline.read().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if text in commands:
            found[int(entry)] = text
    return found


def process_is_running(pid):
    """True unless the process is gone or a zombie (its parent may never reap it in a container)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


def listed_process_groups(workdir):
    path = workdir / "agent" / "process-groups"
    text = path.read_text() if path.exists() else ""
    assert all(line.isdigit() for line in text.splitlines()), text
    return [int(line) for line in text.splitlines()]


def processes_in_group(group):
    """{pid: command name} of the live processes whose process group is ``group``."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                name, rest = stat_file.read().rsplit(")", 1)
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        state, _parent, process_group = rest.split()[:3]
        if int(process_group) == group and state != "Z":
            found[int(entry)] = name.split("(", 1)[1]
    return found


def test_every_command_process_group_is_listed_for_a_runner_that_must_kill_the_agent(api_server, source, tmp_path):
    task = make_task(setup_script="true", stages=[stage("sleep 300 & sleep 300")])
    process = AgentProcess(api_server, make_assignment(task, source), tmp_path / "work")
    sleeps = []
    try:
        process.wait_for_phase("stage 1/1 command")
        deadline = time.monotonic() + 15
        while len(sleeps) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            groups = listed_process_groups(process.workdir)
            sleeps = [pid for group in groups for pid, name in processes_in_group(group).items() if name == "sleep"]
        assert len(sleeps) == 2, f"the groups listed, {groups}, do not hold the two sleeps"

        # The runner's last resort: the agent stopped answering, so it is killed hard...
        process.process.kill()
        process.process.wait()
        time.sleep(0.2)
        assert all(process_is_running(pid) for pid in sleeps)  # ...and the task's processes live on,

        for group in listed_process_groups(process.workdir):  # until the runner kills the listed groups.
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(process_is_running(pid) for pid in sleeps) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(process_is_running(pid) for pid in sleeps)
    finally:
        process.process.kill()
        process.process.wait()
        kill_processes_working_in(tmp_path / "work")  # whatever went wrong, no sleep outlives the test


def kill_processes_working_in(directory):
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{entry}/cwd").startswith(str(directory)):
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass


def test_the_process_group_file_forgets_the_groups_the_agent_ended(api_server, source, tmp_path):
    # A group id that has ended may be reused by the kernel: it must not stay listed for a runner to kill.
    stages = [stage("true"), stage("sleep 1000 &", order=1), stage("sleep 30", order=2)]
    task = make_task(stages=stages, timeout_seconds=2)

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert run.result["result"] == "timeout"
    assert "stage 3/3 command" in run.log_text
    assert (run.workdir / "agent" / "process-groups").exists()
    assert listed_process_groups(run.workdir) == []


def test_cancel_through_the_heartbeat(api_server, source, tmp_path):
    task = make_task(stages=[stage("sleep 30", cleanup='echo cleaned > "$TEST_SCRATCH_DIR/trace"')])
    process = AgentProcess(api_server, make_assignment(task, source), tmp_path / "work")
    process.wait_for_phase("stage 1/1 command")
    started = time.monotonic()

    api_server.cancel(process.run_id)
    run = process.finish(timeout=15)

    assert run.result["result"] == "cancelled"
    assert run.result["error"] == "cancelled through the API"
    assert time.monotonic() - started < 5
    assert read_trace(run) == ["cleaned"]  # cleanup runs whatever happened


def test_sigterm_to_the_agent_cancels_the_run(api_server, source, tmp_path):
    process = AgentProcess(api_server, make_assignment(make_task("sleep 30"), source), tmp_path / "work")
    process.wait_for_phase("stage 1/1 command")

    process.process.send_signal(signal.SIGTERM)
    run = process.finish(timeout=15)

    assert run.result["result"] == "cancelled"
    assert "SIGTERM" in run.result["error"]


# -- output volume -------------------------------------------------------------------------------


def test_a_task_printing_200_mb_keeps_agent_memory_flat_and_the_log_complete(api_server, source, tmp_path):
    size = 200_000_000
    command = f"yes 'a line of output, as a chatty test would print it, again and again' | head -c {size}"
    started = time.monotonic()

    run = run_agent(api_server, make_assignment(make_task(command), source), tmp_path / "work", timeout=120)

    elapsed = time.monotonic() - started
    status = api_server.status(run.run_id)
    assert run.result["result"] == "passed"
    assert status.log_size == os.path.getsize(run.workdir / "log.txt") > size
    with open(status.log_path, "rb") as log:
        log.seek(-200, os.SEEK_END)
        assert b"result: passed" in log.read()
    assert 0 < run.agent_peak_rss_kib < 100 * 1024
    print(f"\n200 MB of output: agent peak RSS {run.agent_peak_rss_kib / 1024:.1f} MiB, {elapsed:.1f} s end to end")


# -- individual test results ---------------------------------------------------------------------


JUNIT = ('<testsuites><testsuite name="s"><testcase classname="pkg.Mod" name="test_ok" time="0.5"/>'
         '<testcase classname="pkg.Mod" name="test_bad"><failure message="no"/></testcase>'
         '<testcase name="test_skip"><skipped/></testcase></testsuite></testsuites>')


@pytest.mark.parametrize("then", ["sleep 30", "true"], ids=["still-running", "exited"])
def test_a_log_past_its_limit_keeps_head_and_tail_and_fails_the_run(api_server, source, tmp_path, then):
    task = make_task(stages=[stage(f"seq 1 3000000; {then}", cleanup="echo cleanup-ran"),
                             stage("echo stage-two-ran", order=1, always_run=False)])
    task["max_log_mb"] = 1
    started = time.monotonic()

    run = run_agent(api_server, make_assignment(task, source), tmp_path / "work")

    assert time.monotonic() - started < 20
    assert run.result["result"] == "failed", run.log_text[-2000:]
    assert "the log passed its limit of 1 MiB (max_log_mb), so the task was stopped" in run.result["error"]
    local = (run.workdir / "log.txt").read_text()
    assert local == run.log_text  # the API has the same log as the workdir
    assert len(local.encode()) < 1024 * 1024 + 4096  # the limit, and the agent's last notes
    head, cut, tail = re.split(r"\n\[testlooper\] ---- (\d+) bytes of output cut here: the log passed its limit "
                               r"of 1 MiB \(max_log_mb\); what follows is its end ----\n", local)
    assert "\n1\n2\n3\n" in head and len(head.encode()) == 512 * 1024
    numbers = [int(line) for line in tail.splitlines() if line.isdigit()][1:]  # the first may be cut
    assert len(numbers) > 10_000 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    written = len("".join(f"{n}\n" for n in range(1, numbers[-1] + 1)).encode())
    shown = len(head.encode()) + len(tail.encode())
    assert abs(int(cut) - (written - shown)) < 4096  # what was cut, give or take the agent's notes
    assert "cleanup-ran" in tail and "stage-two-ran" not in local
    assert "[testlooper] stage 2/2: not run (failed)" in tail



@pytest.mark.parametrize("summary", [
    {"summary_ok": True, "summary_bad": {"success": False, "logs": ["x.log"]}},
    [{"testName": "summary_ok", "success": True, "logs": [], "elapsed": 1.5, "startTimestamp": 0},
     {"testName": "summary_bad", "success": False, "logs": [], "elapsed": 2.0, "startTimestamp": 0}],
], ids=["dict", "list"])
def test_individual_results_from_test_summary_and_junit(api_server, source, tmp_path, summary):
    command = (f"echo '{json.dumps(summary)}' > \"$TEST_OUTPUT_DIR/testSummary.json\" && "
               f"mkdir -p \"$TEST_OUTPUT_DIR/reports\" && echo '{JUNIT}' > \"$TEST_OUTPUT_DIR/reports/junit.xml\"")

    run = run_agent(api_server, make_assignment(make_task(command), source), tmp_path / "work")

    outcomes = {case["name"]: case["success"] for case in run.result["cases"]}
    assert outcomes == {"summary_ok": True, "summary_bad": False, "pkg.Mod.test_ok": True, "pkg.Mod.test_bad": False}
    assert run.result["case_parse_errors"] == []


def test_malformed_result_files_are_reported_and_the_run_still_is(api_server, source, tmp_path):
    command = ("echo '{not json' > \"$TEST_OUTPUT_DIR/testSummary.json\" && "
               "echo '<testsuite><testcase name=\"cut\">' > \"$TEST_OUTPUT_DIR/broken.xml\"")

    run = run_agent(api_server, make_assignment(make_task(command), source), tmp_path / "work")

    assert run.result["result"] == "passed"
    errors = run.result["case_parse_errors"]
    assert len(errors) == 2
    assert errors[0].startswith("testSummary.json:") and errors[1].startswith("broken.xml:")
    for message in errors:
        assert f"test results: {message}" in run.log_text


def test_hostile_test_and_artifact_names_never_leave_the_workdir(api_server, source, tmp_path):
    names = ["../../../../escaped", "a/b/c", "名前/ü", "..", "/etc/passwd", "C:\\Windows"]
    artifacts = [artifact(name) for name in ("../../escaped-artifact", "a/b", "名前", "_", "..")]
    (source / "summary.json").write_text(json.dumps({name: True for name in names}))
    command = 'cp "$TEST_SRC_DIR/summary.json" "$TEST_OUTPUT_DIR/testSummary.json"'
    before = set(os.listdir(tmp_path))

    run = run_agent(api_server, make_assignment(make_task(stages=[stage(command, artifacts=artifacts)]), source),
                    tmp_path / "work")

    assert run.result["result"] == "passed", run.log_text
    assert sorted(case["name"] for case in run.result["cases"]) == sorted(names)
    assert set(os.listdir(tmp_path)) - before == {"work", "artifacts", f"{run.run_id}.stderr"}
    artifact_directory = Path(api_server.status(run.run_id).log_path).parent / "artifacts"
    stored = api_server.status(run.run_id).artifacts
    assert sorted(stored) == sorted(entry["name"] for entry in artifacts)
    for record in stored.values():
        assert Path(record.path).parent == artifact_directory
    assert sorted(os.listdir(tmp_path / "artifacts")) == [run.run_id]


# -- infrastructure failures ---------------------------------------------------------------------


def test_a_shell_that_cannot_start_is_an_error(api_server, source, tmp_path):
    run = run_agent(api_server, make_assignment(make_task("true"), source), tmp_path / "work",
                    env={"TESTLOOPER_SHELL": "/no/such/shell -c"})

    assert run.result["result"] == "error"
    assert "cannot start the shell" in run.result["error"]


def test_a_used_workdir_is_refused(api_server, source, tmp_path):
    (tmp_path / "work" / "output").mkdir(parents=True)

    run = run_agent(api_server, make_assignment(make_task("true"), source), tmp_path / "work")

    assert run.result["result"] == "error"
    assert "already holds output" in run.result["error"]


def test_a_rejected_token_leaves_the_result_in_result_json(api_server, source, tmp_path):
    run = run_agent(api_server, make_assignment(make_task("touch should-not-run"), source), tmp_path / "work",
                    token="not-the-token")

    assert run.returncode == 1
    assert run.result is None and api_server.status(run.run_id).log_size == 0  # nothing accepted
    kept = json.loads((run.workdir / "result.json").read_text())
    assert kept["result"] == "error" and "HTTP 401" in kept["error"]
    assert "cannot post the result" in run.stderr
    assert not (run.workdir / "inputs").exists()


# -- standard library only -----------------------------------------------------------------------


WORKER_DIR = Path(agent.__file__).parent


@pytest.mark.parametrize("module, allowed_own", [("agent.py", set()), ("results.py", {"testlooper.worker.agent"})])
def test_worker_modules_import_only_the_standard_library(module, allowed_own):
    """agent.py is one module: the standard library and nothing else, not even its own package."""
    for name in imported_modules(WORKER_DIR / module):
        assert name in allowed_own or name.split(".")[0] in sys.stdlib_module_names, f"{module} imports {name}"


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break the copied-alone agent"
            yield node.module


def test_the_agent_runs_when_copied_alone(api_server, source, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(WORKER_DIR / "agent.py", bare / "agent.py")  # and nothing else: no results.py beside it
    assignment = make_assignment(make_task('echo \'{"alone": true}\' > "$TEST_OUTPUT_DIR/testSummary.json"'), source)
    token = api_server.register_run("bare-run", assignment)
    environment = {key: value for key, value in agent_environment(token).items() if key != "PYTHONPATH"}

    # -S -E: no site-packages at all, no PYTHONPATH; only the script's own directory is importable.
    completed = subprocess.run(
        [sys.executable, "-S", "-E", str(bare / "agent.py"), "--api", api_server.url, "--run-id", "bare-run",
         "--workdir", str(tmp_path / "work"), "--heartbeat-seconds", "0.2"],
        env=environment, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr
    result = api_server.wait_result("bare-run", 0)
    assert result["result"] == "passed"
    assert result["cases"] == [{"name": "alone", "success": True, "duration_seconds": None}]


def test_agent_started_ahead_takes_its_run_from_stdin(api_server, tmp_path):
    """A runner starts agents before a slot frees and hands each its run (and token) on stdin:
    the token never sits in the environment, and Python's start-up overlaps the previous run."""
    from worker_helpers import OPERATOR_DIR, make_assignment, make_source, make_task

    task = make_task('echo "run $TEST_LOOPER_RUN_INDEX via $TESTLOOPER_WORKER_TOKEN."')
    token = api_server.register_run("warm-1", make_assignment(task, make_source(tmp_path / "src")))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TESTLOOPER_")}
    environment["PYTHONPATH"] = str(OPERATOR_DIR)
    agent = subprocess.Popen([sys.executable, "-S", "-m", "testlooper.worker.agent", "--api", api_server.url,
                              "--from-stdin"], stdin=subprocess.PIPE, env=environment, text=True)
    agent.communicate(json.dumps({"run_id": "warm-1", "workdir": str(tmp_path / "work"), "token": token}) + "\n",
                      timeout=60)
    assert agent.returncode == 0
    result = api_server.wait_result("warm-1", timeout=5)
    assert result["result"] == "passed"
    log = Path(api_server.status("warm-1").log_path).read_text()
    assert "run 0 via ." in log  # the task sees neither the token nor a TESTLOOPER_ variable


def test_agent_started_ahead_exits_quietly_when_not_needed(api_server):
    from worker_helpers import OPERATOR_DIR

    environment = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    agent = subprocess.run([sys.executable, "-S", "-m", "testlooper.worker.agent", "--api", api_server.url,
                            "--from-stdin"], input="", env=environment, capture_output=True, text=True, timeout=60)
    assert agent.returncode == 0 and agent.stderr == ""


def test_agent_from_stdin_runs_one_run_per_line_until_the_end_of_input(api_server, tmp_path):
    """The local runner keeps an agent per job slot: each line is a new run, with its own token
    and workspace; the end of input ends the agent."""
    from worker_helpers import OPERATOR_DIR, make_assignment, make_source, make_task

    source = make_source(tmp_path / "src")
    lines = []
    for index, command in enumerate(["true", "exit 3"]):
        assignment = make_assignment(make_task(command), source)
        assignment["run_index"] = index
        token = api_server.register_run(f"kept-{index}", assignment)
        lines.append(json.dumps({"run_id": f"kept-{index}", "workdir": str(tmp_path / f"work-{index}"),
                                 "token": token}))
    environment = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    agent = subprocess.run([sys.executable, "-S", "-m", "testlooper.worker.agent", "--api", api_server.url,
                            "--from-stdin"], input="\n".join(lines) + "\n", env=environment, capture_output=True,
                           text=True, timeout=60)
    assert agent.returncode == 0, agent.stderr
    assert api_server.wait_result("kept-0", timeout=5)["result"] == "passed"
    second = api_server.wait_result("kept-1", timeout=5)
    assert (second["result"], second["exit_code"]) == ("failed", 3)


def test_unpacking_refuses_an_escape_hidden_past_path_max(tmp_path):
    """CVE-2025-4517: links to long names push the resolved path past PATH_MAX, where older
    Pythons' realpath stops following links; a file then lands outside through an absolute link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    long_name, path = "d" * 247, ""
    with tarfile.open(tmp_path / "poc.tar", "w") as tar:
        for step in "abcdefghijklmnop":
            directory = tarfile.TarInfo(os.path.join(path, long_name))
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            add_link(tar, os.path.join(path, step), long_name)
            path = os.path.join(path, long_name)
        chain = os.path.join(*"abcdefghijklmnop", "l" * 254)
        add_link(tar, chain, os.path.join(*[".."] * 16))
        add_link(tar, "escape", str(outside))
        add_bytes(tar, chain + "/escape/evil.txt", b"pwned\n")
    with pytest.raises(agent.InfrastructureError, match="cannot unpack"):
        agent.unpack_archive(str(tmp_path / "poc.tar"), str(tmp_path / "dest"), "input 'x'")
    assert list(outside.iterdir()) == []


def test_a_log_cut_twice_keeps_one_head_one_marker_and_counts_what_was_left_out(tmp_path):
    log = agent.TaskLog(str(tmp_path / "log.txt"), limit_bytes=64 * 1024)
    written = bytearray()

    def write(count, fill):
        data = bytes([fill]) * count
        log.file.write(data)
        written.extend(data)

    write(40 * 1024, ord("h"))  # the head: the first 32 KiB of these stay
    write(160 * 1024, ord("m"))
    assert log.enforce_limit()
    write(8 * 1024, ord("c"))  # a cleanup's output, within the room left after the cut
    assert not log.enforce_limit()
    write(100 * 1024, ord("t"))
    assert log.enforce_limit()
    log.close()

    text = (tmp_path / "log.txt").read_bytes()
    assert len(text) <= 64 * 1024 - 8 * 1024
    head, marker, tail = re.split(rb"(\n\[testlooper\] ---- \d+ bytes of output cut here: [^\n]*\n)", text)
    assert head == written[:32 * 1024] and text.count(b"bytes of output cut here") == 1
    assert written.endswith(tail)
    left_out = len(written) - len(head) - len(tail)
    assert int(marker.split()[2]) == left_out == log.left_out_bytes
    assert log.limit_message().endswith(f"{left_out} bytes were cut from its middle")


def test_the_log_shipper_backs_off_while_finishing_against_an_api_that_is_down(tmp_path):
    # Once the task ended (finish()), a failing API was asked again at once, over and over,
    # until 2 ** failures overflowed and the shipper died with the log unsent.
    log_path = tmp_path / "log.txt"
    log_path.write_bytes(b"every line of it\n")
    calls = []

    class DownThenUp:
        def request(self, method, path, data):
            calls.append(time.monotonic())
            if len(calls) <= 2:
                raise agent.ApiError("503 from the operator", status=503)
            self.shipped = data

    api = DownThenUp()
    api.retry_until = time.monotonic() + 60
    shipper = agent.LogShipper(api, str(log_path))
    shipper._finishing.set()  # the task has ended: finish() at once
    started = time.monotonic()
    shipper.start()
    assert shipper.finish() is None
    assert api.shipped == b"every line of it\n" and len(calls) == 3
    assert time.monotonic() - started >= 0.5 + 1 - 0.05  # 0.25 * 2 ** n between the tries, not at once
