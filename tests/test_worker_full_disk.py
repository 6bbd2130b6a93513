"""The agent and the worker API on a disk that fills up: a real 1 MiB tmpfs (see fs_helpers)."""

from __future__ import annotations

import time

import pytest

from fs_helpers import small_disk
from testlooper.worker.server import WorkerApiServer
from worker_helpers import api_server, make_assignment, make_source, make_task, run_agent  # noqa: F401

FLOOD = 'echo "first line"; head -c 3000000 /dev/zero | tr "\\0" x; echo "after the flood"'


@pytest.mark.parametrize("stderr_on_the_full_disk", [False, True])
def test_a_full_workspace_disk_makes_the_run_an_error_and_the_agent_survives(api_server, tmp_path,
                                                                             stderr_on_the_full_disk):
    """The agent's own stderr (the run's helper files put it beside the workdir) may be on the
    full disk too, as the local runner's agent logs are."""
    source = make_source(tmp_path / "checkout")
    disk = tmp_path / "small"
    workdir = disk / "work" if stderr_on_the_full_disk else disk
    with small_disk(disk, "1m"):
        run = run_agent(api_server, make_assignment(make_task(FLOOD), source), workdir)
    assert run.returncode == 0, run.stderr  # the RESULT was delivered
    assert run.result["result"] == "error"
    assert "No space left on device" in run.result["error"]
    assert run.log_text.startswith("[testlooper]") and "first line" in run.log_text


def test_the_api_answers_507_when_its_disk_is_full_and_the_agent_stops_shipping(tmp_path):
    source = make_source(tmp_path / "checkout")
    api_disk = tmp_path / "api-disk"
    with small_disk(api_disk, "1m"):
        server = WorkerApiServer(artifact_root=api_disk / "artifacts")
        server.start()
        try:
            started = time.monotonic()
            run = run_agent(server, make_assignment(make_task(FLOOD), source), tmp_path / "work")
            took = time.monotonic() - started
            status = server.status(run.run_id)
        finally:
            server.stop()
    assert run.returncode == 0, run.stderr
    assert status.storage_error.startswith("No space left on device (storing ")
    assert took < 20  # no minute of resending chunks to a full disk
    assert "the log could not be shipped completely" in run.stderr and "HTTP 507" in run.stderr
