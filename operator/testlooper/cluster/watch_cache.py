"""What the decisions of cluster/runs.py read instead of the API: the TestRuns as the operator's
watch last delivered them (`TestRunCache`), and each namespace's run pods and token Secrets
(`RunObjects`, whose own docstring gives its rules).

kopf hands every TestRun event to cluster/testrun_handlers.py, which puts its body here
(`seen`) before it asks for a decision. A watch delivers one object's versions in order, so the
last event is the newest version the operator has heard of, but it can be older than a status
patch of our own whose answer came back before its watch event. Hence the rules:

- Our write's answer is noted (`wrote`): until the event of that version arrives, `get` says
  nothing for that TestRun and the caller reads it from the API. So a decision never starts
  from a version older than our own last write of it.
- A decision that did start from a cached copy writes its status patch with that copy's
  resourceVersion as a precondition (kube/api.py `patch_status(..., resource_version=)`): if
  anyone wrote the TestRun since (a spec edit not yet delivered, another replica while this
  one was paused), the write is refused and the decision is made again from a fresh read.
- Admission (the only place that spends a pool's room) never counts from here: it lists
  TestRuns and pods itself at every round. The decisions it starts (the only ones that create
  pods) take the cached TestRun only when it is the very version the round listed, and write
  conditionally on it too; a refused write is decided again fresh, the runs the refused
  decision started counted against what it was admitted (cluster/runs.py `reconcile`). They
  read the TestRun's pods and Secrets from `RunObjects` once trusted: a pod or Secret has a
  deterministic name, so one a stale view misses is found to exist when it is created.
- A decision from a cached copy that would act with no status write to check it (deletes
  alone) is made again from a fresh read instead.
- After a start or a restart the cache is empty, and it fills as kopf's first listing arrives;
  what is not in it is read from the API.

It holds at most CAPACITY TestRuns, those whose events came last: a decision is mostly
about a TestRun that just changed, and 5,000 TestRuns held whole would be some 60 MB.
"""

from __future__ import annotations

import collections
import time

CAPACITY = 600  # a little more than the 500 runs of the benches' pool at once


def _key(body: dict) -> tuple[str, str]:
    metadata = body.get("metadata") or {}
    return metadata.get("namespace", ""), metadata.get("name", "")


def _version(body: dict | None) -> str:
    return ((body or {}).get("metadata") or {}).get("resourceVersion") or ""


class TestRunCache:
    __test__ = False  # not a pytest class, whatever its name says

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._bodies: collections.OrderedDict[tuple[str, str], dict] = collections.OrderedDict()
        # TestRun -> the resourceVersion our last write made, while its event has not come back.
        self._awaited: dict[tuple[str, str], str] = {}
        self.hits = 0
        self.misses = 0

    def seen(self, body: dict) -> None:
        """A watch event's object (not DELETED). It is not copied: nothing may change it."""
        key = _key(body)
        self._bodies[key] = body
        self._bodies.move_to_end(key)
        if self._awaited.get(key) == _version(body):
            del self._awaited[key]
        while len(self._bodies) > self.capacity:
            old, _ = self._bodies.popitem(last=False)
            self._awaited.pop(old, None)

    def gone(self, namespace: str, name: str) -> None:
        self._bodies.pop((namespace, name), None)
        self._awaited.pop((namespace, name), None)

    def wrote(self, namespace: str, name: str, stored: dict | None) -> None:
        """Our write of the TestRun answered with `stored` (None: unknown, as when it is gone):
        the cached copy is not used until the watch brings that version."""
        key = (namespace, name)
        version = _version(stored)
        if version and version == _version(self._bodies.get(key)):
            self._awaited.pop(key, None)  # its event came back first
            return
        self._awaited.pop(key, None)
        self._awaited[key] = version or "?"  # the newest last
        while len(self._awaited) > 2 * self.capacity:  # events that never came (the watch restarted)
            old = next(iter(self._awaited))
            del self._awaited[old]
            self._bodies.pop(old, None)  # so that an older event cannot be taken for it

    def get(self, namespace: str, name: str) -> dict | None:
        """The newest version heard of, when it is no older than our own last write; else None."""
        key = (namespace, name)
        body = self._bodies.get(key)
        if body is None or key in self._awaited:
            self.misses += 1
            return None
        self.hits += 1
        return body

    def __len__(self) -> int:
        return len(self._bodies)


