"""The local runner's Recorder: results into the history store, through a spool while the store
is down, and back to the store when it answers again."""

import os

import pytest

from redis_server import RedisServer
from testlooper.local.recording import Recorder, spool_path_for
from testlooper.store import CaseResult, RunRecord, default_store_path, open_store, read_spool

REPO = "org/app"
RETRY = 30.0


def make_run(commit):
    return RunRecord(REPO, commit, "unit", "test", 0, 0, "passed", 1.0, 0, 1.7e9, "main",
                     [CaseResult("case0", True, 0.1)])


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """Spools go beside the default store: keep both in the test's directory."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


def counted(url, commits):
    with open_store(url) as store:
        return {sha: counts[("unit", "")][0] for sha, counts in store.case_counts(REPO, commits).items()}


def count_pings(recorder):
    pings = []
    ping = recorder.store.ping

    def counting_ping():
        pings.append(1)
        ping()
    recorder.store.ping = counting_ping
    return pings


def test_a_recorder_goes_back_to_the_store_once_it_answers_again(data_home):
    said, clock = [], Clock()
    commits = [f"c{i}" for i in range(7)]
    with RedisServer(persistent=True) as server:
        recorder = Recorder(server.url, said.append, retry_seconds=RETRY, clock=clock)
        pings = count_pings(recorder)
        recorder.record(make_run("c0"))
        server.kill()

        recorder.record(make_run("c1"))  # fails: warns and spools
        assert [m for m in said if m.startswith("warning: ")] == said
        assert len(said) == 1 and recorder.spool in said[0]
        clock.now += RETRY - 1
        recorder.record(make_run("c2"))  # too soon to try the store again
        assert pings == []
        clock.now += 1
        recorder.record(make_run("c3"))  # tries (ping), still down: spools, says nothing more
        assert len(pings) == 1 and len(said) == 1
        assert [run.commit for run in read_spool(recorder.spool)] == ["c1", "c2", "c3"]
        assert recorder.spooled == 3

        server.start()  # the append-only file brings back c0
        clock.now += RETRY - 1
        recorder.record(make_run("c4"))  # too soon since the last try
        assert len(pings) == 1 and recorder.down_reason
        clock.now += 1
        recorder.record(make_run("c5"))  # answers: the spool is replayed, c5 recorded directly
        assert len(pings) == 2
        assert said[1:] == [f"history store {server.url} is reachable again; recorded 4 kept results"]
        assert not os.path.exists(recorder.spool)
        assert recorder.down_reason == "" and recorder.spooled == 0
        recorder.record(make_run("c6"))
        assert len(pings) == 2 and len(said) == 2 and not os.path.exists(recorder.spool)
        recorder.close()
        assert counted(server.url, commits) == {sha: 1 for sha in commits}


def test_a_recorder_whose_store_was_down_from_the_start_opens_it_later(data_home):
    said, clock = [], Clock()
    server = RedisServer(persistent=True)  # not started yet
    try:
        recorder = Recorder(server.url, said.append, retry_seconds=RETRY, clock=clock)
        assert recorder.store is None and len(said) == 1
        recorder.record(make_run("c1"))
        server.start()
        recorder.record(make_run("c2"))  # too soon to try
        assert recorder.store is None
        clock.now += RETRY
        recorder.record(make_run("c3"))
        assert recorder.store is not None and recorder.down_reason == ""
        assert said[1:] == [f"history store {server.url} is reachable again; recorded 2 kept results"]
        assert not os.path.exists(recorder.spool)
        recorder.close()
        assert counted(server.url, ["c1", "c2", "c3"]) == {"c1": 1, "c2": 1, "c3": 1}
    finally:
        server.__exit__(None, None, None)


def test_a_recorder_has_no_display_url():
    assert not hasattr(Recorder, "display_url")


# -- one spool per store, however its URL is written ------------------------------------------


def test_spool_is_named_from_the_store_not_from_how_its_url_is_written(data_home, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = default_store_path()
    assert default.startswith(str(data_home))
    same_as_default = ["", default, f"sqlite://{default}", os.path.relpath(default),
                       f"{tmp_path}/data/./testlooper/../testlooper/history.db"]
    assert {spool_path_for(url) for url in same_as_default} == {spool_path_for("")}
    same_file = [f"{tmp_path}/x.db", "x.db", "./x.db", f"sqlite://{tmp_path}/x.db", "~/x.db",
                 f"{tmp_path}//x.db"]
    assert {spool_path_for(url) for url in same_file} == {spool_path_for("x.db")}
    assert spool_path_for("x.db") != spool_path_for("")
    assert spool_path_for("y.db") != spool_path_for("x.db")
    same_redis = ["redis://127.0.0.1:6390/0", "redis://:s3cret@127.0.0.1:6390/0",
                  "redis://user:s3cret@127.0.0.1:6390/0"]
    assert len({spool_path_for(url) for url in same_redis[:2]}) == 1
    assert spool_path_for("redis://127.0.0.1:6390/1") != spool_path_for(same_redis[0])
    assert spool_path_for("redis://127.0.0.1:6391/0") != spool_path_for(same_redis[0])
    assert spool_path_for("redis://127.0.0.1:6390/0") != spool_path_for("")
    for url in ["", "x.db", *same_redis]:
        spool = spool_path_for(url)
        assert os.path.dirname(spool) == os.path.dirname(default)
        assert "s3cret" not in spool


def test_store_identity_is_the_absolute_file_or_the_url_without_its_password(data_home, tmp_path,
                                                                            monkeypatch):
    from testlooper.store import store_identity

    monkeypatch.chdir(tmp_path)
    assert store_identity("") == f"sqlite://{default_store_path()}"
    assert store_identity("x.db") == f"sqlite://{tmp_path}/x.db"
    assert store_identity(f"sqlite://{tmp_path}/a/../x.db") == f"sqlite://{tmp_path}/x.db"
    assert store_identity("redis://:s3cret@127.0.0.1:6390/2") == "redis://127.0.0.1:6390/2"
    assert store_identity("redis://me:s3cret@host:6390/2") == "redis://me@host:6390/2"
    assert store_identity("rediss://host:6390/2") == "rediss://host:6390/2"


# -- when no spool can be written ------------------------------------------------------------------


def test_a_recorder_falls_back_to_the_output_folder_and_then_to_its_report(data_home, tmp_path):
    """The spool folder is unwritable from the start: said at once, results go to the output
    folder. When that too fails (the disk fills), results are kept in memory and recorded, with
    fresh run indexes, as soon as the store answers again."""
    said, clock = [], Clock()
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "out"
    server = RedisServer(persistent=True)  # down at first
    try:
        recorder = Recorder(server.url, said.append, retry_seconds=RETRY, clock=clock,
                            spool_dir=str(tmp_path / "a-file" / "spool"), output_dir=str(output))
        assert said[0].startswith(f"warning: cannot write a spool in {tmp_path / 'a-file' / 'spool'} (")
        assert recorder.spool == spool_path_for(server.url, str(output))
        assert f"will be kept in {recorder.spool}" in said[0]
        recorder.record(make_run("c1"))
        assert [run.commit for run in read_spool(recorder.spool)] == ["c1"]

        output_spool = recorder.spool
        os.remove(output_spool)
        os.mkdir(output_spool)  # now the output spool cannot be appended to either
        recorder.record(make_run("c2"))
        assert recorder.spool is None and [run.commit for run in recorder.unkept] == ["c2"]
        assert f"cannot write the spool {output_spool}" in said[-1]
        os.rmdir(output_spool)

        server.start()
        with open_store(server.url) as other:  # another command took run index 0 of c2 meanwhile
            other.record_run(RunRecord(REPO, "c2", "unit", "test", 0, 0, "failed", 1.0, 1, 5.0, "main"))
        clock.now += RETRY
        recorder.record(make_run("c3"))
        assert recorder.unkept == [] and recorder.down_reason == ""
        assert said[-1] == f"history store {server.url} is reachable again; recorded 1 kept results"
        recorder.close()
        with open_store(server.url) as store:
            assert sorted((r.run_index, r.result) for r in store.runs(REPO, "c2")) == [(0, "failed"), (1, "passed")]
        assert counted(server.url, ["c2", "c3"]) == {"c2": 2, "c3": 1}
    finally:
        server.__exit__(None, None, None)
