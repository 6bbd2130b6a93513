"""cluster/watch_cache.py: a decision never starts from a copy older than our own last write."""

from __future__ import annotations

import calendar
import time

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


from testlooper.cluster.watch_cache import RunObjects  # noqa: E402

LABEL = "testlooper.dev/testrun"


def pod(name: str, testrun: str, phase: str = "", version: str = "1") -> dict:
    return {"metadata": {"name": name, "labels": {LABEL: testrun}, "resourceVersion": version,
                         "managedFields": [{"big": True}]},
            "spec": {"containers": [{"name": "test"}]}, "status": {"phase": phase} if phase else {}}


def names(objects: RunObjects, kind: str, testrun: str) -> list[str]:
    return [body["metadata"]["name"] for body in objects.of(kind, testrun)]


def test_run_objects_are_trusted_only_once_listed_and_keep_what_a_decision_reads():
    objects = RunObjects(LABEL)
    assert not objects.trusted
    objects.pod_event(False, pod("a-1", "a", "Running"))
    started = objects.listing_started()
    objects.merge("pods", started, [pod("a-1", "a", "Pending"), pod("b-1", "b")])
    # The event came before the listing was asked for: the listing is the newer truth.
    assert [p["status"] for p in objects.of("pods", "a")] == [{"phase": "Pending"}]
    assert names(objects, "pods", "b") == ["b-1"] and names(objects, "pods", "c") == []
    kept = objects.of("pods", "b")[0]
    assert "spec" not in kept and "managedFields" not in kept["metadata"]


def test_a_listing_drops_what_the_watch_missed_but_not_what_changed_since_it_was_asked_for():
    objects = RunObjects(LABEL)
    objects.merge("pods", objects.listing_started(), [pod("a-1", "a"), pod("a-2", "a"), pod("b-1", "b")])
    started = objects.listing_started()
    objects.created("pods", pod("a-3", "a"))  # made while the listing was on its way
    objects.deleted("pods", "b-1")  # deleted meanwhile: shown as being deleted
    objects.pod_event(True, pod("a-2", "a"))  # its DELETED event, after the listing was asked for
    # The listing (a snapshot from before those) still has a-2 and b-1, and lost a-1's deletion:
    # a-1 is told as dropped (its TestRun decides: cluster/runs.py `_merge_listed_pods`).
    dropped = objects.merge("pods", started, [pod("a-2", "a"), pod("b-1", "b")])
    assert [p["metadata"]["name"] for p in dropped] == ["a-1"]
    assert names(objects, "pods", "a") == ["a-3"]
    # What we sent has no creationTimestamp; a pod's pending time counts from it: about now.
    made_at = objects.of("pods", "a")[0]["metadata"]["creationTimestamp"]
    assert abs(time.time() - calendar.timegm(time.strptime(made_at, "%Y-%m-%dT%H:%M:%SZ"))) < 5
    assert [p["metadata"].get("deletionTimestamp") is not None for p in objects.of("pods", "b")] == [True]
    objects.pod_event(True, pod("b-1", "b"))
    assert names(objects, "pods", "b") == []
    objects.merge("pods", objects.listing_started(), [pod("a-3", "a", "Running")])
    assert [p["status"] for p in objects.of("pods", "a")] == [{"phase": "Running"}]


def test_secrets_are_known_from_our_own_creates_and_deletes_between_listings():
    objects = RunObjects(LABEL)
    started = objects.listing_started()
    objects.created("secrets", {"metadata": {"name": "a-1-token", "labels": {LABEL: "a"}}, "data": {"token": "x"}})
    objects.merge("secrets", started, [])  # a listing from before it was made does not drop it
    assert [s for s in objects.of("secrets", "a")] == [{"metadata": {"name": "a-1-token", "labels": {LABEL: "a"}}}]
    started = objects.listing_started()
    objects.deleted("secrets", "a-1-token")
    objects.merge("secrets", started, [{"metadata": {"name": "a-1-token", "labels": {LABEL: "a"}}}])
    assert objects.of("secrets", "a") == []  # deleted after that listing was asked for
    objects.merge("secrets", objects.listing_started(), [])
    assert objects.of("secrets", "a") == [] and objects._objects["secrets"] == {}  # no tombstone kept
