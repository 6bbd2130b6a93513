"""cluster/watch_cache.py: a decision never starts from a copy older than our own last write."""

from __future__ import annotations

from testlooper.cluster.watch_cache import TestRunCache


def body(name: str, version: str, phase: str = "", namespace: str = "team-a") -> dict:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": version},
            "spec": {"runs": 1}, "status": {"phase": phase} if phase else {}}


def test_the_last_event_is_what_is_read_until_we_write():
    cache = TestRunCache()
    assert cache.get("team-a", "t") is None
    cache.seen(body("t", "1"))
    cache.seen(body("t", "2", "Queued"))
    assert cache.get("team-a", "t")["status"] == {"phase": "Queued"}
    assert cache.get("team-b", "t") is None  # namespaces apart


def test_after_our_write_nothing_is_read_until_its_event_comes_back():
    cache = TestRunCache()
    cache.seen(body("t", "1"))
    cache.wrote("team-a", "t", body("t", "5", "Queued"))
    assert cache.get("team-a", "t") is None  # the copy (version 1) is older than our write
    cache.seen(body("t", "3"))  # an event from before our write, still in the stream
    assert cache.get("team-a", "t") is None
    cache.seen(body("t", "5", "Queued"))  # our write's own event
    assert cache.get("team-a", "t")["metadata"]["resourceVersion"] == "5"
    cache.seen(body("t", "6", "Running"))  # and what follows it in the stream
    assert cache.get("team-a", "t")["status"] == {"phase": "Running"}


def test_a_write_whose_event_came_first_leaves_the_copy_usable():
    cache = TestRunCache()
    cache.seen(body("t", "5", "Queued"))
    cache.wrote("team-a", "t", body("t", "5", "Queued"))
    assert cache.get("team-a", "t")["metadata"]["resourceVersion"] == "5"


def test_a_write_of_a_testrun_never_seen_waits_for_its_event_too():
    cache = TestRunCache()
    cache.wrote("team-a", "t", body("t", "5", "Queued"))
    cache.seen(body("t", "1"))  # its ADDED event, older than our write, arrives after it
    assert cache.get("team-a", "t") is None
    cache.seen(body("t", "5", "Queued"))
    assert cache.get("team-a", "t") is not None


def test_an_unknown_write_answer_and_a_deletion_make_it_read_from_the_api():
    cache = TestRunCache()
    cache.seen(body("t", "1"))
    cache.wrote("team-a", "t", None)  # gone, or an answer without a version
    assert cache.get("team-a", "t") is None
    cache.seen(body("u", "2"))
    cache.gone("team-a", "u")
    assert cache.get("team-a", "u") is None and len(cache) == 1


def test_it_holds_the_testruns_heard_of_last_and_forgets_writes_never_echoed():
    cache = TestRunCache(capacity=3)
    for index in range(5):
        cache.seen(body(f"t{index}", str(index)))
    assert len(cache) == 3 and cache.get("team-a", "t0") is None and cache.get("team-a", "t4") is not None
    cache.seen(body("t2", "9"))  # heard of again: kept
    cache.seen(body("t5", "10"))
    assert cache.get("team-a", "t2") is not None and cache.get("team-a", "t3") is None
    for index in range(10):  # writes whose events never came back (a restarted watch)
        cache.wrote("team-a", f"w{index}", body(f"w{index}", str(20 + index)))
    assert len(cache._awaited) <= 6
    assert cache.get("team-a", "w9") is None