def slim_run_object(obj: dict) -> dict:
    """What a decision reads of a run pod or token Secret (decisions/phases.py `observe_pod`,
    `observe_secret`, and the run id annotation): its metadata and status, not its spec."""
    metadata = dict(obj.get("metadata") or {})
    metadata.pop("managedFields", None)
    slim = {"metadata": metadata}
    if obj.get("status") is not None:
        slim["status"] = obj["status"]
    return slim


class RunObjects:
    """The run pods and token Secrets of one namespace, kept from the watch's pod events and our
    own creates and deletes, and made whole again by a full listing every few seconds.

    kopf's watch can miss a deletion (a watch that restarts lists again, and says nothing of
    what went meanwhile), and it does not watch Secrets at all. So the listing, not the events,
    is the ground truth: `trusted` is False until one of each kind has been merged, and each
    merge drops whatever the listing does not show, unless it was touched since that listing
    was asked for (each touch takes a sequence number; a listing asked for after a touch shows
    its outcome). An event touched since then stands even if it is older than the listing: the
    watch brings the newer version right after it."""

    def __init__(self, label: str):
        self.label = label  # the label naming an object's TestRun: what `of` looks up
        self.trusted = False
        self._sequence = 0
        # kind ("pods" | "secrets") -> name -> (sequence of the last touch, slim body or None: gone)
        self._objects: dict[str, dict[str, tuple[int, dict | None]]] = {"pods": {}, "secrets": {}}
        self._by_label: dict[str, dict[str, set[str]]] = {"pods": {}, "secrets": {}}  # kind -> label value -> names

    def _set(self, kind: str, name: str, sequence: int, body: dict | None) -> None:
        old = self._objects[kind].get(name, (0, None))[1]
        if old is not None:
            self._unindex(kind, name, old)
        self._objects[kind][name] = (sequence, body)
        if body is not None:
            value = (body["metadata"].get("labels") or {}).get(self.label)
            if value is not None:
                self._by_label[kind].setdefault(value, set()).add(name)

    def _unindex(self, kind: str, name: str, body: dict) -> None:
        value = (body["metadata"].get("labels") or {}).get(self.label)
        names = self._by_label[kind].get(value)
        if names is not None:
            names.discard(name)
            if not names:
                del self._by_label[kind][value]

    def _touch(self, kind: str, name: str, body: dict | None) -> None:
        self._sequence += 1
        self._set(kind, name, self._sequence, body)

    def pod_event(self, deleted: bool, pod: dict) -> None:
        name = (pod.get("metadata") or {}).get("name", "")
        self._touch("pods", name, None if deleted else slim_run_object(pod))

    def created(self, kind: str, body: dict) -> None:
        """We made it: known at once, before its event (which then replaces it) or after. The
        body we sent has no creationTimestamp, which a pod's pending time is counted from: the
        API server gave it about now."""
        name = body["metadata"]["name"]
        if self._objects[kind].get(name, (0, None))[1] is None:
            slim = slim_run_object(body)
            if kind == "pods":
                slim["metadata"].setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._touch(kind, name, slim)

    def deleted(self, kind: str, name: str) -> None:
        """We deleted it: a Secret goes at once; a pod shows as being deleted until its event."""
        known = self._objects[kind].get(name, (0, None))[1]
        if kind == "pods" and known is not None:
            metadata = {**known["metadata"], "deletionTimestamp": known["metadata"].get("deletionTimestamp")
                        or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self._touch(kind, name, {**known, "metadata": metadata})
        else:
            self._touch(kind, name, None)

    def listing_started(self) -> int:
        return self._sequence

    def merge(self, kind: str, started: int, listed: list[dict]) -> list[dict]:
        """A full listing of `kind` (the managed objects of the namespace), asked for when the
        sequence was `started`. Returns what it dropped: gone without an event that said so."""
        objects = self._objects[kind]
        seen = set()
        for item in listed:
            name = (item.get("metadata") or {}).get("name", "")
            seen.add(name)
            if objects.get(name, (0, None))[0] <= started:
                self._set(kind, name, started, slim_run_object(item))
        dropped = []
        for name in [name for name, (touched, _) in objects.items() if touched <= started and name not in seen]:
            body = objects.pop(name)[1]
            if body is not None:
                self._unindex(kind, name, body)
                dropped.append(body)
        return dropped

    def of(self, kind: str, value: str) -> list[dict]:
        """The objects (not gone) whose TestRun label is `value`."""
        objects = self._objects[kind]
        return [objects[name][1] for name in sorted(self._by_label[kind].get(value, ()))]
